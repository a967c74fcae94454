"""Each rewrite rule on a graph built for it: the rule fires and the outputs are numerically equal before
and after; and on a near-miss graph the rule must leave alone (structure unchanged, the reason reported)."""

import pytest
import torch

from graph_inputs import assert_outputs_close, random_values, run_graph
from umc.ir import GraphBuilder, Scope, TensorType, format_graph
from umc.ir.dims import Sym
from umc.passes import PASSES

B, T = Sym.of("B"), Sym.of("T")
SIZES = {"B": 2, "T": 3}
H, N, KD, R, M, E, VDIM, D = 2, 8, 4, 2, 3, 2, 6, 8


def apply(pass_name, graph, ranges=None):
    """The graph after the pass, its notes, and both graphs' outputs on the same random weights and inputs."""
    after, notes = PASSES[pass_name](graph)
    weights = random_values(graph.params, 0, SIZES, ranges)
    feeds = random_values(graph.inputs, 1, SIZES, ranges)
    return after, notes, run_graph(graph, weights, feeds), run_graph(after, weights, feeds)


def ops(graph):
    return [n.op for n in graph.all_nodes()]


def scores_graph(rank_scores_source: bool):
    """coarse_scores and gather_rank_rows reading rank_scores(q, K), or (near miss) a graph input."""
    b = GraphBuilder("scores")
    b.scope = Scope("score", unit=0)
    q = b.input("q", TensorType("f32", (B, T, H, KD)))
    index = b.input("index", TensorType("i64", (B, T, H, M)))
    keys = b.param("keys", "f32", (H, N, KD, R))
    u = b.param("u", "f32", (1, H, 1, R))
    scores = b.one("rank_scores", q, keys) if rank_scores_source else b.input("s", TensorType("f32", (B, T, H, N, R)))
    return b.build({"coarse": b.one("coarse_scores", scores, u), "picked": b.one("gather_rank_rows", scores, index)})


def test_rank_one_keys_and_winner_rank_scores():
    after, notes, want, got = apply("query_conv_folding", scores_graph(True), {"index": N})
    assert_outputs_close(want, got)
    assert {"key_scores", "fold_rank", "gathered_rank_scores"} <= set(ops(after)) and "rank_scores" not in ops(after)
    assert any("rank-folded" in n for n in notes) and any("m winners" in n for n in notes)


def test_scores_from_elsewhere_are_left_alone():
    graph = scores_graph(False)
    after, notes = PASSES["query_conv_folding"](graph)
    assert format_graph(after) == format_graph(graph)
    assert any("rank_one_keys left 1 candidate(s) alone" in n and "not full rank scores" in n for n in notes)


def query_graph(norm: str, conv: bool, part: str = "query", reuse_conv: bool = False):
    """linear(Wq) of [query_conv of] a model norm of x, scoped as ``part``; ``reuse_conv`` also outputs the conv."""
    b = GraphBuilder("query")
    x = b.input("x", TensorType("f32", (B, T, D)))
    b.scope = Scope("ffn", block=0)
    w = b.param("norm.weight", "f32", (D,))
    h = b.one(norm, x, w, eps=1e-5)
    b.scope = Scope(part, unit=0) if part == "query" else Scope(part, block=0)
    outputs = {}
    if conv:
        h, state = b.emit("query_conv", h, b.param("conv.weight", "f32", (D, 3)), b.param("conv.bias", "f32", (D,)), kernel=3)
        outputs["state"] = state
        if reuse_conv:
            outputs["convolved"] = h
    outputs["q"] = b.one("linear", h, b.param("query_proj.weight", "f32", (2 * KD, D)))
    return b.build(outputs)


@pytest.mark.parametrize("norm, fused", [("rms_norm", "norm_conv_query_proj"), ("layer_norm", "conv_query_proj")])
def test_conv_and_projection_fuse(norm, fused):
    after, notes, want, got = apply("query_conv_folding", query_graph(norm, conv=True))
    assert_outputs_close(want, got)
    assert fused in ops(after) and "query_conv" not in ops(after)


def test_conv_read_elsewhere_is_left_alone():
    graph = query_graph("rms_norm", conv=True, reuse_conv=True)
    after, notes = PASSES["query_conv_folding"](graph)
    assert format_graph(after) == format_graph(graph)
    assert any("conv output has other readers" in n for n in notes)


