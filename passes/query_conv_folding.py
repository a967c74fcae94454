"""Query-conv folding (DESIGN.md §4): fold what is constant or linear around the query, as rules.

All exact in real arithmetic:
- ``rank_one_keys``: ``coarse_scores(rank_scores(q, K), u)`` scores every key at every rank;
  with ``K_u = sum_r u_r K[..., r]`` (a load-time fold) it is one matmul ``key_scores(q, K_u)``.
- ``winner_rank_scores``: ``gather_rank_rows(rank_scores(q, K), I)`` needs the rank scores of the
  m winners only: ``gathered_rank_scores(q, K, I)``. With both rules the full rank scores die.
- ``norm_conv_query_proj``: ``linear(query_conv(rms_norm(x, w)), Wq)`` becomes one op carrying the
  decode conv state (past normed inputs, as before, so states stay interchangeable). It convolves
  first and projects once: folding Wq into each of the K taps would cost K times its FLOPs.
- ``conv_query_proj``: the same without a foldable norm (a LayerNorm model norm has a bias).
- ``norm_scale_into_query``: without a conv, ``linear(rms_norm(x, w), Wq)`` of a memory query is
  ``linear(rms_normalize(x), Wq diag(w))``, the scaled weight computed at load time.
A fork between the model's norm and the memory branch (skip-layer overlap) is looked through:
the branch then forks the block's residual stream instead.
"""

from __future__ import annotations

from umc.ir.core import Graph, Node, Value
from umc.passes.editor import Editor
from umc.passes.rules import Bindings, Context, Rule, apply_rules


def _rank_one_keys(node: Node, ctx: Context):
    ranked = ctx.producer(node.inputs[0], "rank_scores")
    if ranked is None:
        return "its scores are not full rank scores"
    q, keys = ranked.inputs
    return {"q": q, "keys": keys, "u": node.inputs[1]}


def _fold_keys(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    k_u = editor.one("fold_rank", m["keys"], m["u"], scope=node.scope, stream=node.stream)
    return {node.outputs[0]: editor.one("key_scores", m["q"], k_u, scope=node.scope, stream=node.stream)}


def _winner_rank_scores(node: Node, ctx: Context):
    ranked = ctx.producer(node.inputs[0], "rank_scores")
    if ranked is None:
        return "its scores are not full rank scores"
    return {"q": ranked.inputs[0], "keys": ranked.inputs[1]}


def _gather_winners(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    picked = editor.one("gathered_rank_scores", m["q"], m["keys"], node.inputs[1], scope=node.scope, stream=node.stream)
    return {node.outputs[0]: picked}


def _normed_source(value: Value, ctx: Context) -> tuple[Node | None, Node | None]:
    """(rms_norm node, fork node or None) producing ``value``, looking through one fork."""
    fork = ctx.producer(value, "fork")
    return ctx.producer(fork.inputs[0] if fork else value, "rms_norm"), fork


def _conv_projection(node: Node, ctx: Context) -> Bindings | str | None:
    conv = ctx.producer(node.inputs[0], "query_conv")
    if conv is None:
        return None
    if not ctx.only_read_by(conv.outputs[0], node):
        return "the conv output has other readers (fusing would convolve twice)"
    return {"conv": conv}


def _norm_conv_match(node: Node, ctx: Context):
    found = _conv_projection(node, ctx)
    if not isinstance(found, dict):
        return found
    norm, fork = _normed_source(found["conv"].inputs[0], ctx)
    if norm is None:
        return "the conv input is not an RMSNorm (a LayerNorm has a bias; conv_query_proj applies)"
    return {**found, "norm": norm, "fork": fork}


def _branch_source(value: Value, fork: Node | None, editor: Editor) -> Value:
    """``value``, forked again onto the branch when the original input came through a fork."""
    if fork is None:
        return value
    return editor.one("fork", value, scope=fork.scope, stream=fork.stream, **dict(fork.attrs))


def _fuse_norm_conv(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    conv, norm = m["conv"], m["norm"]
    x = _branch_source(norm.inputs[0], m["fork"], editor)
    _, conv_w, conv_b, *state = conv.inputs
    query, new_state = editor.emit("norm_conv_query_proj", x, norm.inputs[1], conv_w, conv_b, node.inputs[1], *state,
                                   scope=node.scope, stream=node.stream, kernel=conv.attr("kernel"), eps=norm.attr("eps"))
    return {node.outputs[0]: query, conv.outputs[1]: new_state}


def _fuse_conv(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    conv = m["conv"]
    h, conv_w, conv_b, *state = conv.inputs
    query, new_state = editor.emit("conv_query_proj", h, conv_w, conv_b, node.inputs[1], *state,
                                   scope=node.scope, stream=node.stream, kernel=conv.attr("kernel"))
    return {node.outputs[0]: query, conv.outputs[1]: new_state}


def _norm_scale_match(node: Node, ctx: Context):
    if node.scope.part != "query" or node.scope.unit is None:
        return None
    norm, fork = _normed_source(node.inputs[0], ctx)
    if norm is None:
        return "the query input is not an RMSNorm output"
    return {"norm": norm, "fork": fork}


def _fold_norm_scale(node: Node, m: Bindings, editor: Editor) -> dict[Value, Value]:
    norm = m["norm"]
    x = _branch_source(norm.inputs[0], m["fork"], editor)
    features = editor.one("rms_normalize", x, scope=node.scope, stream=node.stream, eps=norm.attr("eps"))
    folded = editor.one("scale_columns", node.inputs[1], norm.inputs[1], scope=node.scope, stream=node.stream)
    return {node.outputs[0]: editor.one("linear", features, folded, scope=node.scope, stream=node.stream)}


RULES = (
    Rule("rank_one_keys", ("coarse_scores",), _rank_one_keys, _fold_keys,
         "coarse scores against rank-folded keys K_u (one matmul)"),
    Rule("winner_rank_scores", ("gather_rank_rows",), _winner_rank_scores, _gather_winners,
         "rank scores computed for the m winners only"),
    Rule("norm_conv_query_proj", ("linear",), _norm_conv_match, _fuse_norm_conv,
         "norm scale, causal conv and query projection fused into one op"),
    Rule("conv_query_proj", ("linear",), _conv_projection, _fuse_conv, "causal conv and query projection fused into one op"),
    Rule("norm_scale_into_query", ("linear",), _norm_scale_match, _fold_norm_scale,
         "norm scale folded into the query projection"),
)


def query_conv_folding(graph: Graph) -> tuple[Graph, list[str]]:
    """Fold rank-1 vectors into coarse keys, and norm scale + conv into the query projection."""
    return apply_rules(graph, RULES)
