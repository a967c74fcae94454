"""Readable IR text, one node per line, values numbered in print order (so the text is stable)."""

from __future__ import annotations

from typing import Any

from umc.ir.core import Graph, Node, Value


def format_attr(value: Any) -> str:
    """An attribute value as IR text: floats exactly, lists bracketed, dims as expressions."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    return str(value)


def format_graph(graph: Graph) -> str:
    """The graph as text: inputs, declared state and taps, params, load-time nodes, per-call nodes, return."""
    numbers: dict[int, str] = {}

    def ref(v: Value) -> str:
        return numbers[v.id]

    def define(v: Value) -> str:
        numbers[v.id] = f"%{len(numbers)}"
        return numbers[v.id]

    lines = [f"graph {graph.name}("]
    lines += [f"    {define(v)} {v.name}: {v.type}," for v in graph.inputs]
    lines.append(") {")
    lines += [f"  state {s.name}: {s.input or '(zeros)'} -> {s.output}" for s in graph.state]
    lines += [f"  tap mem{t.unit}.{t.stage}: {t.output}" for t in graph.taps]
    lines += [f"  param {define(v)} {v.name}: {v.type}" for v in graph.params]

    def node_line(n: Node, prefix: str) -> str:
        ins = ", ".join(ref(v) for v in n.inputs)
        outs = ", ".join(define(v) for v in n.outputs)
        attrs = " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in n.attrs) + "}" if n.attrs else ""
        types = ", ".join(str(v.type) for v in n.outputs)
        stream = f" @s{n.stream}" if n.stream else ""
        return f"  {prefix}{outs} = umc.{n.op}({ins}){attrs}{stream} : {types}  # {n.scope}"

    lines += [node_line(n, "init ") for n in graph.init_nodes]
    lines += [node_line(n, "") for n in graph.nodes]
    lines.append("  return " + ", ".join(f"{v.name}={ref(v)}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
