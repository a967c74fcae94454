"""The op registry: each op defined once (ONNX-schema style).

An ``OpDef`` carries everything every consumer needs: the doc, the operands (with the
value constraints a sampler honours and weight binding checks: "indices into that axis",
"a permutation"), the attribute schema (names, kinds, allowed values; checked whenever a
node is built and whenever a graph is read from JSON), the type rule, the cost rule and,
for every op that is not primitive, a decomposition into other ops written with the IR
builder. Primitive ops are the ones each backend implements directly; every other op can
be expanded, recursively, into primitives (``umc.ir.expand``). Selection ops (top-m)
also say which candidates they choose among, so equivalence checks can be tie-aware.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from umc.dtypes import BY_IR
from umc.ir.core import IRError, TensorType
from umc.ir.dims import Dim, DimError, is_dim, parse_dim

ATTR_KINDS = ("int", "float", "bool", "str", "dim", "dims", "ints", "dtype")


@dataclass(frozen=True)
class Attr:
    """One attribute: kind (``ATTR_KINDS``), allowed ``choices``, a ``minimum`` for ints; ``optional`` may be absent."""

    name: str
    kind: str
    choices: tuple = ()
    minimum: int | None = None
    optional: bool = False

    def __post_init__(self):
        if self.kind not in ATTR_KINDS:
            raise IRError(f"attribute {self.name}: unknown kind {self.kind!r} (allowed: {', '.join(ATTR_KINDS)})")

    def check(self, op: str, value: Any) -> Any:
        """The value, normalized (lists to tuples, dim text to dims); IRError naming the op and attribute."""
        where = f"{op}: attribute {self.name}"
        if self.kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and (self.minimum is None or value >= self.minimum)
            allowed = "an integer" + (f" >= {self.minimum}" if self.minimum is not None else "")
        elif self.kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300  # NaN fails too
            allowed = "a finite number"
        elif self.kind == "bool":
            ok, allowed = isinstance(value, bool), "true or false"
        elif self.kind == "str":
            ok, allowed = isinstance(value, str), "a string"
        elif self.kind == "dtype":
            ok, allowed = value in BY_IR, f"one of {', '.join(BY_IR)}"
        elif self.kind == "ints":
            value = tuple(value) if isinstance(value, (list, tuple)) else value
            ok = isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            allowed = "a list of integers"
        elif self.kind == "dim":
            try:
                value = parse_dim(value)
                ok = True
            except DimError:
                ok = False
            allowed = "a dim (an integer or a size expression such as S_past+1)"
        else:  # dims
            try:
                value = tuple(parse_dim(d) for d in value) if isinstance(value, (list, tuple)) else value
                ok = isinstance(value, tuple) and all(is_dim(d) for d in value)
            except DimError:
                ok = False
            allowed = "a list of dims (integers or size expressions such as B, S_past+1)"
        if ok and self.choices and value not in self.choices:
            ok, allowed = False, f"one of {', '.join(map(str, self.choices))}"
        if not ok:
            raise IRError(f"{where} is {value!r} (allowed: {allowed})")
        return value


@dataclass(frozen=True)
class Port:
    """An operand: ``optional``/``variadic`` arity, and what its values must be (for samplers and binding):
    ``index_of`` = (operand, axis) or (attribute,) or (a product of attributes "N*E",) — integers in [0, that
    size), ``distinct`` along the last
    axis when said (e.g. the winners of a top-m); ``permutation`` — a permutation of its own length;
    ``nonnegative`` — integers >= 0."""

    name: str
    optional: bool = False
    variadic: bool = False
    index_of: tuple = ()
    distinct: bool = False
    permutation: bool = False
    nonnegative: bool = False


def parse_ports(text: str) -> tuple[Port, ...]:
    """Ports from a compact list: ``"table, row: index table 0, i_row: distinct index n, perm: permutation, state?,
    cores*"``."""
    ports = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rule = (s.strip() for s in item.partition(":"))
        optional, variadic = name.endswith("?"), name.endswith("*")
        name = name.rstrip("?*")
        words = rule.split()
        port = Port(name, optional, variadic)
        if words[:1] == ["distinct"]:
            port, words = replace(port, distinct=True), words[1:]
        if words[:1] == ["index"]:
            port = replace(port, index_of=tuple(int(w) if w.lstrip("-").isdigit() else w for w in words[1:]))
        elif words == ["permutation"]:
            port = replace(port, permutation=True)
        elif words == ["nonnegative"]:
            port = replace(port, nonnegative=True)
        elif words:
            raise IRError(f"cannot read operand rule {item!r}")
        ports.append(port)
    return tuple(ports)


@dataclass(frozen=True)
class Concrete:
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


TypeRule = Callable[[tuple[TensorType, ...], dict[str, Any]], tuple[TensorType, ...]]
CostRule = Callable[[tuple[Concrete, ...], tuple[Concrete, ...], dict[str, Any]], tuple[int, int]]
Decomposition = Callable[..., tuple]  # (builder, inputs, attrs) -> output values


@dataclass(frozen=True)
class Selection:
    """What a selection op chooses among: ``candidates(builder, inputs, attrs)`` emits the candidate scores
    and candidate ids (same shape, ids along the last axis), and output ``chosen`` holds the chosen ids."""

    chosen: int
    candidates: Decomposition