def test_norm_scale_folds_into_a_memory_query_only():
    after, notes, want, got = apply("query_conv_folding", query_graph("rms_norm", conv=False))
    assert_outputs_close(want, got)
    assert {"rms_normalize", "scale_columns"} <= set(ops(after))
    dense = query_graph("rms_norm", conv=False, part="ffn")  # not a memory query: not a candidate
    assert format_graph(PASSES["query_conv_folding"](dense)[0]) == format_graph(dense)
    layer_normed = query_graph("layer_norm", conv=False)
    after, notes = PASSES["query_conv_folding"](layer_normed)
    assert format_graph(after) == format_graph(layer_normed)
    assert any("not an RMSNorm output" in n for n in notes)


def pooling_graph(gathered_is_output: bool):
    b = GraphBuilder("pool")
    b.scope = Scope("pool", unit=0)
    row = b.input("row", TensorType("i64", (B, T, H, M)))
    block = b.input("block", TensorType("i64", (B, T, H, M)))
    scores = b.input("scores", TensorType("f32", (B, T, H, M, 2)))
    gathered = b.one("gather_values", b.param("values", "f32", (16, VDIM)), row)
    pooled = b.one("scatter_blocks", b.one("mcs_scale", gathered, scores), block, E=E)
    return b.build({"pooled": pooled, **({"gathered": gathered} if gathered_is_output else {})})


def test_gather_pool_fuses_the_pooling_chain():
    after, notes, want, got = apply("ive_projector_merging", pooling_graph(False), {"row": 16, "block": E})
    assert_outputs_close(want, got)
    assert "gather_pool" in ops(after) and "scatter_blocks" not in ops(after)


def test_pooling_whose_rows_are_read_elsewhere_is_left_alone():
    graph = pooling_graph(True)
    after, notes = PASSES["ive_projector_merging"](graph)
    assert format_graph(after) == format_graph(graph)
    assert any("other readers" in n for n in notes)


def projector_graph(kind: str):
    """Sums of linear(select_block(P, e), Wo[:, e*vdim:(e+1)*vdim]): all E blocks ("full"), or the near miss of
    the issue: out = W0 P0 + z with z unrelated and W1 P1 a separate output ("foreign")."""
    b = GraphBuilder("project")
    b.scope = Scope("project", unit=0)
    pooled = b.input("pooled", TensorType("f32", (B, T, E, VDIM)))
    weight = b.param("values_proj.weight", "f32", (D, E * VDIM))
    terms = [b.one("linear", b.one("select_block", pooled, index=e),
                   b.one("slice_cols", weight, start=e * VDIM, stop=(e + 1) * VDIM)) for e in range(E)]
    if kind == "full":
        return b.build({"out": b.one("add", terms[0], terms[1])})
    z = b.input("z", TensorType("f32", (B, T, D)))
    return b.build({"out": b.one("add", terms[0], z), "other": terms[1]})


def test_projector_terms_of_every_block_merge_into_one_gemm():
    after, notes, want, got = apply("ive_projector_merging", projector_graph("full"))
    assert_outputs_close(want, got)
    assert ops(after).count("linear") == 1 and "select_block" not in ops(after)


def test_a_sum_with_a_foreign_term_is_left_alone():
    graph = projector_graph("foreign")
    after, notes, want, got = apply("ive_projector_merging", graph)
    assert format_graph(after) == format_graph(graph)
    assert_outputs_close(want, got)
    assert any("not projections of pooled blocks" in n for n in notes)
    assert any("sums blocks [1] of 2" in n for n in notes)


def test_reshapes_collapse():
    b = GraphBuilder("reshape")
    x = b.input("x", TensorType("f32", (B, T, 4)))
    twice = b.one("reshape", b.one("reshape", x, shape=(B, T, 2, 2)), shape=(B, T * 4))
    same = b.one("reshape", x, shape=(B, T, 4))
    kept = b.one("reshape", x, shape=(B, T, 2, 2))
    graph = b.build({"twice": twice, "same": same, "kept": kept})
    after, notes, want, got = apply("ive_projector_merging", graph)
    assert_outputs_close(want, got)
    assert ops(after).count("reshape") == 2  # one for "twice", one for "kept"; "same" is x itself


