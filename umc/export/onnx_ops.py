"""ONNX lowerings of the primitive IR ops, keyed by op name: each writes standard ONNX ops (opset 21).

Every primitive has one; composite ops reach ONNX through their decompositions. Each lowering is
checked against the graph backend's torch implementation on sampled operands (tests), so the two
definitions of a primitive are compared, never copied. Values of float16/bfloat16 go through
float32 where standard ops lack those types (TopK, Cos/Sin): exact casts, no rounding added.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, numpy_helper

from umc.export.onnx_emit import Lowering, OnnxScope
from umc.registry import registrar

ONNX_LOWERINGS: dict[str, Lowering] = {}
lowering = registrar(ONNX_LOWERINGS, "ONNX lowerings")  # @lowering(op): fn(scope, names, attrs, in_types, out_types)

SAME = {"add": "Add", "mul": "Mul", "sigmoid": "Sigmoid", "relu": "Relu", "matmul": "MatMul", "fork": "Identity"}


def _simple(onnx_op: str) -> Lowering:
    return lambda s, xs, attrs, ins, outs: s.node(onnx_op, xs)


for _op, _onnx in SAME.items():
    lowering(_op)(_simple(_onnx))


@lowering("add_scalar")
def _add_scalar(s: OnnxScope, xs, attrs, ins, outs):
    return [s.op("Add", xs[0], s.scalar(attrs["value"], ins[0].dtype))]


@lowering("mul_scalar")
def _mul_scalar(s: OnnxScope, xs, attrs, ins, outs):
    return [s.op("Mul", xs[0], s.scalar(attrs["value"], ins[0].dtype))]


@lowering("mod_scalar")
def _mod_scalar(s: OnnxScope, xs, attrs, ins, outs):
    """Integer remainder with the divisor's sign (Mod with fmod=0), as torch.remainder."""
    return [s.op("Mod", xs[0], s.scalar(attrs["value"], ins[0].dtype), fmod=0)]


@lowering("floordiv_scalar")
def _floordiv_scalar(s: OnnxScope, xs, attrs, ins, outs):
    """Floor division by a positive integer: (x - x mod c) / c is exact, where Div alone truncates toward zero."""
    divisor = s.scalar(attrs["value"], ins[0].dtype)
    return [s.op("Div", s.op("Sub", xs[0], s.op("Mod", xs[0], divisor, fmod=0)), divisor)]


@lowering("rsqrt")
def _rsqrt(s: OnnxScope, xs, attrs, ins, outs):
    return [s.op("Reciprocal", s.op("Sqrt", xs[0]))]


@lowering("gelu")
def _gelu(s: OnnxScope, xs, attrs, ins, outs):
    """Exact GELU: x * (1 + erf(x / sqrt 2)) / 2."""
    x, dtype = xs[0], ins[0].dtype
    erf = s.op("Erf", s.op("Mul", x, s.scalar(1 / math.sqrt(2), dtype)))
    return [s.op("Mul", s.op("Mul", x, s.scalar(0.5, dtype)), s.op("Add", erf, s.scalar(1.0, dtype)))]


@lowering("softmax")
def _softmax(s: OnnxScope, xs, attrs, ins, outs):
    return s.node("Softmax", xs, axis=attrs["axis"])


def _reduce(onnx_op: str) -> Lowering:
    return lambda s, xs, attrs, ins, outs: s.node(onnx_op, [xs[0], s.ints(attrs["axes"])], keepdims=int(attrs["keepdim"]))


lowering("sum")(_reduce("ReduceSum"))
lowering("mean")(_reduce("ReduceMean"))


@lowering("reshape")
def _reshape(s: OnnxScope, xs, attrs, ins, outs):
    return s.node("Reshape", [xs[0], s.reshape_target(ins[0].shape, attrs["shape"])])


@lowering("transpose")
def _transpose(s: OnnxScope, xs, attrs, ins, outs):
    return s.node("Transpose", xs, perm=list(attrs["perm"]))


@lowering("expand")
def _expand(s: OnnxScope, xs, attrs, ins, outs):
    return s.node("Expand", [xs[0], s.shape(attrs["shape"])])


def _bound(s: OnnxScope, bound, length) -> str:
    """A Slice bound: a constant when it is one, or when it sits a constant distance before the axis' end
    (counted from the end, so shape inference sees it); else computed from the inputs' shapes."""
    if isinstance(bound, int):
        return s.ints([bound])
    before_end = length - bound
    if isinstance(before_end, int) and before_end > 0:
        return s.ints([-before_end])
    if isinstance(before_end, int) and before_end == 0:
        return s.ints([np.iinfo(np.int64).max])
    return s.size(bound)


