"""The op registry: per op name, its type rule and its cost rule.

Type rules map input types and attributes to output types; the verifier re-runs them
on every node. Cost rules give FLOPs and bytes of weights/values read for concrete
shapes (the report's per-pass FLOPs/bytes). The torch implementations live in
``umc.runtime.torch_ops`` under the same names: a new op is one entry in each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from umc.ir.core import Dim, IRError, TensorType, dim_add

TypeRule = Callable[[tuple[TensorType, ...], dict[str, Any]], tuple[TensorType, ...]]


@dataclass(frozen=True)
class Operand:
    """A concrete operand for cost rules: shape, element bytes, and whether it is a weight (param or load-time)."""

    shape: tuple[int, ...]
    itemsize: int
    weight: bool

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes."""
        return self.numel * self.itemsize


CostRule = Callable[[tuple[Operand, ...], tuple[Operand, ...], dict[str, Any]], tuple[int, int]]


@dataclass(frozen=True)
class OpDef:
    """An op: what it computes (doc), its type rule and its cost rule (FLOPs, weight/value bytes read)."""

    name: str
    doc: str
    infer: TypeRule
    cost: CostRule


OPS: dict[str, OpDef] = {}


def _free(ins, outs, attrs) -> tuple[int, int]:
    return 0, 0


def _elementwise_cost(ins, outs, attrs) -> tuple[int, int]:
    return outs[0].numel, 0


def register(name: str, cost: CostRule = _free):
    """Decorator: register ``infer`` (its docstring is the op's doc) under ``name``."""

    def wrap(infer: TypeRule) -> TypeRule:
        if name in OPS:
            raise IRError(f"op {name} registered twice")
        OPS[name] = OpDef(name, (infer.__doc__ or "").strip(), infer, cost)
        return infer

    return wrap


def infer_types(op: str, inputs: tuple[TensorType, ...], attrs: dict[str, Any]) -> tuple[TensorType, ...]:
    """Output types of ``op`` applied to ``inputs`` (IRError if the op is unknown or the inputs do not fit)."""
    if op not in OPS:
        raise IRError(f"unknown op {op!r}")
    return OPS[op].infer(inputs, attrs)


def _expect(cond: bool, op: str, problem: str) -> None:
    if not cond:
        raise IRError(f"{op}: {problem}")


def _weight_bytes(operand: Operand) -> int:
    return operand.nbytes if operand.weight else 0


# ---------------------------------------------------------------- generic tensor ops


@register("add", _elementwise_cost)
def _add(ins, attrs):
    """a + b, same shapes."""
    _expect(len(ins) == 2 and ins[0] == ins[1], "add", f"operands differ: {ins}")
    return (ins[0],)


@register("mul", _elementwise_cost)
def _mul(ins, attrs):
    """a * b, b of the same shape as a or of a's trailing dims (broadcast)."""
    a, b = ins
    _expect(a.shape[a.rank - b.rank:] == b.shape, "mul", f"{b} does not broadcast to {a}")
    return (a,)


@register("silu", lambda i, o, a: (4 * o[0].numel, 0))
@register("gelu", lambda i, o, a: (8 * o[0].numel, 0))
@register("relu", _elementwise_cost)
def _unary(ins, attrs):
    """Elementwise activation."""
    return (ins[0],)


@register("softmax", lambda i, o, a: (5 * o[0].numel, 0))
def _softmax(ins, attrs):
    """Softmax over attrs.axis."""
    return (ins[0],)


def _reshape_dims(shape: tuple[Dim, ...], target: tuple[Dim, ...]) -> bool:
    known = lambda dims: math.prod(d for d in dims if isinstance(d, int))
    symbols = lambda dims: sorted(str(d) for d in dims if not isinstance(d, int))
    return known(shape) == known(target) and symbols(shape) == symbols(target)


@register("reshape")
def _reshape(ins, attrs):
    """View with attrs.shape (same element count; symbolic dims carried by name)."""
    target = tuple(attrs["shape"])
    _expect(_reshape_dims(ins[0].shape, target), "reshape", f"{ins[0]} cannot become {list(target)}")
    return (ins[0].with_shape(*target),)


# ---------------------------------------------------------------- dense model


