"""Query-conv folding (DESIGN.md §4): fold what is constant or linear around the query.

Three rewrites per memory layer, all exact in real arithmetic:
- rank-1 keys: ``topm(coarse_scores(rank_scores(q, K), u))`` scores every key at every
  rank; with ``K_u = sum_r u_r K[..., r]`` (load time) coarse scoring is one matmul
  ``key_scores(q, K_u)``, and only the m winners' rank scores are computed
  (``gathered_rank_scores``) for the Tucker grid.
- norm scale + causal conv + query projection: ``linear(conv(rms_norm(x) * w), Wq)``
  becomes ``conv_query_proj(rms_normalize(x), taps, b, Wq)`` with conv taps
  ``c_j * w`` folded at load time (fusing the projection into every tap would cost K
  times its FLOPs, so the op convolves first and projects once). The decode conv state
  then holds normalized, unscaled inputs (prefill and decode of one build agree).
  A LayerNorm model norm has a bias that the conv's zero padding does not see, so
  there only conv and projection fuse (the state keeps the normed input).
- the key LayerNorm and other weight-only steps run at load time (the load-time
  section), so the keys are normalized once, not per call.
"""

from __future__ import annotations

from umc.ir.core import Graph, Node, Value
from umc.passes.editor import Editor


def _producer_through_fork(value: Value, producers: dict[int, Node]) -> tuple[Node | None, Node | None]:
    """(producer, fork) where a fork between them is looked through."""
    node = producers.get(value.id)
    if node is not None and node.op == "fork":
        return producers.get(node.inputs[0].id), node
    return node, None


def query_conv_folding(graph: Graph) -> tuple[Graph, list[str]]:
    """Fold rank-1 vectors into coarse keys, and norm scale + conv into the query projection."""
    producers = {v.id: n for n in graph.all_nodes() for v in n.outputs}
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
    coarse = producers.get(topm.inputs[0].id)
    if coarse is None or coarse.op != "coarse_scores":
        return False
    ranked = producers.get(coarse.inputs[0].id)
    if ranked is None or ranked.op != "rank_scores":
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
    """linear(query_conv(norm(x)), Wq) or linear(rms_norm(x), Wq) -> one fused op with folded weights."""
    x, wq = proj.inputs
    scope, stream = proj.scope, proj.stream
    conv = producers.get(x.id)
    conv = conv if conv is not None and conv.op == "query_conv" else None
    normed = conv.inputs[0] if conv else x
    norm, fork = _producer_through_fork(normed, producers)
    fold_scale = norm is not None and norm.op == "rms_norm"
    if not conv and not fold_scale:
        return None
    if fold_scale:
        source = norm.inputs[0]
        if fork is not None:
            source = editor.one("fork", source, scope=fork.scope, stream=fork.stream, **dict(fork.attrs))
        features = editor.one("rms_normalize", source, scope=scope, stream=stream, **dict(norm.attrs))
        scale = [norm.inputs[1]]
    else:
        features, scale = normed, []
    if conv is None:
        folded_w = editor.one("scale_columns", wq, *scale, scope=scope)
        editor.replace(proj.outputs[0], editor.one("linear", features, folded_w, scope=scope, stream=stream))
        return f"{scope}: norm scale folded into the query projection"
    _, conv_w, conv_b, *state = conv.inputs
    taps = editor.one("scale_rows", conv_w, *scale, scope=scope) if scale else conv_w
    query, new_state = editor.emit("conv_query_proj", features, taps, conv_b, wq, *state, scope=scope, stream=stream)
    editor.replace(proj.outputs[0], query)
    editor.replace(conv.outputs[1], new_state)
    what = "norm scale, causal conv" if fold_scale else "causal conv"
    return f"{scope}: {what} and query projection fused into conv_query_proj (K={conv.attr('kernel')})"
