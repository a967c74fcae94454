"""networkx view of a graph (ordering, cycle checks, drawing) and its Graphviz text."""

from __future__ import annotations

import networkx as nx

from umc.ir.core import Graph


def to_networkx(graph: Graph) -> nx.MultiDiGraph:
    """Nodes are ("in", i), ("param", name), ("node", k) and ("out", name); edges keyed by operand index."""
    g = nx.MultiDiGraph()
    source: dict[int, tuple] = {}
    for i, v in enumerate(graph.inputs):
        source[v.id] = ("in", i)
        g.add_node(("in", i), label=f"{v.name}: {v.type}")
    for v in graph.params:
        source[v.id] = ("param", v.name)
        g.add_node(("param", v.name), label=v.name)
    for k, node in enumerate(graph.all_nodes()):
        key = ("node", k)
        g.add_node(key, label=node.op, scope=str(node.scope), stream=node.stream, init=k < len(graph.init_nodes))
        for v in node.outputs:
            source[v.id] = key
        for operand, v in enumerate(node.inputs):
            if v.id in source:
                g.add_edge(source[v.id], key, key=operand)
    for v in graph.outputs:
        g.add_node(("out", v.name), label=v.name)
        if v.id in source:
            g.add_edge(source[v.id], ("out", v.name), key=0)
    return g


STREAM_COLORS = ("white", "lightblue", "lightyellow", "lightpink", "palegreen", "lavender", "wheat")


def to_dot(graph: Graph) -> str:
    """Graphviz source: ops as boxes (load-time ones grey), each concurrent stream its own colour."""
    g = to_networkx(graph)
    ids = {node: f"n{i}" for i, node in enumerate(g.nodes)}
    lines = [f'digraph "{graph.name}" {{', "  rankdir=TB; node [fontsize=10];"]
    for node, data in g.nodes(data=True):
        label = str(data["label"]).replace('"', "'")
        if node[0] == "node":
            color = "grey85" if data["init"] else STREAM_COLORS[data["stream"] % len(STREAM_COLORS)]
            lines.append(f'  {ids[node]} [shape=box, style=filled, fillcolor={color}, label="{label}\\n{data["scope"]}"];')
        elif node[0] != "param":
            lines.append(f'  {ids[node]} [shape=ellipse, label="{label}"];')
    for a, b, _ in g.edges(keys=True):
        if a[0] != "param":
            lines.append(f"  {ids[a]} -> {ids[b]};")
    lines.append("}")
    return "\n".join(lines) + "\n"
