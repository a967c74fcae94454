"""Every op with a decomposition: its torch implementation equals its decomposition on valid inputs, in float32
(1e-5) and bfloat16 (the dtype's tolerance; selections tie-aware). Inputs come from a sampler that honours the
operand constraints each op declares (indices in range, permutations), on the op instances that real graphs
contain (every shipped small spec, lowered and optimized). Also: whole optimized graphs expanded to primitives
compute what they compute, and the registries hold exactly one entry per op."""

import dataclasses
import math

import pytest
import torch

from conftest import SPECS
from graph_inputs import assert_outputs_close, random_inputs, run_graph
from umc.dtypes import torch_dtype
from umc.ir.builder import GraphBuilder
from umc.ir.core import IRError, TensorType
from umc.ir.dims import evaluate_shape
from umc.ir.expand import decomposition_graph, expand
from umc.ir.ops import OPS
from umc.ir.ops.registry import decomposition
from umc.lower import lower
from umc.passes import run_pipeline
from umc.reference import build_model
from umc.runtime.torch_ops import FORCED_IMPLS, TORCH_IMPLS, impl
from umc.spec import load_spec
from umc.verify import Stage, judge

SIZES = {"B": 2, "T": 3, "S_past": 2}
EXAMPLE_SPECS = ["ultramem-tiny", "pkm-tiny", "ablation/01-pkm", "ablation/03-half-vdim-proj", "ablation/07-ive",
                 "ablation/10-improved-init"]
VARIANTS = [("ultramem-tiny", {"query_conv": None}), ("ultramem-tiny", {"query_conv": 1}),
            ("pkm-tiny", {"query_conv": 2}), ("ultramem-tiny", {"share_query": False, "value_expansion": 9})]
BF16_TOLERANCE = 8 * 2**-8  # eight bfloat16 rounding steps of the output's scale


def example_specs():
    specs = [load_spec(SPECS / f"{name}.yaml") for name in EXAMPLE_SPECS]
    for name, changes in VARIANTS:
        spec = load_spec(SPECS / f"{name}.yaml")
        specs.append(dataclasses.replace(spec, memory=dataclasses.replace(spec.memory, **changes)))
    return specs


def collect_examples():
    """op -> distinct (input types, attrs) found in the graphs of the example specs, lowered and after each pass."""
    found: dict[str, dict] = {}
    for spec in example_specs():
        for graph in lower(spec).values():
            for g in (graph, *(result.graph for result in run_pipeline(graph))):
                for node in g.all_nodes():
                    key = (tuple(v.type for v in node.inputs), node.attrs)
                    found.setdefault(node.op, {}).setdefault(key, None)
    return {op: list(examples) for op, examples in found.items()}


EXAMPLES = collect_examples()
DECOMPOSED = sorted(name for name, op in OPS.items() if not op.primitive)


def sample_inputs(op: str, types, attrs, seed: int) -> list[torch.Tensor]:
    """Valid inputs for one op instance: each operand's declared constraint honoured, floats standard normal."""
    gen = torch.Generator().manual_seed(seed)
    ports = OPS[op].inputs
    shapes = [evaluate_shape(t.shape, SIZES) for t in types]
    names = [ports[min(i, len(ports) - 1)].name for i in range(len(types))]
    out = []
    for i, (t, shape) in enumerate(zip(types, shapes)):
        port = ports[min(i, len(ports) - 1)]
        if port.index_of:
            if len(port.index_of) == 1:
                bound = math.prod(attrs[name] for name in port.index_of[0].split("*"))
            else:
                source, axis = port.index_of
                axis = attrs[axis] if isinstance(axis, str) else axis
                bound = shapes[names.index(source)][axis]
            if port.distinct:
                rows = [torch.randperm(bound, generator=gen)[:shape[-1]] for _ in range(max(1, int(torch.tensor(shape[:-1]).prod())))]
                out.append(torch.stack(rows).reshape(shape))
            else:
                out.append(torch.randint(0, bound, shape, generator=gen))
        elif port.permutation:
            out.append(torch.randperm(shape[0], generator=gen))
        elif port.nonnegative or t.dtype == "i64":
            out.append(torch.randint(0, 1000, shape, generator=gen))
        else:
            out.append(torch.randn(shape, generator=gen).to(torch_dtype(t.dtype)))
    return out


def as_dtype(types, dtype: str):
    return tuple(TensorType(dtype, t.shape) if t.dtype in ("f32", "bf16", "f16", "f64") else t for t in types)


def run_decomposition(op, types, attrs, inputs):
    graph = decomposition_graph(op, types, dict(attrs))
    outs = run_graph(graph, {}, {f"in{i}": x for i, x in enumerate(inputs)})
    return [outs[name] for name in OPS[op].outputs]


