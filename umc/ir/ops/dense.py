"""Ops of the dense decoder: embedding, norms, projections, attention (DESIGN.md §2)."""

from __future__ import annotations

from umc.ir.core import TensorType
from umc.ir.dims import dim_add
from umc.ir.ops.registry import Attr, decomposition, expect, op, weight_bytes


@op("embedding", "tokens: index weight 0, weight", "out", cost=lambda i, o, a: (0, o[0].nbytes))
def _embedding(ins, attrs):
    """Rows of weight (V, D) at integer tokens."""
    tokens, weight = ins
    expect(tokens.dtype == "i64" and weight.rank == 2, "embedding", f"bad operands {ins}")
    return (TensorType(weight.dtype, (*tokens.shape, weight.shape[1])),)


@decomposition("embedding")
def _embedding_parts(b, ins, attrs):
    tokens, weight = ins
    return (b.one("gather", weight, tokens, axis=0),)


def _norm_cost(ins, outs, attrs) -> tuple[int, int]:
    return 5 * outs[0].numel, sum(weight_bytes(w) for w in ins[1:])


EPS = Attr("eps", "float")


@op("rms_norm", "x, weight", "out", (EPS,), cost=_norm_cost)
def _rms_norm(ins, attrs):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim."""
    x, w = ins
    expect(w.shape == x.shape[-1:] and w.dtype == x.dtype, "rms_norm", f"weight {w} does not fit {x}")
    return (x,)


@op("rms_normalize", "x", "out", (EPS,), cost=lambda i, o, a: (4 * o[0].numel, 0))
def _rms_normalize(ins, attrs):
    """x / sqrt(mean(x^2) + eps) over the last dim, no weight (the weight was folded elsewhere)."""
    return (ins[0],)


def emit_rms_normalize(b, x, eps):
    """x * rsqrt(mean(x*x) + eps), shared by both RMS decompositions."""
    mean_square = b.one("mean", b.one("mul", x, x), axes=(-1,), keepdim=True)
    return b.one("mul", x, b.one("rsqrt", b.one("add_scalar", mean_square, value=eps)))


@decomposition("rms_normalize")
def _rms_normalize_parts(b, ins, attrs):
    return (emit_rms_normalize(b, ins[0], attrs["eps"]),)


@decomposition("rms_norm")
def _rms_norm_parts(b, ins, attrs):
    x, w = ins
    return (b.one("mul", emit_rms_normalize(b, x, attrs["eps"]), w),)


@op("layer_norm", "x, weight, bias?", "out", (EPS,), cost=_norm_cost)
def _layer_norm(ins, attrs):
    """(x - mean) / sqrt(var + eps) * weight (+ bias) over the last dim."""
    x, *affine = ins
    expect(all(w.shape == x.shape[-1:] and w.dtype == x.dtype for w in affine), "layer_norm",
           f"weights {affine} do not fit {x}")
    return (x,)


@op("linear", "x, weight", "out", cost=lambda i, o, a: (2 * o[0].numel * i[1].shape[1], weight_bytes(i[1])))
def _linear(ins, attrs):
    """x @ weight.T with weight (N, K)."""
    x, w = ins
    expect(w.rank == 2 and x.shape[-1] == w.shape[1] and x.dtype == w.dtype, "linear", f"{x} @ {w}.T")
    return (x.with_shape(*x.shape[:-1], w.shape[0]),)


@decomposition("linear")
def _linear_parts(b, ins, attrs):
    x, w = ins
    return (b.one("matmul", x, b.one("transpose", w, perm=(1, 0))),)


def _attention_cost(ins, outs, attrs) -> tuple[int, int]:
    batch, steps, width = outs[0].shape
    context = outs[1].shape[2]
    return 4 * batch * steps * context * width, 0


@op("attention", "q, k, v, past_k?, past_v?, past_len?: nonnegative", "out, present_k, present_v",
    (Attr("n_heads", "int", minimum=1), Attr("n_kv_heads", "int", minimum=1), Attr("head_dim", "int", minimum=2),
     Attr("rope_theta", "float")), cost=_attention_cost)
def _attention(ins, attrs):
    """Causal GQA with rotate-half RoPE on q (B,T,H*hd), k, v (B,T,kv*hd) and optional past k, v (B,kv,S_past,hd).
    Outputs: attention output (B,T,H*hd) and the present k, v (B,kv,S_past+T,hd), keys rotated, new ones last.
    Without ``past_len`` every sequence's new tokens sit at positions S_past..; with ``past_len`` (B,) i64 (a
    ragged batch) sequence b's past is its last past_len[b] positions (the ones before it are padding, never
    attended to) and its new tokens sit at positions past_len[b].., as if it were decoded alone."""
    q, k, v, *past = ins
    heads, kv_heads, hd = attrs["n_heads"], attrs["n_kv_heads"], attrs["head_dim"]
    batch, steps = q.shape[:2]
    expect(q.shape == (batch, steps, heads * hd) and k.shape == v.shape == (batch, steps, kv_heads * hd),
           "attention", f"q {q}, k {k}, v {v}")
    expect(heads % kv_heads == 0, "attention", f"{kv_heads} kv heads do not divide {heads} heads")
    length = steps
    if past:
        kv_past, lengths = past[:2], past[2:]
        expect(len(kv_past) == 2 and kv_past[0] == kv_past[1] and kv_past[0].shape[:2] == (batch, kv_heads)
               and kv_past[0].shape[3] == hd and kv_past[0].dtype == q.dtype, "attention", f"past {past}")
        expect(all(t.dtype == "i64" and t.shape == (batch,) for t in lengths), "attention",
               f"past_len {lengths} is not i64 of shape (B,)")
        length = dim_add(kv_past[0].shape[2], steps)
    present = q.with_shape(batch, kv_heads, length, hd)
    return q, present, present
