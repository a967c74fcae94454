"""Graph editing for passes: copy nodes through, emit replacements, remap uses, drop dead code.

A pass walks the per-call nodes in order. It ``keep``s a node (inputs remapped) or emits
new nodes in its place and ``replace``s old values with new ones; ``finish`` rebuilds
the graph, removes what became dead, and verifies it. The input graph is never changed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from umc.ir.core import Graph, IRError, Node, Scope, Value
from umc.ir.ops import check_attrs, infer_types
from umc.ir.verify import verify


class Editor:
    """Accumulates the rewritten node lists of one graph."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._next = graph.next_id()
        self.init_nodes: list[Node] = list(graph.init_nodes)
        self.nodes: list[Node] = []
        self.remap: dict[int, Value] = {}
        self.read: set[int] = set()
        self.weights = {v.id for v in graph.params} | {v.id for n in graph.init_nodes for v in n.outputs}

    def resolve(self, value: Value) -> Value:
        """The value that now stands for ``value``."""
        while value.id in self.remap:
            value = self.remap[value.id]
        return value

    def _append(self, node: Node) -> Node:
        self.read.update(v.id for v in node.inputs)
        self.nodes.append(node)
        return node

    def keep(self, node: Node) -> Node:
        """Copy a node through with its inputs remapped."""
        return self._append(replace(node, inputs=tuple(self.resolve(v) for v in node.inputs)))

    def emit(self, op: str, *inputs: Value, scope: Scope, stream: int = 0, **attrs: Any) -> tuple[Value, ...]:
        """Append a new node; it goes to the load-time section when all its inputs are weights."""
        inputs = tuple(self.resolve(v) for v in inputs)
        types = infer_types(op, tuple(v.type for v in inputs), attrs)
        outputs = tuple(Value(self._next + i, t) for i, t in enumerate(types))
        self._next += len(outputs)
        load_time = bool(inputs) and all(v.id in self.weights for v in inputs)
        node = Node(op, inputs, outputs, tuple(sorted(check_attrs(op, attrs).items())), scope, 0 if load_time else stream)
        if load_time:
            self.init_nodes.append(node)
            self.weights.update(v.id for v in outputs)
        else:
            self._append(node)
        return outputs

    def one(self, op: str, *inputs: Value, scope: Scope, stream: int = 0, **attrs: Any) -> Value:
        """``emit`` for single-output ops."""
        (out,) = self.emit(op, *inputs, scope=scope, stream=stream, **attrs)
        return out

    def copy(self, node: Node) -> tuple[Value, ...]:
        """Re-emit a node (to the load-time section if it reads only weights); later uses read the copy."""
        outs = self.emit(node.op, *node.inputs, scope=node.scope, stream=node.stream, **dict(node.attrs))
        for old, new in zip(node.outputs, outs):
            self.replace(old, new)
        return outs

    def is_weight_only(self, node: Node) -> bool:
        """True if every input of the node is a parameter or a load-time value."""
        return bool(node.inputs) and all(self.resolve(v).id in self.weights for v in node.inputs)

    def replace(self, old: Value, new: Value) -> None:
        """Every later use of ``old`` reads ``new`` (same type); a use already emitted would be missed: IRError."""
        new = self.resolve(new)
        if old.type != new.type:
            raise IRError(f"replacing %{old.id}: {old.type} with %{new.id}: {new.type}")
        if old.id in self.read:
            raise IRError(f"replacing %{old.id} after a node already read it")
        self.remap[old.id] = new

    def finish(self) -> Graph:
        """The rewritten graph with dead nodes and unused parameters removed, verified."""
        outputs = tuple(Value(self.resolve(v).id, v.type, v.name) for v in self.graph.outputs)
        graph = self.graph.evolve(init_nodes=tuple(self.init_nodes), nodes=tuple(self.nodes), outputs=outputs)
        return verify(eliminate_dead_code(graph))


def eliminate_dead_code(graph: Graph) -> Graph:
    """Drop nodes whose outputs nothing reads, and parameters no node reads."""
    live = {v.id for v in graph.outputs}
    keep_main, keep_init = [], []
    for section, keep in ((graph.nodes, keep_main), (graph.init_nodes, keep_init)):
        for node in reversed(section):
            if any(v.id in live for v in node.outputs):
                keep.append(node)
                live.update(v.id for v in node.inputs)
    params = tuple(p for p in graph.params if p.id in live)
    return graph.evolve(nodes=tuple(reversed(keep_main)), init_nodes=tuple(reversed(keep_init)), params=params)