def run_impl(op, attrs, inputs):
    concrete = dict(attrs)
    for a in OPS[op].attrs:
        if a.kind in ("dim", "dims") and a.name in concrete:
            value = concrete[a.name]
            concrete[a.name] = evaluate_shape(value, SIZES) if isinstance(value, tuple) else evaluate_shape((value,), SIZES)[0]
    return list(TORCH_IMPLS[op](concrete, *inputs))


def cast_floats(inputs, dtype):
    return [x.to(dtype) if x.is_floating_point() else x for x in inputs]


def candidate_stage(op, types, attrs, inputs, chosen, low_dtype):
    """The selection's candidates scored in float64 and in the low dtype, as a verification Stage."""
    selection = OPS[op].selection
    outs = {}
    for dtype in ("f64", low_dtype):
        b_types = as_dtype(types, dtype)
        b = GraphBuilder("candidates")
        values = tuple(b.input(f"in{i}", t) for i, t in enumerate(b_types))
        scores, ids = selection.candidates(b, values, dict(attrs))
        graph = b.build({"scores": scores, "ids": ids})
        feeds = {f"in{i}": x for i, x in enumerate(cast_floats(inputs, torch_dtype(dtype)))}
        outs[dtype] = run_graph(graph, {}, feeds)
    scores64, ids = outs["f64"]["scores"], outs["f64"]["ids"]
    rounding = (outs[low_dtype]["scores"].double() - scores64).abs().amax(-1)
    return Stage("candidates", chosen, ids, scores64, rounding)


def aligned(outputs, chosen_index, chosen):
    """Non-selection outputs reordered by the chosen ids (ties may order a selection differently)."""
    order = chosen.argsort(-1)
    result = []
    for k, out in enumerate(outputs):
        if k == chosen_index:
            result.append(chosen.gather(-1, order))
        elif out.shape[:order.dim()] == order.shape:
            index = order.reshape(*order.shape, *[1] * (out.dim() - order.dim())).expand(out.shape)
            result.append(out.gather(order.dim() - 1, index))
        else:
            result.append(out)
    return result


def assert_close(name, got, want, exact, tolerance):
    """Integer outputs equal; float outputs of both within ``tolerance`` x max |float64| of the float64 run."""
    for k, (g, w, e) in enumerate(zip(got, want, exact)):
        assert g.shape == w.shape == e.shape, (name, k)
        if not g.is_floating_point() or not g.numel():
            assert torch.equal(g, w), (name, k)
            continue
        scale = max(e.double().abs().max().item(), 1e-30)
        for x in (g, w):
            assert (x.double() - e.double()).abs().max().item() <= tolerance * scale, (name, k)


def test_every_decomposed_op_appears_in_some_graph():
    assert set(DECOMPOSED) <= set(EXAMPLES), sorted(set(DECOMPOSED) - set(EXAMPLES))
    assert {"gather_pool", "norm_conv_query_proj", "conv_query_proj", "gathered_rank_scores", "key_scores"} <= set(DECOMPOSED)


def check_op(op: str, dtype: str) -> None:
    """The op's torch implementation against its decomposition on every example instance; AssertionError if not."""
    low = "bf16" if dtype == "bfloat16" else "f32"
    for n, (types, attrs) in enumerate(EXAMPLES[op]):
        types = as_dtype(types, low)
        inputs = sample_inputs(op, types, dict(attrs), seed=n)
        got = run_impl(op, attrs, inputs)
        want = run_decomposition(op, types, attrs, inputs)
        exact = run_decomposition(op, as_dtype(types, "f64"), attrs, cast_floats(inputs, torch.float64))
        tolerance = 1e-5 if dtype == "float32" else BF16_TOLERANCE
        selection = OPS[op].selection
        if selection is None:
            assert_close(op, got, want, exact, tolerance)
            continue
        k = selection.chosen
        for chosen in (got[k], want[k]):  # both are top-m choices up to the rounding of the dtype
            verdict = judge(candidate_stage(op, types, attrs, inputs, chosen, low))
            assert not verdict.failed.any(), (op, n, "selection not admissible")
        as_set = lambda outs: outs[k].sort(-1).values
        same = ((as_set(got) == as_set(want)) & (as_set(want) == as_set(exact))).all(-1)
        assert same.float().mean() > 0.5, (op, n, "most selections should not be ties")
        pick = lambda outs: [o[same] for o in aligned(outs, k, outs[k])]
        assert_close(op, pick(got), pick(want), pick(exact), tolerance)


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