@register("embedding", lambda i, o, a: (0, o[0].nbytes))
def _embedding(ins, attrs):
    """Rows of weight (V, D) at integer tokens."""
    tokens, weight = ins
    _expect(tokens.dtype == "i64" and weight.rank == 2, "embedding", f"bad operands {ins}")
    return (TensorType(weight.dtype, (*tokens.shape, weight.shape[1])),)


def _norm_cost(ins, outs, attrs) -> tuple[int, int]:
    return 5 * outs[0].numel, sum(_weight_bytes(w) for w in ins)


@register("rms_norm", _norm_cost)
@register("layer_norm", _norm_cost)
def _norm(ins, attrs):
    """Normalize over the last dim, then scale by weight (and add bias: layer_norm with 3 operands)."""
    x, *affine = ins
    _expect(all(w.shape == x.shape[-1:] for w in affine), "norm", f"weights {affine} do not fit {x}")
    return (x,)


@register("rms_normalize", _elementwise_cost)
def _normalize(ins, attrs):
    """x / rms(x) over the last dim, no weight (the weight was folded elsewhere)."""
    return (ins[0],)


@register("linear", lambda i, o, a: (2 * o[0].numel * i[1].shape[1], _weight_bytes(i[1])))
def _linear(ins, attrs):
    """x @ weight.T with weight (N, K)."""
    x, w = ins
    _expect(w.rank == 2 and x.shape[-1] == w.shape[1], "linear", f"{x} @ {w}.T")
    return (x.with_shape(*x.shape[:-1], w.shape[0]),)


def _attention_cost(ins, outs, attrs) -> tuple[int, int]:
    batch, steps, width = outs[0].shape
    context = outs[1].shape[2]
    return 4 * batch * steps * context * width, 0


@register("attention", _attention_cost)
def _attention(ins, attrs):
    """Causal GQA with RoPE on q (B,T,H*hd), k, v (B,T,kv*hd) and optional past k, v (B,kv,S_past,hd).

    Outputs: attention output (B,T,H*hd) and the present k, v (B,kv,S_past+T,hd), keys rotated.
    """
    q, k, v, *past = ins
    heads, kv_heads, hd = attrs["n_heads"], attrs["n_kv_heads"], attrs["head_dim"]
    batch, steps = q.shape[:2]
    _expect(q.shape == (batch, steps, heads * hd) and k.shape == v.shape == (batch, steps, kv_heads * hd),
            "attention", f"q {q}, k {k}, v {v}")
    length = steps
    if past:
        _expect(len(past) == 2 and past[0].shape[:2] == (batch, kv_heads) and past[0].shape[3] == hd,
                "attention", f"past {past}")
        length = dim_add(past[0].shape[2], steps)
    present = q.with_shape(batch, kv_heads, length, hd)
    return q, present, present


# ---------------------------------------------------------------- memory layer, primitive steps (§2.1)


@register("query_conv", lambda i, o, a: (2 * o[0].numel * a["kernel"], _weight_bytes(i[1]) + _weight_bytes(i[2])))
def _query_conv(ins, attrs):
    """Causal depthwise conv: x'_t = sum_j weight[:, j] * x_{t-j} + bias; optional state (B,K-1,D) in, new state out."""
    x, weight, bias, *state = ins
    kernel = attrs["kernel"]
    _expect(weight.shape == (x.shape[-1], kernel) and bias.shape == x.shape[-1:], "query_conv", f"{weight}, {bias}")
    state_type = x.with_shape(x.shape[0], kernel - 1, x.shape[-1])
    _expect(not state or state[0] == state_type, "query_conv", f"state {state} (expected {state_type})")
    return x, state_type


@register("split_query")
def _split_query(ins, attrs):
    """(B,T,Hq*2*kd) -> row and column queries (B,T,H,kd) each; a shared query (Hq=1) is broadcast to H heads."""
    q = ins[0]
    hq, heads, kd = attrs["query_heads"], attrs["heads"], attrs["side_dim"]
    _expect(q.shape[-1] == hq * 2 * kd and hq in (1, heads), "split_query", f"{q} with {attrs}")
    side = q.with_shape(*q.shape[:-1], heads, kd)
    return side, side