def two_unit_graph(second_reads_two: bool):
    """Two memory units on a residual stream; the second reads one main-stream value, or (near miss) two."""
    b = GraphBuilder("units")
    x = b.input("x", TensorType("f32", (B, T, D)))
    w = b.param("w", "f32", (D, D))
    for j in range(2):
        b.scope = Scope("ffn", block=j)
        h = b.one("linear", x, w)
        x = b.one("add", x, h)
        b.scope = Scope("query", unit=j)
        q = b.one("linear", h, b.param(f"m{j}", "f32", (D, D)))
        if second_reads_two and j == 1:
            q = b.one("add", q, x)
        b.scope = Scope("residual", unit=j)
        x = b.one("add", x, q)
    return b.build({"out": x}, meta={"units": ((0, 0), (1, 1))})


def test_skip_layer_overlap_branches_units_that_read_one_value():
    after, notes, want, got = apply("skip_layer_overlap", two_unit_graph(False))
    assert_outputs_close(want, got)
    assert ops(after).count("fork") == 2 and ops(after).count("join_add") == 2


def test_unit_reading_two_main_stream_values_stays_on_the_main_stream():
    after, notes, want, got = apply("skip_layer_overlap", two_unit_graph(True))
    assert_outputs_close(want, got)
    assert ops(after).count("fork") == 1
    assert any("mem1 stays on the main stream: it reads 2 main-stream values" in n for n in notes)


def test_cleanup_hoists_and_merges():
    b = GraphBuilder("clean")
    x = b.input("x", TensorType("f32", (B, D)))
    w = b.param("w", "f32", (D, D))
    folded = b.one("scale_columns", w, b.param("s", "f32", (D,)))
    graph = b.build({"a": b.one("linear", x, folded), "b": b.one("linear", x, folded)})
    after, notes, want, got = apply("cleanup", graph)
    assert_outputs_close(want, got)
    assert [n.op for n in after.init_nodes] == ["scale_columns"] and ops(after).count("linear") == 1
    assert any("merged 1 duplicate" in n for n in notes)


def retrieval_graph(near_miss: bool):
    """coarse top-m per side, grid top-m over them, lookup and pooling; the near miss also outputs the key
    scores, scores the grid over other rows than it selects among, and reads the IVE split elsewhere."""
    b = GraphBuilder("retrieval")
    b.scope = Scope("score", unit=0)
    q = {side: b.input(f"q_{side}", TensorType("f32", (B, T, H, KD))) for side in "rc"}
    coarse = {side: b.param(f"coarse_{side}", "f32", (H, N, KD)) for side in "rc"}
    keys = {side: b.param(f"keys_{side}", "f32", (H, N, KD, R)) for side in "rc"}
    scores = {side: b.one("key_scores", q[side], coarse[side]) for side in "rc"}
    kept = {side: b.emit("topm", scores[side], k=M)[1] for side in "rc"}
    other_rows = b.input("other_rows", TensorType("i64", (B, T, H, M))) if near_miss else kept["r"]
    rows = b.one("gathered_rank_scores", q["r"], keys["r"], other_rows)
    cols = b.one("gathered_rank_scores", q["c"], keys["c"], kept["c"])
    grid = b.one("tucker_grid", rows, cols, b.param("cores", "f32", (H, 2, R, R)))
    address, core_scores = b.emit("grid_select", grid, kept["r"], kept["c"], n=N)
    b.scope = Scope("pool", unit=0)
    virtual = b.one("shuffle", address, b.param("perm", "i64", (N * N,)))  # n*n grid addresses, E blocks of N*N/E rows
    row, block = b.emit("ive_split", virtual, N=N * N // E)
    pooled = b.one("gather_pool", b.param("values", "f32", (N * N // E, VDIM)), row, block, core_scores, E=E)
    extra = {"s_r": scores["r"], "row": row} if near_miss else {}
    return b.build({"pooled": pooled, "grid": address, **extra})


def test_kernel_fusion_groups_each_retrieval_chain():
    after, notes, want, got = apply("kernel_fusion", retrieval_graph(False))
    assert_outputs_close(want, got)
    assert sorted(ops(after)) == ["coarse_topm", "coarse_topm", "grid_topm", "lookup_pool"]


def test_kernel_fusion_leaves_near_misses_alone():
    graph = retrieval_graph(True)
    after, notes, want, got = apply("kernel_fusion", graph, {"other_rows": N})
    assert_outputs_close(want, got)
    assert ops(after).count("coarse_topm") == 1 and "grid_topm" not in ops(after) and "lookup_pool" not in ops(after)
    assert any("coarse_topm left 1" in n and "other readers" in n for n in notes)
    assert any("grid_topm left 1" in n and "not the ones selected among" in n for n in notes)
    assert any("lookup_pool left 1" in n and "other readers" in n for n in notes)