@dataclass(frozen=True)
class OpDef:
    """One op, defined once: doc, operands, outputs, attribute schema, type rule, cost rule, decomposition."""

    name: str
    doc: str
    inputs: tuple[Port, ...]
    outputs: tuple[str, ...]
    attrs: tuple[Attr, ...]
    infer: TypeRule
    cost: CostRule
    decompose: Decomposition | None = None
    selection: Selection | None = None

    @property
    def primitive(self) -> bool:
        """True when backends implement the op directly (it has no decomposition)."""
        return self.decompose is None


OPS: dict[str, OpDef] = {}


def free(ins, outs, attrs) -> tuple[int, int]:
    """Cost rule of ops that move no data and do no arithmetic worth counting."""
    return 0, 0


def elementwise(ins, outs, attrs) -> tuple[int, int]:
    """One FLOP per output element."""
    return outs[0].numel, 0


def weight_bytes(operand: Concrete) -> int:
    """Bytes of an operand if it is a weight (read from memory every call), else 0."""
    return operand.nbytes if operand.weight else 0


def op(name: str, inputs: str, outputs: str, attrs: tuple[Attr, ...] = (), cost: CostRule = free):
    """Decorator: register a type rule (its docstring is the op's doc) as op ``name``."""

    def wrap(infer: TypeRule) -> TypeRule:
        if name in OPS:
            raise IRError(f"op {name} registered twice")
        OPS[name] = OpDef(name, (infer.__doc__ or "").strip(), parse_ports(inputs),
                          tuple(o.strip() for o in outputs.split(",")), tuple(attrs), infer, cost)
        return infer

    return wrap


def decomposition(name: str):
    """Decorator: ``fn(builder, inputs, attrs) -> outputs`` is op ``name``'s decomposition (once per op)."""

    def wrap(fn: Decomposition) -> Decomposition:
        if OPS[name].decompose is not None:
            raise IRError(f"op {name} has two decompositions")
        OPS[name] = replace(OPS[name], decompose=fn)
        return fn

    return wrap


def selection(name: str, chosen: int):
    """Decorator: ``fn(builder, inputs, attrs) -> (scores, ids)`` names op ``name``'s candidates."""

    def wrap(fn: Decomposition) -> Decomposition:
        if OPS[name].selection is not None:
            raise IRError(f"op {name} has two candidate definitions")
        OPS[name] = replace(OPS[name], selection=Selection(chosen, fn))
        return fn

    return wrap


def lookup(name: str) -> OpDef:
    """The definition of op ``name`` (IRError naming the known ops if there is none)."""
    if name not in OPS:
        raise IRError(f"unknown op {name!r} (known: {', '.join(sorted(OPS))})")
    return OPS[name]


def check_arity(opdef: OpDef, count: int) -> None:
    """IRError unless ``count`` operands fit the op's ports."""
    required = sum(1 for p in opdef.inputs if not p.optional and not p.variadic)
    variadic = any(p.variadic for p in opdef.inputs)
    most = math.inf if variadic else len(opdef.inputs)
    if not required <= count <= most:
        shown = "or more" if variadic else f"to {len(opdef.inputs)}"
        raise IRError(f"{opdef.name}: {count} operands (allowed: {required} {shown}: "
                      f"{', '.join(p.name for p in opdef.inputs)})")


def check_attrs(name: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes checked against op ``name``'s schema and normalized; IRError names the problem."""
    opdef = lookup(name)
    schema = {a.name: a for a in opdef.attrs}
    unknown = sorted(set(attrs) - set(schema))
    if unknown:
        raise IRError(f"{name}: unknown attribute {unknown[0]} (allowed: {', '.join(schema) or 'none'})")
    missing = [a.name for a in opdef.attrs if not a.optional and a.name not in attrs]
    if missing:
        raise IRError(f"{name}: missing attribute {missing[0]}")
    return {key: schema[key].check(name, value) for key, value in attrs.items()}


def infer_types(name: str, inputs: tuple[TensorType, ...], attrs: dict[str, Any]) -> tuple[TensorType, ...]:
    """Output types of op ``name`` applied to ``inputs`` (IRError if the op, its attributes or its inputs do not fit)."""
    opdef = lookup(name)
    check_arity(opdef, len(inputs))
    attrs = check_attrs(name, attrs)
    try:
        types = opdef.infer(inputs, attrs)
    except (IndexError, ValueError, TypeError, ArithmeticError, DimError) as exc:
        if isinstance(exc, IRError):
            raise
        raise IRError(f"{name}: inputs {', '.join(map(str, inputs))} do not fit ({exc})") from None
    if len(types) != len(opdef.outputs):
        raise IRError(f"{name}: type rule gave {len(types)} outputs, the op declares {len(opdef.outputs)}")
    return tuple(types)


def expect(cond: bool, name: str, problem: str) -> None:
    """IRError ``name: problem`` unless ``cond``."""
    if not cond:
        raise IRError(f"{name}: {problem}")


def broadcast(name: str, a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """numpy broadcasting of two shapes (dims equal, or one of them 1)."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        expect(x == y or x == 1 or y == 1, name, f"shapes {list(map(str, a))} and {list(map(str, b))} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


def axis_of(rank: int, axis: int, name: str) -> int:
    """A possibly negative axis as an index in [0, rank)."""
    expect(-rank <= axis < rank, name, f"axis {axis} out of range for rank {rank}")
    return axis % rank
