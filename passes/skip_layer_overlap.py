"""Skip-layer overlap (DESIGN.md §4): each memory unit becomes a concurrent branch.

A unit's nodes depend only on the normed FFN input of block ``read`` (and weights and
its conv state), so they can run while blocks read+1..write run. The pass puts them on
their own stream: an explicit ``fork`` of the block-``read`` value starts the branch, the
branch's nodes follow it directly (issued as early as possible), and the residual add
after block ``write`` becomes a ``join_add`` that waits for the branch.
"""

from __future__ import annotations

import re
from dataclasses import replace

from umc.ir.core import Graph, IRError, Node
from umc.passes.editor import Editor

_SCOPE = re.compile(r"mem(\d+)\.(\w+)")


def _unit(node: Node) -> tuple[int, str] | None:
    """(unit index, part) for nodes lowered from a memory unit."""
    match = _SCOPE.fullmatch(node.scope)
    return (int(match.group(1)), match.group(2)) if match else None


def skip_layer_overlap(graph: Graph) -> tuple[Graph, list[str]]:
    """Fork each memory unit's subgraph onto stream unit+1 and join it at its residual add."""
    if any(n.stream or n.op == "fork" for n in graph.nodes):
        return graph, []  # already overlapped
    branches: dict[int, list[Node]] = {}
    joins: dict[int, Node] = {}
    for node in graph.nodes:
        tag = _unit(node)
        if tag and tag[1] == "residual":
            joins[tag[0]] = node
        elif tag:
            branches.setdefault(tag[0], []).append(node)
    branches = {j: nodes for j, nodes in branches.items() if j in joins}  # a lone layer has nothing to overlap
    if not branches:
        return graph, []

    outside = {v.id for v in (*graph.params, *graph.inputs)} | {v.id for n in graph.init_nodes for v in n.outputs}
    fork_after: dict[int, list[int]] = {}  # main-stream value id -> units reading it
    for j, nodes in branches.items():
        inside = {v.id for n in nodes for v in n.outputs}
        external = {v.id for n in nodes for v in n.inputs} - inside - outside
        if len(external) != 1:
            raise IRError(f"memory unit {j} reads {len(external)} main-stream values, expected 1")
        fork_after.setdefault(external.pop(), []).append(j)

    units = dict(graph.meta).get("units", ())
    editor = Editor(graph)
    notes = []
    branch_ids = {id(n) for nodes in branches.values() for n in nodes}
    for node in graph.nodes:
        if id(node) in branch_ids:
            continue  # re-emitted right after its fork
        tag = _unit(node)
        if tag and tag[1] == "residual":
            joined = editor.one("join_add", *node.inputs, scope=node.scope, branch=tag[0] + 1)
            editor.replace(node.outputs[0], joined)
            continue
        editor.keep(node)
        for source in node.outputs:
            for j in fork_after.get(source.id, []):
                stream = j + 1
                forked = editor.one("fork", source, scope=f"mem{j}.fork", stream=stream, branch=stream)
                for inner in branches[j]:
                    inputs = tuple(forked if v.id == source.id else editor.resolve(v) for v in inner.inputs)
                    editor.nodes.append(replace(inner, inputs=inputs, stream=stream))
                read, write = (int(b) for b in units[j].split(":"))
                overlap = f"blocks {read + 1}..{write}" if write > read else "the FFN of its block"
                notes.append((stream, f"unit {units[j]}: forked after {node.scope}, joined after block{write}; "
                                      f"overlaps {overlap}"))
    result = editor.finish()
    counts = {s: sum(1 for n in result.nodes if n.stream == s) for s, _ in notes}
    return result, [f"mem{s - 1} on stream {s} ({counts[s]} nodes), {text}" for s, text in notes]