@lowering("slice")
def _slice(s: OnnxScope, xs, attrs, ins, outs):
    """Slice; a constant-length slice of an axis of symbolic length is reshaped to its static shape (a no-op
    that lets shape inference know the length)."""
    length = ins[0].shape[attrs["axis"]]
    part = s.op("Slice", xs[0], _bound(s, attrs["start"], length), _bound(s, attrs["stop"], length),
                s.ints([attrs["axis"]]))
    if isinstance(outs[0].shape[attrs["axis"]], int) and not isinstance(length, int):
        return s.node("Reshape", [part, s.reshape_target(outs[0].shape, outs[0].shape)])
    return [part]


@lowering("concat")
def _concat(s: OnnxScope, xs, attrs, ins, outs):
    return s.node("Concat", xs, axis=attrs["axis"])


@lowering("cast")
def _cast(s: OnnxScope, xs, attrs, ins, outs):
    return s.node("Cast", xs, to=s.element_type(attrs["to"]))


@lowering("gather")
def _gather(s: OnnxScope, xs, attrs, ins, outs):
    return s.node("Gather", xs, axis=attrs["axis"])


@lowering("take_along")
def _take_along(s: OnnxScope, xs, attrs, ins, outs):
    return s.node("GatherElements", xs, axis=attrs["axis"])


@lowering("one_hot")
def _one_hot(s: OnnxScope, xs, attrs, ins, outs):
    """index == arange(depth) on a new last axis, cast to the dtype (no OneHot: it is not typed for every float)."""
    positions = s.op("Range", s.constant(np.array(0, np.int64)), s.constant(np.array(attrs["depth"], np.int64)),
                      s.constant(np.array(1, np.int64)))
    hit = s.op("Equal", s.op("Unsqueeze", xs[0], s.ints([-1])), positions)
    return s.node("Cast", [hit], to=s.element_type(attrs["dtype"]))


@lowering("zeros")
def _zeros(s: OnnxScope, xs, attrs, ins, outs):
    zero = np.zeros((1,), dtype=s.numpy_dtype(attrs["dtype"]))
    return s.node("ConstantOfShape", [s.shape(attrs["shape"])], value=numpy_helper.from_array(zero, s.fresh("zero")))


@lowering("iota")
def _iota(s: OnnxScope, xs, attrs, ins, outs):
    """Each element's index along ``axis``: a Range shaped to broadcast along that axis, expanded."""
    shape, axis = attrs["shape"], attrs["axis"] % len(attrs["shape"])
    steps = s.op("Range", s.constant(np.array(0, np.int64)), s.op("Squeeze", s.size(shape[axis]), s.ints([0])),
                  s.constant(np.array(1, np.int64)))
    along = s.op("Reshape", steps, s.reshape_target((shape[axis],), tuple(d if i == axis else 1 for i, d in enumerate(shape))))
    return s.node("Expand", [along, s.shape(shape)])


@lowering("topm")
def _topm(s: OnnxScope, xs, attrs, ins, outs):
    """TopK, largest first; float16/bfloat16 scores ranked in float32 (an exact cast both ways)."""
    x, k = xs[0], s.ints([attrs["k"]])
    wide = s.element_type(ins[0].dtype) in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    values, indices = s.node("TopK", [s.op("Cast", x, to=TensorProto.FLOAT) if wide else x, k], 2,
                             axis=-1, largest=1, sorted=1)
    if wide:
        values = s.op("Cast", values, to=s.element_type(ins[0].dtype))
    return [values, indices]


@lowering("layer_norm")
def _layer_norm(s: OnnxScope, xs, attrs, ins, outs):
    return s.node("LayerNormalization", xs, axis=-1, epsilon=attrs["eps"])


def _rope(s: OnnxScope, x: str, cos: str, sin: str, half: int) -> str:
    """Rotate-half RoPE of x (B, heads, T, hd): x * cos + cat(-x[..., half:], x[..., :half]) * sin."""
    last = s.ints([-1])
    upper = s.op("Slice", x, s.ints([half]), s.ints([2 * half]), last)
    lower = s.op("Slice", x, s.ints([0]), s.ints([half]), last)
    rotated = s.op("Concat", s.op("Neg", upper), lower, axis=-1)
    return s.op("Add", s.op("Mul", x, cos), s.op("Mul", rotated, sin))


