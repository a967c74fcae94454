"""Every op with a decomposition: its torch implementation equals its decomposition on valid inputs, in float32
(1e-5) and bfloat16 (the dtype's tolerance; selections tie-aware). Inputs come from a sampler that honours the
operand constraints each op declares (indices in range, permutations), on the op instances that real graphs
contain (every shipped small spec, lowered and optimized). Also: whole optimized graphs expanded to primitives
compute what they compute, and the registries hold exactly one entry per op."""

import dataclasses

import pytest

from conftest import SPECS
from graph_inputs import assert_outputs_close, random_inputs, run_graph
from op_samples import check_instance, run_impl
from umc.ir.core import IRError
from umc.ir.expand import expand
from umc.ir.ops import OPS
from umc.ir.ops.registry import decomposition
from umc.lower import lower
from umc.passes import run_pipeline
from umc.passes.partition_memory import partition_memory
from umc.reference import build_model
from umc.runtime.torch_ops import FORCED_IMPLS, TORCH_IMPLS, impl
from umc.spec import load_spec

EXAMPLE_SPECS = ["ultramem-tiny", "pkm-tiny", "ablation/01-pkm", "ablation/03-half-vdim-proj", "ablation/07-ive",
                 "ablation/10-improved-init"]
VARIANTS = [("ultramem-tiny", {"query_conv": None}), ("ultramem-tiny", {"query_conv": 1}),
            ("pkm-tiny", {"query_conv": 2}), ("ultramem-tiny", {"share_query": False, "value_expansion": 9})]


def example_specs():
    specs = [load_spec(SPECS / f"{name}.yaml") for name in EXAMPLE_SPECS]
    for name, changes in VARIANTS:
        spec = load_spec(SPECS / f"{name}.yaml")
        specs.append(dataclasses.replace(spec, memory=dataclasses.replace(spec.memory, **changes)))
    return specs


def collect_examples():
    """op -> distinct (input types, attrs) found in the graphs of the example specs, lowered, after each pass, and
    with their value tables sharded."""
    found: dict[str, dict] = {}
    for spec in example_specs():
        for graph in lower(spec).values():
            optimized = [result.graph for result in run_pipeline(graph)]
            if any(n.op == "lookup_pool" for n in optimized[-1].nodes):  # and split over 2 ranks, both ways
                optimized += [partition_memory(2, p)(optimized[-1])[0] for p in ("number", "dimension")]
            for g in (graph, *optimized):
                for node in g.all_nodes():
                    key = (tuple(v.type for v in node.inputs), node.attrs)
                    found.setdefault(node.op, {}).setdefault(key, None)
    return {op: list(examples) for op, examples in found.items()}


EXAMPLES = collect_examples()
DECOMPOSED = sorted(name for name, op in OPS.items() if not op.primitive)


def test_every_decomposed_op_appears_in_some_graph():
    assert set(DECOMPOSED) <= set(EXAMPLES), sorted(set(DECOMPOSED) - set(EXAMPLES))
    assert {"gather_pool", "norm_conv_query_proj", "conv_query_proj", "gathered_rank_scores", "key_scores"} <= set(DECOMPOSED)


def check_op(op: str, dtype: str) -> None:
    """The op's torch implementation against its decomposition on every example instance; AssertionError if not."""
    low = "bf16" if dtype == "bfloat16" else "f32"
    for n, (types, attrs) in enumerate(EXAMPLES[op]):
        check_instance(op, types, attrs, lambda inputs: run_impl(op, attrs, inputs), n, low)


@pytest.mark.parametrize("op", DECOMPOSED)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_implementation_equals_decomposition(op, dtype):
    check_op(op, dtype)


def test_a_wrong_decomposition_is_caught(monkeypatch):
    """The comparison can fail: a gather_pool decomposition that forgets the core scaling, or a grid_select one
    whose addresses are off by one, is caught by the same check."""
    def unscaled(b, ins, attrs):
        table, row, block, scores = ins
        pooled = b.one("scatter_blocks", b.one("gather_values", table, row), block, E=attrs["E"])
        return (b.one("reshape", pooled, shape=(*row.type.shape[:2], attrs["E"] * table.type.shape[1])),)

    def next_best(b, ins, attrs):
        address, scores = HONEST_GRID_SELECT(b, ins, attrs)
        return b.one("add_scalar", address, value=1), scores

    for op, wrong in (("gather_pool", unscaled), ("grid_select", next_best)):
        monkeypatch.setitem(OPS, op, dataclasses.replace(OPS[op], decompose=wrong))
        for dtype in ("float32", "bfloat16"):
            with pytest.raises(AssertionError):
                check_op(op, dtype)


HONEST_GRID_SELECT = OPS["grid_select"].decompose


@pytest.mark.parametrize("name", ["ultramem-tiny", "pkm-tiny"])
def test_optimized_graph_expanded_to_primitives_computes_the_same(name):
    spec = load_spec(SPECS / f"{name}.yaml")
    weights = build_model(spec).state_dict()
    for graph in lower(spec).values():
        optimized = run_pipeline(graph)[-1].graph
        primitive = expand(optimized)
        assert all(OPS[n.op].primitive for n in primitive.all_nodes())
        feeds = random_inputs(optimized, spec.model.vocab_size)
        assert_outputs_close(run_graph(optimized, weights, feeds), run_graph(primitive, weights, feeds))


def test_every_op_has_one_torch_implementation_and_selections_can_be_forced():
    assert set(OPS) == set(TORCH_IMPLS)
    assert {name for name, op in OPS.items() if op.selection} == set(FORCED_IMPLS)
    with pytest.raises(ValueError, match="two torch implementations"):
        impl("gather_pool")(lambda attrs, *xs: xs)
    with pytest.raises(IRError, match="two decompositions"):
        decomposition("gather_pool")(lambda b, ins, attrs: ins)
