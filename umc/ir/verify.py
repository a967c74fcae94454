"""The IR verifier: SSA, definition before use, acyclic, and every node type-checks against its op."""

from __future__ import annotations

import networkx as nx

from umc.ir.core import Graph, IRError
from umc.ir.ops import infer_types
from umc.ir.view import to_networkx


def verify(graph: Graph) -> Graph:
    """Return the graph unchanged if it is well formed; raise IRError naming the first problem."""
    defined: set[int] = set()

    def define(value, where: str) -> None:
        if value.id in defined:
            raise IRError(f"{graph.name}: value %{value.id} defined twice ({where})")
        defined.add(value.id)

    for v in graph.inputs:
        define(v, f"input {v.name}")
    names = set()
    for v in graph.params:
        define(v, f"param {v.name}")
        if v.name in names:
            raise IRError(f"{graph.name}: parameter {v.name} listed twice")
        names.add(v.name)
    weights_only = {v.id for v in graph.params}
    for section, nodes in (("init", graph.init_nodes), ("main", graph.nodes)):
        for i, node in enumerate(nodes):
            where = f"{section} node {i} ({node.op}, {node.scope})"
            for v in node.inputs:
                if v.id not in defined:
                    raise IRError(f"{graph.name}: {where} reads %{v.id} before it is defined")
                if section == "init" and v.id not in weights_only:
                    raise IRError(f"{graph.name}: {where} is load-time but reads a per-call value %{v.id}")
            expected = infer_types(node.op, tuple(v.type for v in node.inputs), dict(node.attrs))
            actual = tuple(v.type for v in node.outputs)
            if expected != actual:
                raise IRError(f"{graph.name}: {where} declares {actual}, its type rule gives {expected}")
            for v in node.outputs:
                define(v, where)
                if section == "init":
                    weights_only.add(v.id)
    for v in graph.outputs:
        if v.id not in defined:
            raise IRError(f"{graph.name}: output {v.name} is never defined")
    if not nx.is_directed_acyclic_graph(to_networkx(graph)):
        raise IRError(f"{graph.name}: the graph has a cycle")
    return graph
