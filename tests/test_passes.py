"""Each pass: expected IR text on a small model, one rewrite at its pipeline position (a second application
changes nothing), and outputs unchanged (graph run before vs after) on every shipped small spec, prefill
and decode, float32 and — tie-aware, with the selections of the graph before forced — bfloat16."""

import dataclasses
import threading

import pytest
import torch

from conftest import SPECS
from graph_inputs import assert_outputs_close, random_inputs, run_graph
from snapshots import assert_matches_expected
from umc.ir import format_graph
from umc.lower import lower
from umc.passes import PASSES, PIPELINE, run_pipeline
from umc.reference import build_model
from umc.spec import load_spec, spec_from_dict
from umc.verify import compare_low_precision

SMALL_SPECS = sorted(SPECS.glob("ablation/*.yaml")) + [SPECS / "ultramem-tiny.yaml", SPECS / "pkm-tiny.yaml"]

SMALL_MODEL = {
    "name": "pass-test",
    "model": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "n_heads": 2, "ffn_hidden": 32},
    "memory": {"kind": "ultramem", "units": "0:1", "knum": 4, "kdim": 8, "vdim": 8, "topm": 3, "heads": 2,
               "tucker_rank": 2, "cores": 2, "value_expansion": 4, "query_conv": 2},
}
SELECTION_STAGES = ("rows", "cols", "grid")


def staged(graph):
    """(pass name, graph before it, graph after it) along the pipeline."""
    before = graph
    for result in run_pipeline(graph):
        yield result.name, before, result.graph
        before = result.graph


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_expected_ir_after_each_pass(kind):
    spec = spec_from_dict(SMALL_MODEL)
    for name, _, after in staged(lower(spec)[kind]):
        assert_matches_expected(f"small.{kind}.{name}.txt", format_graph(after))


@pytest.mark.parametrize("name", PIPELINE)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_pass_rewrites_at_its_position_and_then_is_done(name, dtype):
    spec = dataclasses.replace(load_spec(SPECS / "ultramem-tiny.yaml"), dtype=dtype)
    position = PIPELINE.index(name)
    for kind, graph in lower(spec).items():
        for earlier in PIPELINE[:position]:
            graph, _ = PASSES[earlier](graph)
        once, notes = PASSES[name](graph)
        assert format_graph(once) != format_graph(graph), (kind, "the pass changed nothing where it should act")
        twice, again = PASSES[name](once)
        assert format_graph(twice) == format_graph(once), (kind, again)


@pytest.mark.parametrize("path", SMALL_SPECS, ids=lambda p: p.stem)
def test_every_pass_keeps_outputs(path):
    spec = load_spec(path)
    weights = build_model(spec, seed=1).state_dict()
    for kind, graph in lower(spec).items():
        feeds = random_inputs(graph, spec.model.vocab_size, seed=2)
        for name, before, after in staged(graph):
            assert_outputs_close(run_graph(before, weights, feeds), run_graph(after, weights, feeds))


def forced_selections(graph, outputs):
    """The row, column and grid selections a graph made, as a force map for another graph with the same taps."""
    return {tap.output: outputs[tap.output] for tap in graph.taps if tap.stage in SELECTION_STAGES}


@pytest.mark.parametrize("path", [SPECS / "ultramem-tiny.yaml", SPECS / "pkm-tiny.yaml",
                                  SPECS / "ablation" / "09-mcs.yaml"], ids=lambda p: p.stem)
def test_every_pass_keeps_outputs_in_bfloat16_for_the_same_selection(path):
    """bfloat16: the graph after each pass, run with the selections of the graph before it forced, is at least
    as close to a float32 run (same weights, same selections) as the graph before it is."""
    spec32 = load_spec(path)
    spec16 = dataclasses.replace(spec32, dtype="bfloat16")
    weights16 = build_model(spec16, seed=1).state_dict()
    weights32 = {k: v.float() if v.is_floating_point() else v for k, v in weights16.items()}
    for kind in ("prefill", "decode"):
        chain16 = list(staged(lower(spec16)[kind]))
        chain32 = list(staged(lower(spec32)[kind]))
        feeds16 = random_inputs(chain16[0][1], spec32.model.vocab_size, seed=2)
        feeds32 = {k: v.float() if v.is_floating_point() else v for k, v in feeds16.items()}
        for (name, before, after), (_, before32, _) in zip(chain16, chain32):
            want = run_graph(before, weights16, feeds16)
            force = forced_selections(before, want)
            got = run_graph(after, weights16, feeds16, force=force)
            exact = run_graph(before32, weights32, feeds32, force=force)
            for output in ["logits", *(slot.output for slot in after.state)]:
                check = compare_low_precision(output, name, got[output], want[output], exact[output], "bfloat16")
                assert check.ok, (kind, check)


