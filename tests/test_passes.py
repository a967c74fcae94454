"""Each pass: expected IR text on a small model, idempotence, and outputs unchanged (graph run before vs after).

The before/after comparison runs on every shipped small spec, for the prefill and the
decode graph, with random inputs (including random KV cache and conv state).
"""

import pytest
import torch

from conftest import SPECS
from graph_inputs import random_inputs
from snapshots import assert_matches_expected
from umc.ir import format_graph
from umc.lower import lower
from umc.passes import PASSES, PIPELINE, run_pipeline
from umc.reference import build_model
from umc.runtime.graph_backend import bind, execute
from umc.spec import load_spec, spec_from_dict

SMALL_SPECS = sorted(SPECS.glob("ablation/*.yaml")) + [SPECS / "ultramem-tiny.yaml", SPECS / "pkm-tiny.yaml"]

SMALL_MODEL = {
    "name": "pass-test",
    "model": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "n_heads": 2, "ffn_hidden": 32},
    "memory": {"kind": "ultramem", "units": "0:1", "knum": 4, "kdim": 8, "vdim": 8, "topm": 3, "heads": 2,
               "tucker_rank": 2, "cores": 2, "value_expansion": 4, "query_conv": 2},
}


def staged(graph):
    """(pass name, graph before it, graph after it) along the pipeline."""
    before = graph
    for result in run_pipeline(graph):
        yield result.name, before, result.graph
        before = result.graph


def run(graph, weights, feeds, threads=False):
    return execute(graph, bind(graph, weights), feeds, threads=threads)


def assert_same_outputs(before, after, weights, feeds, tolerance=1e-5):
    want, got = run(before, weights, feeds), run(after, weights, feeds)
    assert set(want) == set(got)
    for name in want:
        scale = max(want[name].abs().max().item(), 1e-30)
        assert (got[name] - want[name]).abs().max().item() <= tolerance * scale, name


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_expected_ir_after_each_pass(kind):
    spec = spec_from_dict(SMALL_MODEL)
    for name, _, after in staged(lower(spec)[kind]):
        assert_matches_expected(f"small.{kind}.{name}.txt", format_graph(after))


@pytest.mark.parametrize("name", PIPELINE)
def test_pass_twice_changes_nothing(name):
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    for kind, graph in lower(spec).items():
        once, _ = PASSES[name](graph)
        twice, notes = PASSES[name](once)
        assert format_graph(twice) == format_graph(once), (kind, notes)


@pytest.mark.parametrize("path", SMALL_SPECS, ids=lambda p: p.stem)
def test_every_pass_keeps_outputs(path):
    spec = load_spec(path)
    weights = build_model(spec, seed=1).state_dict()
    for kind, graph in lower(spec).items():
        feeds = random_inputs(graph, spec.model.vocab_size, seed=2)
        for name, before, after in staged(graph):
            assert_same_outputs(before, after, weights, feeds)


def test_branches_run_concurrently_to_the_same_result():
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    weights = build_model(spec).state_dict()
    graph = run_pipeline(lower(spec)["decode"])[-1].graph
    feeds = random_inputs(graph, spec.model.vocab_size)
    sequential, threaded = run(graph, weights, feeds), run(graph, weights, feeds, threads=True)
    assert all(torch.equal(sequential[k], threaded[k]) for k in sequential)


def test_skip_layer_overlap_forks_and_joins_each_unit():
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    graph, notes = PASSES["skip_layer_overlap"](lower(spec)["prefill"])
    forks = [n for n in graph.nodes if n.op == "fork"]
    joins = [n for n in graph.nodes if n.op == "join_add"]
    assert sorted(n.attr("branch") for n in forks) == sorted(n.attr("branch") for n in joins) == [1, 2]
    for fork in forks:
        branch = [n for n in graph.nodes if n.stream == fork.stream]
        inside = {v.id for n in branch for v in n.outputs}
        outside = {v.id for v in (*graph.params, *graph.inputs)}
        assert branch[0] is fork  # the branch is issued right after its fork
        assert all(v.id in inside | outside or n is fork for n in branch for v in n.inputs)
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    mem0_last = max(position[id(n)] for n in graph.nodes if n.stream == 1)
    block1_attn = min(position[id(n)] for n in graph.nodes if n.scope == "block1.attn")
    assert mem0_last < block1_attn  # unit 0:1 is issued before block 1, which it overlaps
    assert len(notes) == 2


def test_query_conv_folding_removes_full_rank_scoring():
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    graph = lower(spec)["decode"]
    folded, _ = PASSES["query_conv_folding"](PASSES["skip_layer_overlap"](graph)[0])
    ops = [n.op for n in folded.nodes]
    assert "rank_scores" not in ops and "coarse_scores" not in ops and "query_conv" not in ops
    assert ops.count("key_scores") == 4 and ops.count("gathered_rank_scores") == 4
    assert ops.count("norm_conv_query_proj") == 2
    init_ops = [n.op for n in folded.init_nodes]
    assert init_ops.count("norm_keys") == 2 and init_ops.count("fold_rank") == 4


def test_ive_projector_merging_leaves_one_gemm_per_unit():
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    graph = run_pipeline(lower(spec)["prefill"])[-1].graph
    ops = [n.op for n in graph.nodes]
    assert ops.count("gather_pool") == 2
    assert not {"gather_values", "mcs_scale", "scatter_blocks", "select_block"} & set(ops)
    projections = [n for n in graph.nodes if n.op == "linear" and n.inputs[1].name.endswith("values_proj.weight")]
    assert len(projections) == 2
