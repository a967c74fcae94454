"""Generic tensor ops. Most are primitives (each maps to one standard ONNX op); a few decompose.

Elementwise binary ops broadcast like numpy; operands of one op share a dtype (``cast``
changes it). Shape-valued attributes are dims, so ``reshape``/``expand``/``slice`` work on
symbolic sizes and bind them by name when a graph runs.
"""

from __future__ import annotations

from umc.ir.core import TensorType
from umc.ir.dims import dim_add, dim_prod
from umc.ir.ops.registry import Attr, axis_of, broadcast, decomposition, elementwise, expect, op, selection


def _same_dtype(name: str, *types: TensorType) -> None:
    expect(len({t.dtype for t in types}) == 1, name, f"operand dtypes differ: {', '.join(str(t) for t in types)}")


def _binary(name: str):
    def infer(ins, attrs):
        a, b = ins
        _same_dtype(name, a, b)
        return (TensorType(a.dtype, broadcast(name, a.shape, b.shape)),)

    infer.__doc__ = f"Elementwise {name} with numpy broadcasting."
    return infer


def _unary(text: str):
    def infer(ins, attrs):
        return (ins[0],)

    infer.__doc__ = f"{text}, elementwise."
    return infer


INT_VALUE, FLOAT_VALUE = Attr("value", "int", minimum=1), Attr("value", "float")
SCALAR_OPS = {"add_scalar": ("x + value", FLOAT_VALUE), "mul_scalar": ("x * value", FLOAT_VALUE),
              "floordiv_scalar": ("floor(x / value), integers", INT_VALUE),
              "mod_scalar": ("x mod value (the sign of value), integers", INT_VALUE)}
UNARY_OPS = {"rsqrt": (1, "1 / sqrt(x)"), "sigmoid": (4, "1 / (1 + exp(-x))"), "relu": (1, "max(x, 0)"),
             "gelu": (8, "x * Phi(x), the exact (erf) GELU")}


def _register_elementwise() -> None:
    """The elementwise primitives, from the tables above."""
    for name in ("add", "mul"):
        op(name, "a, b", "out", cost=elementwise)(_binary(name))
    for name, (text, value) in SCALAR_OPS.items():
        op(name, "x", "out", (value,), cost=elementwise)(_unary(text))
    for name, (flops, text) in UNARY_OPS.items():
        op(name, "x", "out", cost=lambda i, o, a, f=flops: (f * o[0].numel, 0))(_unary(text))


_register_elementwise()


@op("silu", "x", "out", cost=lambda i, o, a: (5 * o[0].numel, 0))
def _silu(ins, attrs):
    """x * sigmoid(x)."""
    return (ins[0],)


@decomposition("silu")
def _silu_parts(b, ins, attrs):
    (x,) = ins
    return (b.one("mul", x, b.one("sigmoid", x)),)


@op("softmax", "x", "out", (Attr("axis", "int"),), cost=lambda i, o, a: (5 * o[0].numel, 0))
def _softmax(ins, attrs):
    """Softmax over ``axis``."""
    axis_of(ins[0].rank, attrs["axis"], "softmax")
    return (ins[0],)


def _reduce(name: str):
    def infer(ins, attrs):
        x = ins[0]
        axes = {axis_of(x.rank, a, name) for a in attrs["axes"]}
        keep = attrs["keepdim"]
        return (x.with_shape(*[1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes]),)

    infer.__doc__ = f"{name.capitalize()} over ``axes`` (kept as size 1 with ``keepdim``)."
    return infer


for reduction in ("sum", "mean"):
    op(reduction, "x", "out", (Attr("axes", "ints"), Attr("keepdim", "bool")),
       cost=lambda i, o, a: (i[0].numel, 0))(_reduce(reduction))


@op("reshape", "x", "out", (Attr("shape", "dims"),))
def _reshape(ins, attrs):
    """The same elements in ``shape``; symbolic sizes are bound by name (``[T, B, 4]`` of a (B, T, 4) input
    has T rows of B)."""
    x, target = ins[0], attrs["shape"]
    expect(dim_prod(x.shape) == dim_prod(target), "reshape", f"{x} cannot become [{', '.join(map(str, target))}]")
    return (x.with_shape(*target),)


@op("transpose", "x", "out", (Attr("perm", "ints"),))
def _transpose(ins, attrs):
    """Axes permuted: output axis i is input axis perm[i]."""
    x, perm = ins[0], attrs["perm"]
    expect(sorted(perm) == list(range(x.rank)), "transpose", f"perm {list(perm)} for rank {x.rank}")
    return (x.with_shape(*[x.shape[p] for p in perm]),)


@op("expand", "x", "out", (Attr("shape", "dims"),))
def _expand(ins, attrs):
    """Broadcast to ``shape`` (each input dim equal to the target's, or 1)."""
    x, target = ins[0], attrs["shape"]
    expect(x.rank <= len(target) and broadcast("expand", x.shape, target) == tuple(target), "expand",
           f"{x} does not broadcast to [{', '.join(map(str, target))}]")
    return (x.with_shape(*target),)


@op("slice", "x", "out", (Attr("axis", "int"), Attr("start", "dim"), Attr("stop", "dim")))
def _slice(ins, attrs):
    """x[start:stop] along ``axis`` (start and stop are dims, possibly symbolic)."""
    x = ins[0]
    axis = axis_of(x.rank, attrs["axis"], "slice")
    start, stop = attrs["start"], attrs["stop"]
    length = stop - start
    expect(not isinstance(length, int) or length >= 0, "slice", f"{start}:{stop} is empty or reversed")
    return (x.with_shape(*x.shape[:axis], length, *x.shape[axis + 1:]),)


