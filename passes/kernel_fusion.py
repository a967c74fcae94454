"""Kernel fusion: each memory-layer retrieval chain becomes one kernel-sized op (``umc.ir.ops.kernels``), as rules.

- ``coarse_topm``: ``topm(key_scores(q, K))`` — score every key and keep the top m — is one streaming op.
- ``grid_topm``: ``grid_select(tucker_grid(gathered_rank_scores(q_r, K_r, I_r), gathered_rank_scores(q_c, K_c,
  I_c), C), I_r, I_c)`` — the winners' rank scores, the m x m Tucker grid, its top m — is one op.
- ``lookup_pool``: ``gather_pool(V, ive_split(shuffle(a, perm)), s)`` — (or without the shuffle) — is one op.
Each fires only when the intermediate values have no other reader (fusing would compute them twice).
"""

from __future__ import annotations

from umc.ir.core import Graph, Node, Value
from umc.passes.editor import Editor
from umc.passes.rules import Bindings, Context, Rule, apply_rules

PRIVATE = "an intermediate value has other readers (fusing would compute it twice)"


def _coarse_match(node: Node, ctx: Context):
    scores = ctx.producer(node.inputs[0], "key_scores")
    if scores is None:
        return None
    if not ctx.only_read_by(scores.outputs[0], node):
        return PRIVATE
    return {"scores": scores}


def _coarse(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    values, indices = editor.emit("coarse_topm", *m["scores"].inputs, scope=node.scope, stream=node.stream,
                                  k=node.attr("k"))
    return {node.outputs[0]: values, node.outputs[1]: indices}


def _grid_match(node: Node, ctx: Context):
    grid = ctx.producer(node.inputs[0], "tucker_grid")
    sides = [ctx.producer(v, "gathered_rank_scores") for v in grid.inputs[:2]] if grid else [None]
    if None in sides:
        return None
    if [s.inputs[2].id for s in sides] != [node.inputs[1].id, node.inputs[2].id]:
        return "the grid's rows and columns are not the ones selected among"
    if not (ctx.only_read_by(grid.outputs[0], node) and all(ctx.only_read_by(s.outputs[0], grid) for s in sides)):
        return PRIVATE
    return {"sides": sides, "cores": grid.inputs[2]}


def _grid(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    row, col = m["sides"]
    address, scores = editor.emit("grid_topm", row.inputs[0], col.inputs[0], row.inputs[1], col.inputs[1],
                                  node.inputs[1], node.inputs[2], m["cores"], scope=node.scope, stream=node.stream,
                                  n=node.attr("n"))
    return {node.outputs[0]: address, node.outputs[1]: scores}


def _lookup_match(node: Node, ctx: Context):
    split = ctx.producer(node.inputs[1], "ive_split")
    if split is None:
        return None
    if (node.inputs[1].id, node.inputs[2].id) != (split.outputs[0].id, split.outputs[1].id):
        return "its rows and blocks are not the two halves of one IVE split"
    shuffle = ctx.producer(split.inputs[0], "shuffle")
    private = all(ctx.only_read_by(v, node) for v in split.outputs) and (
        shuffle is None or ctx.only_read_by(shuffle.outputs[0], split))
    if not private:
        return PRIVATE
    address, perm = (shuffle.inputs[0], [shuffle.inputs[1]]) if shuffle else (split.inputs[0], [])
    return {"address": address, "perm": perm, "N": split.attr("N")}


def _lookup(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    pooled = editor.one("lookup_pool", node.inputs[0], m["address"], node.inputs[3], *m["perm"], scope=node.scope,
                        stream=node.stream, N=m["N"], E=node.attr("E"))
    return {node.outputs[0]: pooled}


RULES = (
    Rule("coarse_topm", ("topm",), _coarse_match, _coarse, "key scoring and its top-m fused into coarse_topm"),
    Rule("grid_topm", ("grid_select",), _grid_match, _grid,
         "winners' rank scores, Tucker grid and grid top-m fused into grid_topm"),
    Rule("lookup_pool", ("gather_pool",), _lookup_match, _lookup, "shuffle, IVE split and pooling fused into lookup_pool"),
)


def kernel_fusion(graph: Graph) -> tuple[Graph, list[str]]:
    """Group each retrieval chain into one kernel-sized op."""
    return apply_rules(graph, RULES)
