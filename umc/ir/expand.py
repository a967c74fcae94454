"""Expanding ops into their decompositions: one node, or a whole graph down to primitive ops.

This is where an op's definition meets every backend that lacks the op: the ONNX exporter
writes each fused op's expansion as a local function, kernels are tested against it, and a
whole optimized graph expanded to primitives must compute what the graph computes.
"""

from __future__ import annotations

from typing import Any

from umc.ir.builder import GraphBuilder
from umc.ir.core import Graph, IRError, Node, Scope, TensorType, Value
from umc.ir.ops import check_attrs, infer_types, lookup
from umc.ir.verify import verify


def decompose(b, op: str, inputs: tuple[Value, ...], attrs: dict[str, Any]) -> tuple[Value, ...]:
    """Emit op's decomposition on builder ``b``; IRError if the op is primitive or the decomposition's
    outputs do not have the op's types."""
    definition = lookup(op)
    if definition.decompose is None:
        raise IRError(f"{op} is primitive: it has no decomposition")
    expected = infer_types(op, tuple(v.type for v in inputs), attrs)
    outs = tuple(definition.decompose(b, tuple(inputs), attrs))
    got = tuple(v.type for v in outs)
    if got != expected:
        raise IRError(f"{op}: decomposition gives {', '.join(map(str, got))}, the op gives {', '.join(map(str, expected))}")
    return outs


def decomposition_graph(op: str, input_types: tuple[TensorType, ...], attrs: dict[str, Any]) -> Graph:
    """A graph computing ``op`` on inputs ``in0..`` of the given types by its decomposition (one level):
    outputs named as the op's outputs."""
    b = GraphBuilder(f"{op}.decomposition")
    inputs = tuple(b.input(f"in{i}", t) for i, t in enumerate(input_types))
    outs = decompose(b, op, inputs, attrs)
    return verify(b.build(dict(zip(lookup(op).outputs, outs))))


class _Expander:
    """A builder-like sink for decompositions that emits into a new graph, expanding recursively."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.next_id = graph.next_id()
        self.weights = {v.id for v in graph.params}
        self.init_nodes: list[Node] = []
        self.nodes: list[Node] = []
        self.scope: Scope = Scope("embed")
        self.stream = 0

    def emit(self, op: str, *inputs: Value, **attrs: Any) -> tuple[Value, ...]:
        """Emit ``op``, expanded into primitives when it is not one."""
        if not lookup(op).primitive:
            return decompose(self, op, inputs, attrs)
        types = infer_types(op, tuple(v.type for v in inputs), attrs)
        outs = tuple(Value(self.next_id + i, t) for i, t in enumerate(types))
        self.next_id += len(outs)
        load_time = bool(inputs) and all(v.id in self.weights for v in inputs)
        node = Node(op, tuple(inputs), outs, tuple(sorted(check_attrs(op, attrs).items())), self.scope,
                    0 if load_time else self.stream)
        (self.init_nodes if load_time else self.nodes).append(node)
        if load_time:
            self.weights.update(v.id for v in outs)
        return outs

    def one(self, op: str, *inputs: Value, **attrs: Any) -> Value:
        """``emit`` for single-output ops."""
        (out,) = self.emit(op, *inputs, **attrs)
        return out


def expand(graph: Graph) -> Graph:
    """The graph with every non-primitive node replaced by its decomposition, recursively, so it holds
    primitive ops only (load-time work stays at load time); verified."""
    sink = _Expander(graph)
    remap: dict[int, Value] = {}
    for node in graph.all_nodes():
        sink.scope, sink.stream = node.scope, node.stream
        inputs = tuple(remap.get(v.id, v) for v in node.inputs)
        outs = sink.emit(node.op, *inputs, **dict(node.attrs))
        remap.update({old.id: new for old, new in zip(node.outputs, outs)})
    outputs = tuple(Value(remap.get(v.id, v).id, v.type, v.name) for v in graph.outputs)
    return verify(graph.evolve(init_nodes=tuple(sink.init_nodes), nodes=tuple(sink.nodes), outputs=outputs))