@lowering("attention")
def _attention(s: OnnxScope, xs, attrs, ins, outs):
    """Causal grouped-query attention with RoPE at positions past..past+T-1 (per sequence, past_len[b].., in a ragged
    batch); keys and values appended to the past.

    Shapes: q (B,T,H*hd), k/v (B,T,kv*hd), past k/v (B,kv,S,hd), past_len (B,). The rotation angles are computed
    in float32 and cast to the values' dtype, the scores divided by sqrt(hd), masked where key position > query
    position (and, ragged, where a key is padding before the sequence's past).
    """
    q, k, v, *past = xs
    lengths = past[2] if len(past) == 3 else None
    heads, kv_heads, hd = attrs["n_heads"], attrs["n_kv_heads"], attrs["head_dim"]
    dtype, half = ins[0].dtype, hd // 2
    zero, one = s.constant(np.array(0, np.int64)), s.constant(np.array(1, np.int64))
    start = s.op("Shape", past[0], start=2, end=3) if past else s.ints([0])
    steps = s.op("Shape", q, start=1, end=2)
    scalar = lambda t: s.op("Squeeze", t, s.ints([0]))
    new = s.op("Range", zero, scalar(steps), one)  # (T,)
    at = s.op("Add", new, start) if lengths is None else s.op("Add", s.op("Unsqueeze", lengths, s.ints([1])), new)
    inverse = np.power(np.float32(attrs["rope_theta"]), -np.arange(half, dtype=np.float32) / np.float32(half))
    phase = s.op("Mul", s.op("Unsqueeze", s.op("Cast", at, to=TensorProto.FLOAT), s.ints([-1])),
                 s.constant(inverse.astype(np.float32)))  # (T, hd/2) or (B, T, hd/2)
    if lengths is not None:
        phase = s.op("Unsqueeze", phase, s.ints([1]))  # (B, 1, T, hd/2): per sequence, every head
    to_dtype = lambda t: s.op("Cast", t, to=s.element_type(dtype))
    cos = to_dtype(s.op("Concat", s.op("Cos", phase), s.op("Cos", phase), axis=-1))
    sin = to_dtype(s.op("Concat", s.op("Sin", phase), s.op("Sin", phase), axis=-1))
    split = lambda t, n: s.op("Transpose", s.op("Reshape", t, s.ints([0, 0, n, hd])), perm=[0, 2, 1, 3])
    q_heads = _rope(s, split(q, heads), cos, sin, half)
    keys = _rope(s, split(k, kv_heads), cos, sin, half)
    values = split(v, kv_heads)
    if past:
        keys = s.op("Concat", past[0], keys, axis=2)
        values = s.op("Concat", past[1], values, axis=2)
    batch, length = ins[0].shape[:2]
    grouped = s.op("Reshape", q_heads, s.reshape_target((batch, heads, length, hd),
                                                        (batch, kv_heads, heads // kv_heads, length, hd)))
    keys_5d, values_5d = (s.op("Unsqueeze", t, s.ints([2])) for t in (keys, values))
    scores = s.op("Div", s.op("MatMul", grouped, s.op("Transpose", keys_5d, perm=[0, 1, 2, 4, 3])),
                  s.scalar(math.sqrt(hd), dtype))
    total = s.op("Shape", keys, start=2, end=3)
    key_at = s.op("Range", zero, scalar(total), one)
    visible = s.op("LessOrEqual", key_at, s.op("Unsqueeze", s.op("Add", new, start), s.ints([1])))  # (T, S)
    if lengths is not None:
        first = s.op("Reshape", s.op("Sub", start, lengths), s.ints([-1, 1, 1]))  # (B, 1, 1)
        visible = s.op("Unsqueeze", s.op("And", visible, s.op("GreaterOrEqual", key_at, first)), s.ints([1, 2]))
    masked = s.op("Where", visible, scores, s.scalar(-math.inf, dtype))
    weights = s.op("Softmax", masked, axis=-1)
    out = s.op("Reshape", s.op("MatMul", weights, values_5d),
               s.reshape_target((batch, kv_heads, heads // kv_heads, length, hd), (batch, heads, length, hd)))
    merged = s.op("Reshape", s.op("Transpose", out, perm=[0, 2, 1, 3]), s.ints([0, 0, heads * hd]))
    return [merged, keys, values]
