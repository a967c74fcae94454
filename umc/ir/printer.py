"""Readable IR text, one node per line, values numbered in print order (so the text is stable)."""

from __future__ import annotations

from typing import Any

from umc.ir.core import Graph, Node, Value


def _attr(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_attr(v) for v in value) + "]"
    return str(value)


def format_graph(graph: Graph) -> str:
    """The graph as text: header with inputs, params, load-time nodes, per-call nodes, return."""
    numbers: dict[int, str] = {}

    def ref(v: Value) -> str:
        return numbers[v.id]

    def define(v: Value) -> str:
        numbers[v.id] = f"%{len(numbers)}"
        return numbers[v.id]

    lines = [f"graph {graph.name}("]
    lines += [f"    {define(v)} {v.name}: {v.type}," for v in graph.inputs]
    lines.append(") {")
    lines += [f"  param {define(v)} {v.name}: {v.type}" for v in graph.params]

    def node_line(n: Node, prefix: str) -> str:
        ins = ", ".join(ref(v) for v in n.inputs)
        outs = ", ".join(define(v) for v in n.outputs)
        attrs = " {" + ", ".join(f"{k}={_attr(v)}" for k, v in n.attrs) + "}" if n.attrs else ""
        types = ", ".join(str(v.type) for v in n.outputs)
        where = f"  # {n.scope}" if n.scope else ""
        stream = f" @s{n.stream}" if n.stream else ""
        return f"  {prefix}{outs} = umc.{n.op}({ins}){attrs}{stream} : {types}{where}"

    lines += [node_line(n, "init ") for n in graph.init_nodes]
    lines += [node_line(n, "") for n in graph.nodes]
    lines.append("  return " + ", ".join(f"{v.name}={ref(v)}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