@register("norm_keys", _norm_cost)
def _norm_keys(ins, attrs):
    """LayerNorm (weight, no bias) over the kd axis of keys (H,2,n,kd[,r]), every rank separately."""
    keys, weight = ins
    _expect(weight.shape == (keys.shape[3],), "norm_keys", f"{weight} for {keys}")
    return (keys,)


@register("key_side")
def _key_side(ins, attrs):
    """keys[:, side] -> (H,n,kd[,r])."""
    keys = ins[0]
    return (keys.with_shape(keys.shape[0], *keys.shape[2:]),)


def _scores_cost(ins, outs, attrs) -> tuple[int, int]:
    return 2 * outs[0].numel * ins[0].shape[-1], _weight_bytes(ins[1])


@register("rank_scores", _scores_cost)
def _rank_scores(ins, attrs):
    """S[b,t,h,k,r] = q[b,t,h,:] . K[h,k,:,r]."""
    q, keys = ins
    _expect(keys.rank == 4 and q.shape[-2:] == (keys.shape[0], keys.shape[2]), "rank_scores", f"{q}, {keys}")
    return (q.with_shape(*q.shape[:-1], keys.shape[1], keys.shape[3]),)


@register("key_scores", _scores_cost)
def _key_scores(ins, attrs):
    """s[b,t,h,k] = q[b,t,h,:] . K[h,k,:] (product keys, or coarse scores against rank-folded keys)."""
    q, keys = ins
    _expect(keys.rank == 3 and q.shape[-2:] == (keys.shape[0], keys.shape[2]), "key_scores", f"{q}, {keys}")
    return (q.with_shape(*q.shape[:-1], keys.shape[1]),)


@register("coarse_scores", lambda i, o, a: (2 * i[0].numel, 0))
def _coarse(ins, attrs):
    """s[...,k] = sum_r S[...,k,r] * u[h,r] with u (1,H,1,r): the rank-1 score."""
    scores, u = ins
    _expect(u.shape == (1, scores.shape[-3], 1, scores.shape[-1]), "coarse_scores", f"{scores}, {u}")
    return (scores.with_shape(*scores.shape[:-1]),)


@register("topm", lambda i, o, a: (i[0].numel, 0))
def _topm(ins, attrs):
    """The k largest along the last axis, descending: values and int64 indices."""
    x, k = ins[0], attrs["k"]
    _expect(isinstance(x.shape[-1], int) and k <= x.shape[-1], "topm", f"k={k} of {x}")
    return x.with_shape(*x.shape[:-1], k), TensorType("i64", (*x.shape[:-1], k))


@register("gather_rank_rows")
def _gather_rank_rows(ins, attrs):
    """S (B,T,H,n,r) at indices (B,T,H,m) -> (B,T,H,m,r)."""
    scores, index = ins
    _expect(index.shape == scores.shape[:-2] + index.shape[-1:], "gather_rank_rows", f"{scores}, {index}")
    return (scores.with_shape(*index.shape, scores.shape[-1]),)


@register("stack_cores")
def _stack_cores(ins, attrs):
    """h core tensors (H,r,r) -> (H,h,r,r)."""
    first = ins[0]
    _expect(all(c == first for c in ins), "stack_cores", f"cores differ: {ins}")
    return (first.with_shape(first.shape[0], len(ins), *first.shape[1:]),)


def _grid_cost(ins, outs, attrs) -> tuple[int, int]:
    rows, _, cores = ins
    m, r = rows.shape[-2], rows.shape[-1]
    tokens_heads = math.prod(rows.shape[:-2])
    return tokens_heads * cores.shape[1] * (2 * m * r * r + 2 * m * m * r), _weight_bytes(cores)


@register("tucker_grid", _grid_cost)
def _tucker_grid(ins, attrs):
    """G[..,c,i,j] = S_row[..,i,:] . C_c . S_col[..,j,:] for rows/cols (B,T,H,m,r), cores (H,h,r,r)."""
    rows, cols, cores = ins
    _expect(rows == cols and cores.shape[0] == rows.shape[2] and cores.shape[2:] == (rows.shape[-1],) * 2,
            "tucker_grid", f"{rows}, {cols}, {cores}")
    m = rows.shape[-2]
    return (rows.with_shape(*rows.shape[:3], cores.shape[1], m, m),)


