"""Checking one op instance against its definition: inputs sampled by the op's declared operand constraints,
its decomposition run in the instance's dtype and in float64, and a comparison that is tie-aware for selections.
Shared by the decomposition tests (torch implementations) and the kernel tests (generated Triton kernels)."""

import math

import torch

from graph_inputs import run_graph
from umc.dtypes import torch_dtype
from umc.ir.builder import GraphBuilder
from umc.ir.core import TensorType
from umc.ir.dims import evaluate_shape
from umc.ir.expand import decomposition_graph
from umc.ir.ops import OPS
from umc.runtime.torch_ops import TORCH_IMPLS
from umc.verify import Stage, judge

SIZES = {"B": 2, "T": 3, "S_past": 2}
TOLERANCE = {"f32": 1e-5, "bf16": 8 * 2**-8, "f16": 8 * 2**-11}  # float16/bfloat16: eight rounding steps of the scale


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


def check_instance(op: str, types, attrs, produce, seed: int, dtype: str, reference=None) -> None:
    """``produce(inputs)`` (an implementation or a kernel) on sampled inputs of types ``types`` cast to ``dtype``
    (an IR name) against ``reference(inputs)`` (default: the op's decomposition run in that dtype); both within
    the dtype's tolerance of the decomposition run in float64, selections tie-aware. AssertionError if not."""
    types = as_dtype(types, dtype)
    inputs = sample_inputs(op, types, dict(attrs), seed=seed)
    got = list(produce(inputs))
    want = list(reference(inputs)) if reference else run_decomposition(op, types, attrs, inputs)
    exact = run_decomposition(op, as_dtype(types, "f64"), attrs, cast_floats(inputs, torch.float64))
    tolerance = TOLERANCE[dtype]
    selection = OPS[op].selection
    if selection is None:
        assert_close(op, got, want, exact, tolerance)
        return
    k = selection.chosen
    for chosen in (got[k], want[k]):  # both are top-m choices up to the rounding of the dtype
        verdict = judge(candidate_stage(op, types, attrs, inputs, chosen, dtype))
        assert not verdict.failed.any(), (op, seed, "selection not admissible")
    as_set = lambda outs: outs[k].sort(-1).values
    same = ((as_set(got) == as_set(want)) & (as_set(want) == as_set(exact))).all(-1)
    assert same.float().mean() > 0.5, (op, seed, "most selections should not be ties")
    pick = lambda outs: [o[same] for o in aligned(outs, k, outs[k])]
    assert_close(op, pick(got), pick(want), pick(exact), tolerance)
