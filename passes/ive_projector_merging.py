"""IVE projector merging (DESIGN.md §4): pooling and the E projector matmuls become two ops.

Lowered, a layer gathers value rows, scales each row's core slices by the core scores
(MCS), scatters them into E virtual blocks, and runs E projector matmuls
``W_e · P_e`` whose sum is the output. Since ``Wo = [W_0 | ... | W_{E-1}]``, that sum is
one GEMM ``Wo · flatten(P)``, and gather + scale + scatter is one ``gather_pool`` op
(a single pass over the selected rows, the fused kernel's job). Without an output
projection the pooled block is the output directly.
"""

from __future__ import annotations

from umc.ir.core import Graph, Node, Value
from umc.passes.editor import Editor, producer_of


def _pooling_chain(scatter: Node, producers: dict[int, Node]) -> tuple[Node, Node] | None:
    """(gather_values, mcs_scale) feeding a scatter_blocks, or None."""
    scale = producer_of(producers, scatter.inputs[0], "mcs_scale")
    gather = producer_of(producers, scale.inputs[0], "gather_values") if scale else None
    return (gather, scale) if gather else None


def _projector_sum(scatter: Node, users: dict[int, list[Node]], producers: dict[int, Node]) -> tuple[Node, int] | None:
    """The last node of sum_e linear(select_block(P, e), slice_cols(Wo, e)) and Wo's value id, or None."""
    selects = [n for n in users.get(scatter.outputs[0].id, []) if n.op == "select_block"]
    if len(selects) != scatter.attr("E"):
        return None
    weights, projections = set(), []
    for select in selects:
        readers = users.get(select.outputs[0].id, [])
        if len(readers) != 1 or readers[0].op != "linear":
            return None
        sliced = producer_of(producers, readers[0].inputs[1], "slice_cols")
        width = select.outputs[0].type.shape[-1]
        if sliced is None or sliced.attr("start") != select.attr("index") * width:
            return None
        projections.append(readers[0])
        weights.add(sliced.inputs[0].id)
    last = projections[0]
    for _ in projections[1:]:
        adds = [n for n in users.get(last.outputs[0].id, []) if n.op == "add"]
        if len(adds) != 1:
            return None
        last = adds[0]
    return (last, weights.pop()) if len(weights) == 1 else None


def ive_projector_merging(graph: Graph) -> tuple[Graph, list[str]]:
    """Rewrite gather/scale/scatter + E projector matmuls into gather_pool + one GEMM."""
    producers = graph.producers()
    users = graph.users()
    params = {v.id: v for v in graph.params}
    rewrites: dict[int, tuple[Node, Value | None]] = {}  # id(anchor) -> (scatter, Wo; None: no projection)
    for node in graph.nodes:
        if node.op != "scatter_blocks" or _pooling_chain(node, producers) is None:
            continue
        found = _projector_sum(node, users, producers)
        if found is not None:
            anchor, weight_id = found
            if weight_id in params:
                rewrites[id(anchor)] = (node, params[weight_id])
        else:
            reshaped = [n for n in users.get(node.outputs[0].id, []) if n.op == "reshape"]
            if len(reshaped) == 1 and node.attr("E") == 1:
                rewrites[id(reshaped[0])] = (node, None)
    if not rewrites:
        return graph, []
    editor = Editor(graph)
    notes = []
    for node in graph.nodes:
        if id(node) not in rewrites:
            editor.keep(node)
            continue
        scatter, weight = rewrites[id(node)]
        gather, scale = _pooling_chain(scatter, producers)
        table, row = gather.inputs
        pooled = editor.one("gather_pool", table, row, scatter.inputs[1], scale.inputs[1], scope=scatter.scope,
                            stream=scatter.stream, E=scatter.attr("E"))
        if weight is None:
            out = editor.one("reshape", pooled, scope=node.scope, stream=node.stream, **dict(node.attrs))
            notes.append(f"{scatter.scope}: gather, MCS scaling and pooling fused into gather_pool")
        else:
            out = editor.one("linear", pooled, weight, scope=node.scope, stream=node.stream)
            notes.append(f"{scatter.scope}: gather, MCS scaling, scatter into {scatter.attr('E')} blocks fused into "
                         f"gather_pool; {scatter.attr('E')} projector matmuls merged into one GEMM")
        editor.replace(node.outputs[0], out)
    return editor.finish(), notes