@register("grid_select", lambda i, o, a: (2 * i[0].numel, 0))
def _grid_select(ins, attrs):
    """Top m of the summed m*m grid per head -> grid addresses I_r*n+I_c (B,T,H,m) and per-core scores (B,T,H,m,h)."""
    grid, i_row, i_col = ins
    m = grid.shape[-1]
    _expect(i_row == i_col and i_row.shape == grid.shape[:3] + (m,), "grid_select", f"{grid}, {i_row}")
    return i_row, grid.with_shape(*grid.shape[:3], m, grid.shape[3])


@register("additive_select", lambda i, o, a: (2 * i[0].numel * i[0].shape[-1], 0))
def _additive_select(ins, attrs):
    """Product keys: top m of s_row[i] + s_col[j] -> addresses (B,T,H,m) and scores (B,T,H,m,1)."""
    v_row, i_row, v_col, i_col = ins
    _expect(v_row == v_col and i_row == i_col and i_row.shape == v_row.shape, "additive_select", f"{ins}")
    return i_row, v_row.with_shape(*v_row.shape, 1)


@register("shuffle", lambda i, o, a: (0, o[0].numel * 8))
def _shuffle(ins, attrs):
    """IVE permutation: perm[address]."""
    address, perm = ins
    _expect(address.dtype == perm.dtype == "i64" and perm.rank == 1, "shuffle", f"{ins}")
    return (address,)


@register("ive_split", lambda i, o, a: (2 * i[0].numel, 0))
def _ive_split(ins, attrs):
    """Virtual address p -> physical row p mod N and virtual block p div N (attrs.N)."""
    return ins[0], ins[0]


def _gather_bytes(table: Operand, picks: int) -> int:
    row_bytes = table.nbytes // table.shape[0]
    return min(picks, table.shape[0]) * row_bytes


@register("gather_values", lambda i, o, a: (0, _gather_bytes(i[0], i[1].numel)))
def _gather_values(ins, attrs):
    """Value rows V[row] for rows (B,T,H,m) -> (B,T,H,m,vdim)."""
    table, rows = ins
    _expect(table.rank == 2 and rows.dtype == "i64", "gather_values", f"{ins}")
    return (table.with_shape(*rows.shape, table.shape[1]),)


@register("mcs_scale", _elementwise_cost)
def _mcs_scale(ins, attrs):
    """Multi-core scoring: slice c of each row (vdim/h wide) times that core's score."""
    rows, scores = ins
    _expect(scores.shape[:-1] == rows.shape[:-1] and rows.shape[-1] % scores.shape[-1] == 0, "mcs_scale", f"{ins}")
    return (rows,)


@register("scatter_blocks", lambda i, o, a: (i[0].numel, 0))
def _scatter_blocks(ins, attrs):
    """Sum weighted rows (B,T,H,m,vdim) into their virtual blocks -> (B,T,E,vdim)."""
    rows, block = ins
    _expect(block.shape == rows.shape[:-1], "scatter_blocks", f"{ins}")
    return (rows.with_shape(*rows.shape[:2], attrs["E"], rows.shape[-1]),)


@register("select_block")
def _select_block(ins, attrs):
    """P[..., e, :] -> (B,T,vdim)."""
    pooled = ins[0]
    return (pooled.with_shape(*pooled.shape[:-2], pooled.shape[-1]),)


@register("slice_cols")
def _slice_cols(ins, attrs):
    """W[:, start:stop]."""
    w = ins[0]
    return (w.with_shape(w.shape[0], attrs["stop"] - attrs["start"]),)


# ---------------------------------------------------------------- fused / folded ops (passes)


@register("fold_rank")
def _fold_rank(ins, attrs):
    """K_u[h,k,:] = sum_r u[h,r] K[h,k,:,r]: one coarse key matrix per side (keys (H,n,kd,r), u (1,H,1,r))."""
    keys, u = ins
    _expect(u.shape == (1, keys.shape[0], 1, keys.shape[3]), "fold_rank", f"{ins}")
    return (keys.with_shape(*keys.shape[:3]),)