@op("concat", "parts*", "out", (Attr("axis", "int"),))
def _concat(ins, attrs):
    """Operands joined along ``axis``."""
    first = ins[0]
    axis = axis_of(first.rank, attrs["axis"], "concat")
    _same_dtype("concat", *ins)
    expect(all(t.rank == first.rank and t.shape[:axis] == first.shape[:axis] and t.shape[axis + 1:] == first.shape[axis + 1:]
               for t in ins), "concat", f"operands {', '.join(map(str, ins))} differ off axis {axis}")
    total = 0
    for t in ins:
        total = dim_add(total, t.shape[axis])
    return (first.with_shape(*first.shape[:axis], total, *first.shape[axis + 1:]),)


@op("cast", "x", "out", (Attr("to", "dtype"),), cost=elementwise)
def _cast(ins, attrs):
    """x converted to dtype ``to`` (round to nearest even)."""
    return (ins[0].with_dtype(attrs["to"]),)


def _matmul_cost(ins, outs, attrs):
    return 2 * outs[0].numel * ins[0].shape[-1], 0


@op("matmul", "a, b", "out", cost=_matmul_cost)
def _matmul(ins, attrs):
    """Batched a @ b: (..., M, K) @ (..., K, N) -> (..., M, N), batch dims broadcast."""
    a, b = ins
    _same_dtype("matmul", a, b)
    expect(a.rank >= 2 and b.rank >= 2 and a.shape[-1] == b.shape[-2], "matmul", f"{a} @ {b}")
    batch = broadcast("matmul", a.shape[:-2], b.shape[:-2])
    return (a.with_shape(*batch, a.shape[-2], b.shape[-1]),)


@op("gather", "data, index: index data axis", "out", (Attr("axis", "int"),))
def _gather(ins, attrs):
    """data indexed along ``axis`` by integer ``index``: shape data[:axis] + index + data[axis+1:]."""
    data, index = ins
    axis = axis_of(data.rank, attrs["axis"], "gather")
    expect(index.dtype == "i64", "gather", f"index {index} is not i64")
    return (data.with_shape(*data.shape[:axis], *index.shape, *data.shape[axis + 1:]),)


@op("take_along", "data, index: index data axis", "out", (Attr("axis", "int"),))
def _take_along(ins, attrs):
    """out[..., i, ...] = data[..., index[..., i, ...], ...] along ``axis`` (index of data's rank; its shape)."""
    data, index = ins
    axis = axis_of(data.rank, attrs["axis"], "take_along")
    expect(index.dtype == "i64" and index.rank == data.rank, "take_along", f"index {index} for {data}")
    return (data.with_shape(*index.shape),)


@op("one_hot", "index: index depth", "out", (Attr("depth", "int", minimum=1), Attr("dtype", "dtype")))
def _one_hot(ins, attrs):
    """1 at position index of a new last axis of size ``depth``, 0 elsewhere, in ``dtype``."""
    index = ins[0]
    expect(index.dtype == "i64", "one_hot", f"index {index} is not i64")
    return (TensorType(attrs["dtype"], (*index.shape, attrs["depth"])),)


@op("zeros", "", "out", (Attr("shape", "dims"), Attr("dtype", "dtype")))
def _zeros(ins, attrs):
    """A tensor of zeros."""
    return (TensorType(attrs["dtype"], tuple(attrs["shape"])),)


@op("iota", "", "out", (Attr("shape", "dims"), Attr("axis", "int")))
def _iota(ins, attrs):
    """i64 tensor of ``shape`` whose value is each element's index along ``axis``."""
    axis_of(len(attrs["shape"]), attrs["axis"], "iota")
    return (TensorType("i64", tuple(attrs["shape"])),)


@op("topm", "x", "values, indices", (Attr("k", "int", minimum=1),), cost=lambda i, o, a: (i[0].numel, 0))
def _topm(ins, attrs):
    """The k largest along the last axis, descending: values and i64 indices (ties: any order)."""
    x, k = ins[0], attrs["k"]
    expect(isinstance(x.shape[-1], int) and k <= x.shape[-1], "topm", f"k={k} of {x}")
    return x.with_shape(*x.shape[:-1], k), TensorType("i64", (*x.shape[:-1], k))


@selection("topm", chosen=1)
def _topm_candidates(b, ins, attrs):
    (x,) = ins
    return x, b.one("iota", shape=x.shape, axis=x.rank - 1)


@op("fork", "x", "out", (Attr("branch", "int", minimum=1),))
def _fork(ins, attrs):
    """Identity that starts concurrent branch ``branch``: the nodes on that stream may run alongside the main
    stream, reading only values defined before the fork."""
    return (ins[0],)


@op("join_add", "main, branch", "out", (Attr("branch", "int", minimum=1),), cost=elementwise)
def _join_add(ins, attrs):
    """Residual add that waits for branch ``branch``: main + branch output (same shapes)."""
    expect(ins[0] == ins[1], "join_add", f"operands differ: {ins[0]} and {ins[1]}")
    return (ins[0],)


@decomposition("join_add")
def _join_add_parts(b, ins, attrs):
    return (b.one("add", *ins),)