def test_branches_run_on_worker_threads_to_the_same_result():
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    weights = build_model(spec).state_dict()
    graph = run_pipeline(lower(spec)["decode"])[-1].graph
    feeds = random_inputs(graph, spec.model.vocab_size)
    threads_of = {}
    record = lambda node: threads_of.setdefault(node.stream, set()).add(threading.current_thread().name)
    sequential = run_graph(graph, weights, feeds)
    threaded = run_graph(graph, weights, feeds, threads=True, observer=record)
    assert all(torch.equal(sequential[k], threaded[k]) for k in sequential)
    main = threading.current_thread().name
    assert threads_of[0] == {main}
    assert {1, 2} <= set(threads_of) and all(main not in threads_of[s] for s in (1, 2)), threads_of


def test_skip_layer_overlap_forks_and_joins_each_unit():
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    graph, notes = PASSES["skip_layer_overlap"](lower(spec)["prefill"])
    forks = [n for n in graph.nodes if n.op == "fork"]
    joins = [n for n in graph.nodes if n.op == "join_add"]
    assert sorted(n.attr("branch") for n in forks) == sorted(n.attr("branch") for n in joins) == [1, 2]
    for fork in forks:
        branch = [n for n in graph.nodes if n.stream == fork.stream]
        assert branch[0] is fork  # the branch is issued right after its fork
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    mem0_last = max(position[id(n)] for n in graph.nodes if n.stream == 1)
    block1_attn = min(position[id(n)] for n in graph.nodes if n.scope.block == 1 and n.scope.part == "attn")
    assert mem0_last < block1_attn  # unit 0:1 is issued before block 1, which it overlaps
    assert len(notes) == 2


def test_query_conv_folding_removes_full_rank_scoring():
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    graph = lower(spec)["decode"]
    folded, _ = PASSES["query_conv_folding"](PASSES["skip_layer_overlap"](graph)[0])
    ops = [n.op for n in folded.all_nodes()]
    assert "rank_scores" not in ops and "coarse_scores" not in ops and "query_conv" not in ops
    assert ops.count("key_scores") == 4 and ops.count("gathered_rank_scores") == 4 and ops.count("fold_rank") == 4
    assert ops.count("norm_conv_query_proj") == 2


def test_cleanup_folds_load_time_work_in_float32_for_low_precision():
    spec = dataclasses.replace(load_spec(SPECS / "ultramem-tiny.yaml"), dtype="bfloat16")
    graph = run_pipeline(lower(spec)["decode"])[-1].graph
    folds = [n for n in graph.init_nodes if n.op in ("norm_keys", "fold_rank")]
    assert folds and all(v.type.dtype == "f32" for n in folds for v in n.outputs)
    read = {v.id for n in graph.nodes for v in n.inputs}
    init_values = {v.id: (v, n) for n in graph.init_nodes for v in n.outputs}
    for value_id in read & set(init_values):  # what per-call nodes read is cast once to the build's dtype
        value, producer = init_values[value_id]
        assert value.type.dtype == "bf16" and producer.op == "cast"


def test_ive_projector_merging_leaves_one_gemm_per_unit():
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    graph, _ = PASSES["ive_projector_merging"](lower(spec)["prefill"])
    ops = [n.op for n in graph.nodes]
    assert ops.count("gather_pool") == 2
    assert not {"gather_values", "mcs_scale", "scatter_blocks", "select_block", "reshape"} & set(ops)
    projections = [n for n in graph.nodes if n.op == "linear" and n.scope.part == "project"]
    assert len(projections) == 2 and all(n.inputs[1].name.endswith("values_proj.weight") for n in projections)


def test_kernel_fusion_leaves_three_kernel_ops_per_unit():
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    graph = run_pipeline(lower(spec)["decode"])[-1].graph
    for unit in (0, 1):
        ops = [n.op for n in graph.nodes if n.scope.unit == unit]
        assert ops.count("coarse_topm") == 2 and ops.count("grid_topm") == 1 and ops.count("lookup_pool") == 1
        assert not {"key_scores", "topm", "gathered_rank_scores", "tucker_grid", "grid_select", "shuffle", "ive_split",
                    "gather_pool"} & set(ops)
