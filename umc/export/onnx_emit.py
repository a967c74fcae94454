"""Writing IR ops as ONNX nodes: one ``OnnxScope`` per ONNX graph or function body being written.

A scope speaks the IR builder's language (``emit``/``one``), so an op's decomposition can be
emitted straight into ONNX: primitive ops go through their lowering (``umc.export.onnx_ops``),
memory-layer ops become nodes in domain ``umc`` whose model-local function is the op's own
decomposition (``FunctionTable``), and the remaining composite ops (linear, norms, silu) are
expanded in place into standard ops. Symbolic sizes (B, T, S_past) are read off the shapes of
the scope's inputs at run time, so every exported model takes any batch and length.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from umc.dtypes import BY_IR
from umc.ir.core import IRError, TensorType, Value
from umc.ir.dims import Sym, format_dim
from umc.ir.expand import decompose
from umc.ir.ops import check_attrs, infer_types, lookup

DOMAIN = "umc"
OPSET = 21  # standard ops up to ONNX opset 21 (ONNX Runtime, TensorRT >= 10.10)
MEMORY_OP_MODULES = ("umc.ir.ops.memory", "umc.ir.ops.fused", "umc.ir.ops.kernels")

Lowering = Callable[..., list[str]]  # (scope, input names, attrs, input types, output types) -> output names


def is_memory_op(op: str) -> bool:
    """True for the memory-layer ops (defined in the memory, fused and kernel families): they become ``umc``
    nodes with a local function; dense composites are expanded into standard ops instead."""
    definition = lookup(op)
    return not definition.primitive and definition.infer.__module__ in MEMORY_OP_MODULES


def numpy_dtype_of(ir: str) -> np.dtype:
    """The numpy dtype of an IR element type (bfloat16 through ml_dtypes, which onnx depends on)."""
    if ir == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(BY_IR[ir].torch_name)


def node_attribute_value(kind: str, value: Any) -> Any:
    """An IR attribute as an ONNX attribute value (dims that are not integers as their text)."""
    if kind == "bool":
        return int(value)
    if kind == "dim":
        return value if isinstance(value, int) else format_dim(value)
    if kind == "dims":
        return list(value) if all(isinstance(d, int) for d in value) else [format_dim(d) for d in value]
    if kind == "ints":
        return list(value)
    return value


class FunctionTable:
    """The model-local functions of one model: one per (memory op, operand types, attributes), named by the op in
    domain ``umc``, so a plugin binds by op name. A second specialization of an op is told apart by ``overload``
    (ONNX IR version 10); ONNX Runtime 1.32 resolves overloads only on graph nodes, not inside function bodies,
    so inside a body such a specialization is expanded in place instead of called."""

    def __init__(self, compute: str | None):
        self.compute = compute
        self.functions: dict[tuple, onnx.FunctionProto] = {}

    @staticmethod
    def key(op: str, input_types: tuple[TensorType, ...], attrs: dict[str, Any]) -> tuple:
        """What tells one specialization of ``op`` from another."""
        return op, input_types, tuple(sorted(attrs.items()))

    def overload_of(self, key: tuple) -> str:
        """The overload name the specialization ``key`` has, or would get: "" for an op's first one."""
        if key in self.functions:
            return self.functions[key].overload
        count = sum(1 for k in self.functions if k[0] == key[0])
        return f"v{count}" if count else ""

    def function(self, op: str, input_types: tuple[TensorType, ...], attrs: dict[str, Any]) -> str:
        """The overload name of ``op``'s function for these operands, written on first use."""
        key = self.key(op, input_types, attrs)
        if key not in self.functions:
            overload = self.overload_of(key)
            body = OnnxScope(self, f"{op}.")
            inputs = [body.input(f"in{i}", t) for i, t in enumerate(input_types)]
            outs = decompose(body, op, tuple(inputs), attrs)
            names = [body.output_name(v, name) for v, name in zip(outs, lookup(op).outputs)]
            self.functions[key] = helper.make_function(
                DOMAIN, op, [f"in{i}" for i in range(len(inputs))], names, body.nodes,
                [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                attributes=sorted(a.name for a in lookup(op).attrs), doc_string=lookup(op).doc, overload=overload)
        return self.functions[key].overload


class OnnxScope:
    """The nodes of one ONNX graph or function body, written from IR values and ops."""

    def __init__(self, functions: FunctionTable, prefix: str = "", first_id: int = 1 << 40):
        self.functions = functions
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.names: dict[int, str] = {}
        self.symbols: dict[str, tuple[str, int]] = {}
        self.dims: dict[Any, str] = {}
        self.count = 0
        self.next_id = first_id

    # ---------------------------------------------------------------- names and types

    def fresh(self, hint: str) -> str:
        """A new value name."""
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def element_type(self, ir: str) -> int:
        """The ONNX element type of an IR dtype (low-precision floats as float32 in a float32-compute model)."""
        if self.functions.compute and BY_IR[ir].floating and ir != "f64":
            ir = self.functions.compute
        return getattr(onnx.TensorProto, BY_IR[ir].onnx)

    def numpy_dtype(self, ir: str) -> np.dtype:
        """The numpy dtype of values of IR dtype ``ir`` in this model."""
        if self.functions.compute and BY_IR[ir].floating and ir != "f64":
            ir = self.functions.compute
        return numpy_dtype_of(ir)

    def input(self, name: str, type_: TensorType, value: Value | None = None) -> Value:
        """Declare an input of this scope called ``name``; its bare symbolic dims become readable sizes."""
        value = value or self._value(type_)
        self.names[value.id] = name
        for axis, d in enumerate(type_.shape):
            if isinstance(d, Sym) and len(d.symbols) == 1 and d == Sym.of(next(iter(d.symbols))):
                self.symbols.setdefault(next(iter(d.symbols)), (name, axis))
        return value

    def name(self, value: Value) -> str:
        """The ONNX name of an IR value written in this scope."""
        return self.names[value.id]

    def output_name(self, value: Value, name: str) -> str:
        """Name ``value`` as output ``name`` of this scope (through an Identity, so one value may be two outputs)."""
        self.node("Identity", [self.name(value)], [name])
        return name

    def _value(self, type_: TensorType) -> Value:
        value = Value(self.next_id, type_)
        self.next_id += 1
        return value

    # ---------------------------------------------------------------- nodes and constants

    def node(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
             overload: str = "", **attrs: Any) -> list[str]:
        """Append an ONNX node; its output names (fresh ones when a count is given)."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        node = helper.make_node(op_type, inputs, names, name=self.fresh(f"n_{op_type}"), domain=domain, **attrs)
        if overload:
            node.overload = overload
        self.nodes.append(node)
        return names

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        """``node`` for one output: its name."""
        return self.node(op_type, list(inputs), 1, **attrs)[0]

    def constant(self, array: np.ndarray) -> str:
        """A Constant node holding ``array``."""
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(array), self.fresh("value")))

    def scalar(self, value: float | int, ir: str) -> str:
        """A 0-d constant of IR dtype ``ir`` (in this model's compute dtype)."""
        return self.constant(np.array(value, dtype=self.numpy_dtype(ir)))

    def ints(self, values) -> str:
        """A 1-D int64 constant."""
        return self.constant(np.array(list(values), dtype=np.int64))

    # ---------------------------------------------------------------- sizes

    def size(self, d) -> str:
        """A 1-D int64 tensor [d] holding dim ``d``, computed from the inputs' shapes when symbolic."""
        if isinstance(d, int):
            return self.ints([d])
        if d not in self.dims:
            total = None
            for monomial, coefficient in d.terms:
                term = self.ints([coefficient]) if coefficient != 1 or not monomial else None
                for symbol in monomial:
                    factor = self._symbol(symbol)
                    term = factor if term is None else self.op("Mul", term, factor)
                total = term if total is None else self.op("Add", total, term)
            self.dims[d] = total
        return self.dims[d]

    def _symbol(self, symbol: str) -> str:
        if symbol not in self.symbols:
            raise IRError(f"size {symbol} is not the size of any input axis of {self.prefix or 'the graph'}")
        key = ("symbol", symbol)
        if key not in self.dims:
            source, axis = self.symbols[symbol]
            self.dims[key] = self.op("Shape", source, start=axis, end=axis + 1)
        return self.dims[key]

    def shape(self, dims) -> str:
        """A 1-D int64 shape tensor of ``dims``."""
        if all(isinstance(d, int) for d in dims):
            return self.ints(dims)
        return self.op("Concat", *[self.size(d) for d in dims], axis=0)

    def reshape_target(self, source: tuple, target: tuple) -> str:
        """Reshape's shape operand for ``source`` -> ``target``: a symbolic dim that stays in place is copied (0),
        others are computed from the inputs' shapes (never -1, so shape inference can follow every dim)."""
        if any(d == 0 for d in target):
            return self.shape(target)
        kept = [not isinstance(d, int) and i < len(source) and source[i] == d for i, d in enumerate(target)]
        if all(isinstance(d, int) or k for d, k in zip(target, kept)):
            return self.ints([0 if k else d for d, k in zip(target, kept)])
        return self.op("Concat", *[self.ints([0]) if k else self.size(d) for d, k in zip(target, kept)], axis=0)

    # ---------------------------------------------------------------- the IR builder interface

    def emit(self, op: str, *inputs: Value, **attrs: Any) -> tuple[Value, ...]:
        """Write ``op`` on IR values: a lowering for primitives, a ``umc`` function node for memory-layer ops, the
        decomposition in place for the other composites. Returns the output values."""
        return self.emit_as(op, inputs, attrs, None)

    def one(self, op: str, *inputs: Value, **attrs: Any) -> Value:
        """``emit`` for single-output ops (the IR builder's ``one``)."""
        (out,) = self.emit(op, *inputs, **attrs)
        return out

    def emit_as(self, op: str, inputs: tuple[Value, ...], attrs: dict[str, Any],
                outputs: tuple[Value, ...] | None) -> tuple[Value, ...]:
        """``emit``, writing into the given output values (a graph's own node) when there are some."""
        from umc.export.onnx_ops import ONNX_LOWERINGS

        in_types = tuple(v.type for v in inputs)
        types = infer_types(op, in_types, attrs)
        attrs = check_attrs(op, attrs)
        definition = lookup(op)
        if definition.primitive:
            if op not in ONNX_LOWERINGS:
                raise IRError(f"op {op} has no ONNX lowering")
            names = ONNX_LOWERINGS[op](self, [self.name(v) for v in inputs], attrs, in_types, types)
            outs = outputs or tuple(self._value(t) for t in types)
        elif is_memory_op(op) and not (self.prefix and self.functions.overload_of(FunctionTable.key(op, in_types, attrs))):
            overload = self.functions.function(op, in_types, attrs)
            kinds = {a.name: a.kind for a in definition.attrs}
            node_attrs = {k: node_attribute_value(kinds[k], v) for k, v in attrs.items()}
            names = self.node(op, [self.name(v) for v in inputs], len(types), domain=DOMAIN, overload=overload,
                              **node_attrs)
            outs = outputs or tuple(self._value(t) for t in types)
        else:
            parts = decompose(self, op, inputs, attrs)
            names = [self.name(v) for v in parts]
            outs = outputs or parts
        for value, name in zip(outs, names):
            self.names[value.id] = name
        return outs
