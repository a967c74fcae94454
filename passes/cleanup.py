"""Cleanup: load-time constant folding (weight-only nodes move to the load-time section), CSE, DCE."""

from __future__ import annotations

from umc.ir.core import Graph
from umc.passes.editor import Editor


def cleanup(graph: Graph) -> tuple[Graph, list[str]]:
    """Hoist weight-only nodes to load time, merge identical nodes, drop dead ones."""
    editor = Editor(graph)
    seen: dict[tuple, tuple] = {}
    hoisted = merged = 0
    for node in graph.nodes:
        inputs = tuple(editor.resolve(v) for v in node.inputs)
        key = (node.op, tuple(v.id for v in inputs), node.attrs)
        if key in seen:
            for old, new in zip(node.outputs, seen[key]):
                editor.replace(old, new)
            merged += 1
            continue
        if editor.is_weight_only(node):
            seen[key] = editor.copy(node)
            hoisted += 1
            continue
        seen[key] = editor.keep(node).outputs
    result = editor.finish()
    removed = len(graph.nodes) + len(graph.init_nodes) - len(result.nodes) - len(result.init_nodes) - merged
    notes = []
    if hoisted:
        notes.append(f"moved {hoisted} weight-only nodes to load time")
    if merged:
        notes.append(f"merged {merged} duplicate nodes")
    if removed > 0:
        notes.append(f"removed {removed} dead nodes")
    return result, notes
