"""IVE projector merging (DESIGN.md §4) as rules: pooling becomes one op, the E projector matmuls one GEMM.

- ``gather_pool``: lowered, a layer gathers value rows, scales each row's core slices by the core
  scores (MCS) and scatters them into E virtual blocks; ``scatter_blocks(mcs_scale(gather_values(V,
  row), s), block)`` is one ``gather_pool`` (a single pass over the selected rows, the fused kernel's
  job), viewed as (B,T,E,vdim).
- ``merge_projectors``: since ``Wo = [W_0 | ... | W_{E-1}]``, a sum whose terms are exactly
  ``linear(select_block(P, e), Wo[:, e*vdim:(e+1)*vdim])`` for every block e once is one GEMM
  ``linear(flatten(P), Wo)``. A sum with any other term, or missing a block, is left alone.
- ``collapse_reshapes``: a reshape of a reshape is one reshape; a reshape to the same shape is its input.
"""

from __future__ import annotations

from umc.ir.core import Graph, Node, Value
from umc.passes.editor import Editor
from umc.passes.rules import Bindings, Context, Rule, apply_rules


def _pooling_match(node: Node, ctx: Context):
    scale = ctx.producer(node.inputs[0], "mcs_scale")
    gather = ctx.producer(scale.inputs[0], "gather_values") if scale else None
    if gather is None:
        return "its rows are not MCS-scaled gathered value rows"
    if not (ctx.only_read_by(scale.outputs[0], node) and ctx.only_read_by(gather.outputs[0], scale)):
        return "the gathered or scaled rows have other readers (fusing would gather twice)"
    return {"table": gather.inputs[0], "row": gather.inputs[1], "scores": scale.inputs[1]}


def _fuse_pooling(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    pooled = editor.one("gather_pool", m["table"], m["row"], node.inputs[1], m["scores"], scope=node.scope,
                        stream=node.stream, E=node.attr("E"))
    blocks = editor.one("reshape", pooled, scope=node.scope, stream=node.stream, shape=node.outputs[0].type.shape)
    return {node.outputs[0]: blocks}


def _private_add(value: Value, reader: Node, ctx: Context) -> Node | None:
    """The add producing ``value`` when ``reader`` is its only reader (a private sub-sum), else None."""
    add = ctx.producer(value, "add")
    return add if add is not None and ctx.only_read_by(value, reader) else None


def _terms(node: Node, ctx: Context) -> list[Value]:
    """The summands of ``node``'s private tree of adds (a non-add is its own single term)."""
    if node.op != "add":
        return [node.outputs[0]]
    out = []
    for operand in node.inputs:
        inner = _private_add(operand, node, ctx)
        out += _terms(inner, ctx) if inner is not None else [operand]
    return out


def _sub_sums(node: Node, ctx: Context):
    """Term lists of every private sub-sum strictly inside ``node``'s tree, single terms included."""
    for operand in node.inputs if node.op == "add" else ():
        inner = _private_add(operand, node, ctx)
        if inner is None:
            yield [operand]
        else:
            yield _terms(inner, ctx)
            yield from _sub_sums(inner, ctx)


def _projector_term(value: Value, ctx: Context) -> tuple[Value, int, Node] | None:
    """(pooled blocks P, block e, slice node) of ``linear(select_block(P, e), slice_cols(W))``, or None."""
    proj = ctx.producer(value, "linear")
    select = ctx.producer(proj.inputs[0], "select_block") if proj else None
    sliced = ctx.producer(proj.inputs[1], "slice_cols") if select else None
    return (select.inputs[0], select.attr("index"), sliced) if sliced else None


def _complete_sum(terms: list[Value], ctx: Context) -> Bindings | str | None:
    """Bindings when ``terms`` are exactly the E projector terms of one pooled value, else why not (None: no
    projector term at all)."""
    found = [_projector_term(t, ctx) for t in terms]
    if not any(found):
        return None
    if None in found:
        return f"the sum has {found.count(None)} term(s) that are not projections of pooled blocks"
    pooled = {f[0].id: f[0] for f in found}
    weights = {f[2].inputs[0].id: f[2].inputs[0] for f in found}
    if len(pooled) != 1 or len(weights) != 1:
        return "its terms project different pooled blocks or use different projectors"
    (blocks,), (weight,) = pooled.values(), weights.values()
    count, vdim = blocks.type.shape[-2], blocks.type.shape[-1]
    if sorted(e for _, e, _ in found) != list(range(count)):
        return f"it sums blocks {sorted(e for _, e, _ in found)} of {count}"
    if any((s.attr("start"), s.attr("stop")) != (e * vdim, (e + 1) * vdim) for _, e, s in found):
        return "a block is projected by another block's columns"
    if weight.type.shape[1] != count * vdim:
        return f"the projector has {weight.type.shape[1]} columns, not E*vdim = {count * vdim}"
    return {"blocks": blocks, "weight": weight}


def _merge_match(node: Node, ctx: Context):
    found = _complete_sum(_terms(node, ctx), ctx)
    if not isinstance(found, str):
        return found
    enclosed = any(r.op == "add" and ctx.only_read_by(node.outputs[0], r) for r in ctx.readers(node.outputs[0]))
    if enclosed or any(isinstance(_complete_sum(terms, ctx), dict) for terms in _sub_sums(node, ctx)):
        return None  # the enclosing sum decides, or a complete sub-sum matches on its own
    return found


def _merge(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    blocks = m["blocks"]
    *lead, count, vdim = blocks.type.shape
    flat = editor.one("reshape", blocks, scope=node.scope, stream=node.stream, shape=(*lead, count * vdim))
    return {node.outputs[0]: editor.one("linear", flat, m["weight"], scope=node.scope, stream=node.stream)}


def _collapse_match(node: Node, ctx: Context):
    inner = ctx.producer(node.inputs[0], "reshape")
    if inner is not None:
        return {"source": inner.inputs[0]}
    if node.inputs[0].type == node.outputs[0].type:
        return {"source": node.inputs[0]}
    return None


def _collapse(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    source, want = m["source"], node.outputs[0].type
    if source.type == want:
        return {node.outputs[0]: source}
    return {node.outputs[0]: editor.one("reshape", source, scope=node.scope, stream=node.stream, shape=want.shape)}


RULES = (
    Rule("gather_pool", ("scatter_blocks",), _pooling_match, _fuse_pooling,
         "gather, MCS scaling and scatter into E blocks fused into gather_pool"),
    Rule("merge_projectors", ("add", "linear"), _merge_match, _merge, "E projector matmuls merged into one GEMM"),
    Rule("collapse_reshapes", ("reshape",), _collapse_match, _collapse, "reshapes collapsed"),
)


def ive_projector_merging(graph: Graph) -> tuple[Graph, list[str]]:
    """Rewrite gather/scale/scatter + E projector matmuls into gather_pool + one GEMM."""
    return apply_rules(graph, RULES)
