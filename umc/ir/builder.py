"""GraphBuilder: emit nodes with types inferred (and attributes checked) by the op registry.

Used by lowering, by passes (through the editor) and by op decompositions.
"""

from __future__ import annotations

from typing import Any

from umc.ir.core import NO_SCOPE, Graph, Node, Scope, StateSlot, Tap, TensorType, Value
from umc.ir.ops import check_attrs, infer_types


class GraphBuilder:
    """Accumulates inputs, params and nodes; ``scope`` and ``stream`` label the nodes emitted next."""

    def __init__(self, name: str, first_id: int = 0):
        self.name = name
        self._next = first_id
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.scope: Scope = NO_SCOPE
        self.stream = 0

    def _value(self, type_: TensorType, name: str = "") -> Value:
        value = Value(self._next, type_, name)
        self._next += 1
        return value

    def input(self, name: str, type_: TensorType) -> Value:
        """A graph input."""
        value = self._value(type_, name)
        self.inputs.append(value)
        return value

    def param(self, name: str, dtype: str, shape: tuple) -> Value:
        """A named parameter (weights are bound by name at run time); one value per name."""
        if name not in self.params:
            self.params[name] = self._value(TensorType(dtype, tuple(shape)), name)
        return self.params[name]

    def emit(self, op: str, *inputs: Value, **attrs: Any) -> tuple[Value, ...]:
        """Append ``op(inputs) {attrs}``; returns its output values."""
        types = infer_types(op, tuple(v.type for v in inputs), attrs)
        outputs = tuple(self._value(t) for t in types)
        attr_items = tuple(sorted(check_attrs(op, attrs).items()))
        self.nodes.append(Node(op, tuple(inputs), outputs, attr_items, self.scope, self.stream))
        return outputs

    def one(self, op: str, *inputs: Value, **attrs: Any) -> Value:
        """``emit`` for single-output ops."""
        (out,) = self.emit(op, *inputs, **attrs)
        return out

    def build(self, outputs: dict[str, Value], meta: dict[str, Any] | None = None,
              state: tuple[StateSlot, ...] = (), taps: tuple[Tap, ...] = ()) -> Graph:
        """The finished graph; outputs are renamed to their keys."""
        named = tuple(Value(v.id, v.type, name) for name, v in outputs.items())
        return Graph(self.name, tuple(self.inputs), tuple(self.params.values()), (), tuple(self.nodes), named,
                     tuple(sorted((meta or {}).items())), tuple(state), tuple(taps))
