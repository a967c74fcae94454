"""Skip-layer overlap (DESIGN.md §4): each memory unit becomes a concurrent branch.

A unit's nodes (scope ``unit`` = j) depend only on the normed FFN input of block ``read`` (and
weights and its conv state), so they can run while blocks read+1..write run. The pass puts
them on their own stream: an explicit ``fork`` of the block-``read`` value starts the branch,
the branch's nodes follow it directly (issued as early as possible), and the unit's residual
add (scope part ``residual``) becomes a ``join_add`` that waits for the branch. A unit whose
nodes read more than one main-stream value stays on the main stream, and the notes say why.
"""

from __future__ import annotations

from dataclasses import replace

from umc.ir.core import Graph, Node, Scope
from umc.passes.editor import Editor


def _units(graph: Graph) -> tuple[dict[int, list[Node]], dict[int, Node]]:
    """Per memory unit: its branch nodes, and its residual add."""
    branches: dict[int, list[Node]] = {}
    joins: dict[int, Node] = {}
    for node in graph.nodes:
        unit = node.scope.unit
        if unit is None:
            continue
        if node.scope.part == "residual":
            joins[unit] = node
        else:
            branches.setdefault(unit, []).append(node)
    return {j: nodes for j, nodes in branches.items() if j in joins}, joins


def overlap_note(units: tuple, j: int) -> str:
    """What unit j overlaps, from the graph's meta (read, write) pairs when it has them."""
    if j >= len(units):
        return ""
    read, write = units[j]
    return f"; overlaps blocks {read + 1}..{write}" if write > read else "; overlaps the FFN of its block"


def skip_layer_overlap(graph: Graph) -> tuple[Graph, list[str]]:
    """Fork each memory unit's subgraph onto stream unit+1 and join it at its residual add."""
    if any(n.stream for n in graph.nodes):
        return graph, []  # already overlapped
    branches, joins = _units(graph)
    outside = {v.id for v in (*graph.params, *graph.inputs)} | {v.id for n in graph.init_nodes for v in n.outputs}
    fork_after: dict[int, list[int]] = {}  # main-stream value id -> units reading it
    notes = []
    for j, nodes in sorted(branches.items()):
        inside = {v.id for n in nodes for v in n.outputs}
        external = {v.id for n in nodes for v in n.inputs} - inside - outside
        if len(external) != 1:
            notes.append(f"mem{j} stays on the main stream: it reads {len(external)} main-stream values, not 1")
            continue
        fork_after.setdefault(external.pop(), []).append(j)
    forked = {j for units in fork_after.values() for j in units}
    if not forked:
        return graph, notes
    units = dict(graph.meta).get("units", ())
    editor = Editor(graph)
    branch_ids = {id(n) for j in forked for n in branches[j]}
    for node in graph.nodes:
        if id(node) in branch_ids:
            continue  # re-emitted right after its fork
        unit = node.scope.unit
        if node.scope.part == "residual" and unit in forked:
            editor.replace(node.outputs[0], editor.one("join_add", *node.inputs, scope=node.scope, branch=unit + 1))
            continue
        editor.keep(node)
        for source in node.outputs:
            for j in fork_after.get(source.id, []):
                stream = j + 1
                start = editor.one("fork", source, scope=Scope("fork", unit=j), stream=stream, branch=stream)
                for inner in branches[j]:
                    inputs = tuple(start if v.id == source.id else v for v in inner.inputs)
                    editor.keep(replace(inner, inputs=inputs, stream=stream))
                notes.append(f"mem{j} on stream {stream} ({len(branches[j]) + 1} nodes): forked after {node.scope}, "
                             f"joined at its residual add{overlap_note(units, j)}")
    return editor.finish(), notes
