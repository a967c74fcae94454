"""Query-conv folding (DESIGN.md §4): fold what is constant or linear around the query.

Three rewrites per memory layer, all exact in real arithmetic:
- rank-1 keys: ``topm(coarse_scores(rank_scores(q, K), u))`` scores every key at every
  rank; with ``K_u = sum_r u_r K[..., r]`` (load time) coarse scoring is one matmul
  ``key_scores(q, K_u)``, and only the m winners' rank scores are computed
  (``gathered_rank_scores``) for the Tucker grid.
- norm scale + causal conv + query projection: ``linear(query_conv(rms_norm(x, w)), Wq)``
  becomes one ``norm_conv_query_proj(x, w, c, b, Wq)`` carrying the decode conv state
  (past normed inputs, as before, so states stay interchangeable). It convolves first
  and projects once: folding Wq into each of the K taps would cost K times its FLOPs.
  Without a conv the norm scale folds into the weight: ``linear(rms_normalize(x),
  Wq diag(w))``. A LayerNorm model norm has a bias, so there only conv and
  projection fuse (``conv_query_proj``).
- the key LayerNorm and other weight-only steps run at load time (the load-time
  section), so the keys are normalized once, not per call.
"""

from __future__ import annotations

from umc.ir.core import Graph, Node, Value
from umc.passes.editor import Editor, producer_of


def _producer_through_fork(value: Value, producers: dict[int, Node]) -> tuple[Node | None, Node | None]:
    """(producer, fork) where a fork between them is looked through."""
    fork = producer_of(producers, value, "fork")
    if fork is not None:
        return producers.get(fork.inputs[0].id), fork
    return producers.get(value.id), None


def query_conv_folding(graph: Graph) -> tuple[Graph, list[str]]:
    """Fold rank-1 vectors into coarse keys, and norm scale + conv into the query projection."""
    producers = graph.producers()
    editor = Editor(graph)
    notes: list[str] = []
    folded_scores: dict[int, tuple[Value, Value]] = {}  # rank_scores output id -> (q, K)
    for node in graph.nodes:
        if node.op == "topm" and _fold_rank_one(editor, node, producers, folded_scores):
            notes.append(f"{node.scope}: coarse scores against rank-folded keys K_u (one matmul)")
        elif node.op == "gather_rank_rows" and node.inputs[0].id in folded_scores:
            q, keys = folded_scores[node.inputs[0].id]
            picked = editor.one("gathered_rank_scores", q, keys, node.inputs[1], scope=node.scope, stream=node.stream)
            editor.replace(node.outputs[0], picked)
        elif node.op == "linear" and node.inputs[1].name.endswith("query_proj.weight"):
            note = _fuse_query_projection(editor, node, producers)
            if note:
                notes.append(note)
            else:
                editor.keep(node)
        elif node.scope.startswith("mem") and editor.is_weight_only(node):
            editor.copy(node)  # e.g. the key LayerNorm: once at load time
        else:
            editor.keep(node)
    result = editor.finish()
    notes = [f"{note} (x{notes.count(note)})" if notes.count(note) > 1 else note for note in dict.fromkeys(notes)]
    hoisted = len(result.init_nodes) - len(graph.init_nodes)
    if notes and hoisted:
        notes.append(f"{hoisted} weight-only nodes (key LayerNorm, K_u, folded projections) now run once at load time")
    return result, notes


def _fold_rank_one(editor: Editor, topm: Node, producers: dict[int, Node], folded: dict) -> bool:
    """topm(coarse_scores(rank_scores(q, K), u)) -> topm(key_scores(q, fold_rank(K, u)))."""
    coarse = producer_of(producers, topm.inputs[0], "coarse_scores")
    ranked = producer_of(producers, coarse.inputs[0], "rank_scores") if coarse else None
    if ranked is None:
        return False
    q, keys = ranked.inputs
    u = coarse.inputs[1]
    k_u = editor.one("fold_rank", keys, u, scope=topm.scope)
    scores = editor.one("key_scores", q, k_u, scope=topm.scope, stream=topm.stream)
    values, indices = editor.emit("topm", scores, scope=topm.scope, stream=topm.stream, **dict(topm.attrs))
    editor.replace(topm.outputs[0], values)
    editor.replace(topm.outputs[1], indices)
    folded[ranked.outputs[0].id] = (q, keys)
    return True


def _fuse_query_projection(editor: Editor, proj: Node, producers: dict[int, Node]) -> str | None:
    """linear(query_conv(h), Wq) with h = rms_norm(x) (or any h), or linear(rms_norm(x), Wq): one op."""
    x, wq = proj.inputs
    scope, stream = proj.scope, proj.stream
    conv = producer_of(producers, x, "query_conv")
    normed = conv.inputs[0] if conv else x
    norm, fork = _producer_through_fork(normed, producers)
    fold_norm = norm is not None and norm.op == "rms_norm"
    if not conv and not fold_norm:
        return None
    if fold_norm:
        source = norm.inputs[0]
        if fork is not None:  # the branch now starts from the block's residual stream
            source = editor.one("fork", source, scope=fork.scope, stream=fork.stream, **dict(fork.attrs))
    if conv is None:
        features = editor.one("rms_normalize", source, scope=scope, stream=stream, **dict(norm.attrs))
        folded_w = editor.one("scale_columns", wq, norm.inputs[1], scope=scope)
        editor.replace(proj.outputs[0], editor.one("linear", features, folded_w, scope=scope, stream=stream))
        return f"{scope}: norm scale folded into the query projection"
    _, conv_w, conv_b, *state = conv.inputs
    kernel = conv.attr("kernel")
    if fold_norm:
        query, new_state = editor.emit("norm_conv_query_proj", source, norm.inputs[1], conv_w, conv_b, wq, *state,
                                       scope=scope, stream=stream, kernel=kernel, **dict(norm.attrs))
    else:
        query, new_state = editor.emit("conv_query_proj", normed, conv_w, conv_b, wq, *state,
                                       scope=scope, stream=stream, kernel=kernel)
    editor.replace(proj.outputs[0], query)
    editor.replace(conv.outputs[1], new_state)
    what = "norm scale, causal conv" if fold_norm else "causal conv"
    return f"{scope}: {what} and query projection fused into one op (K={kernel})"