def _gathered_keys_cost(ins, outs, attrs) -> tuple[int, int]:
    q, keys, index = ins
    rows = keys.shape[0] * keys.shape[1]
    return 2 * outs[0].numel * q.shape[-1], min(index.numel, rows) * (keys.nbytes // rows)


@register("gathered_rank_scores", _gathered_keys_cost)
def _gathered_rank_scores(ins, attrs):
    """S[b,t,h,i,r] = q[b,t,h,:] . K[h, index[b,t,h,i], :, r]: rank scores of the m winners only."""
    q, keys, index = ins
    _expect(index.shape[:-1] == q.shape[:-1] and keys.shape[0] == q.shape[-2], "gathered_rank_scores", f"{ins}")
    return (q.with_shape(*index.shape, keys.shape[3]),)


@register("scale_columns")
def _scale_columns(ins, attrs):
    """W diag(s): a norm's scale folded into the next projection."""
    w, scale = ins
    _expect(scale.shape == w.shape[1:], "scale_columns", f"{ins}")
    return (w,)


def _conv_proj_cost(wq_index: int) -> CostRule:
    """Conv (2*D*K per token, plus a norm's ~5*D) and one projection (2*Q*D per token)."""

    def cost(ins, outs, attrs) -> tuple[int, int]:
        x, wq = ins[0], ins[wq_index]
        tokens = x.numel // x.shape[-1]
        return tokens * (2 * x.shape[-1] * (attrs["kernel"] + 4) + 2 * wq.numel), sum(_weight_bytes(w) for w in ins[1:])

    return cost


def _conv_proj_types(op: str, x: TensorType, conv: TensorType, bias: TensorType, wq: TensorType,
                     state: list[TensorType], kernel: int) -> tuple[TensorType, TensorType]:
    width = x.shape[-1]
    _expect(conv.shape == (width, kernel) and bias.shape == (width,) and wq.shape[1] == width, op, f"{conv}, {bias}, {wq}")
    state_type = x.with_shape(x.shape[0], kernel - 1, width)
    _expect(not state or state[0] == state_type, op, f"state {state} (expected {state_type})")
    return x.with_shape(*x.shape[:-1], wq.shape[0]), state_type


@register("conv_query_proj", _conv_proj_cost(3))
def _conv_query_proj(ins, attrs):
    """q = Wq (sum_j conv[:, j] * h_{t-j} + bias): causal depthwise conv and query projection in one op.

    Inputs h, conv (D,K), bias (D), Wq (Q,D), optional state (B,K-1,D) of past h; outputs q and the new state.
    """
    x, conv, bias, wq, *state = ins
    return _conv_proj_types("conv_query_proj", x, conv, bias, wq, state, attrs["kernel"])


@register("norm_conv_query_proj", _conv_proj_cost(4))
def _norm_conv_query_proj(ins, attrs):
    """conv_query_proj of h = rms_norm(x) * norm weight: the model's norm scale, the conv and the projection in one op.

    Inputs x, norm weight (D), conv (D,K), bias (D), Wq (Q,D), optional state (B,K-1,D) of past h.
    """
    x, scale, conv, bias, wq, *state = ins
    _expect(scale.shape == x.shape[-1:], "norm_conv_query_proj", f"norm weight {scale}")
    return _conv_proj_types("norm_conv_query_proj", x, conv, bias, wq, state, attrs["kernel"])


@register("gather_pool", lambda i, o, a: (2 * i[1].numel * i[0].shape[1], _gather_bytes(i[0], i[1].numel)))
def _gather_pool(ins, attrs):
    """IVE pooling with MCS in one op: rows V[row], core-sliced scaling by scores, summed into E blocks -> (B,T,E*vdim)."""
    table, row, block, scores = ins
    _expect(row.shape == block.shape == scores.shape[:-1], "gather_pool", f"{ins}")
    return (table.with_shape(*row.shape[:2], attrs["E"] * table.shape[1]),)


# ---------------------------------------------------------------- concurrency markers (skip-layer overlap)


@register("fork")
def _fork(ins, attrs):
    """Identity that starts concurrent branch attrs.branch: everything downstream of it on that stream may run
    alongside the main stream."""
    return (ins[0],)


@register("join_add", _elementwise_cost)
def _join_add(ins, attrs):
    """Residual add that waits for branch attrs.branch: main + branch output."""
    return _add(ins, attrs)
