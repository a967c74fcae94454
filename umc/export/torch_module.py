"""An IR graph as a ``torch.nn.Module``: what ``torch.export`` and Torch-TensorRT take.

The module is the graph backend's own program (``umc.runtime.backends.graph.Program``) with two changes: the
weights and the load-time values (keys normalized, rank folded, ...) are computed once at construction and held
as buffers, and every fused op that has a custom op (``umc.export.torch_library``) runs as ``torch.ops.umc.<op>``
so a trace records it as one node. Every other op runs its ``TORCH_IMPLS`` entry, exactly as the graph backend
does, so the module computes what the graph backend computes. Symbolic attribute sizes (``B``, ``T``,
``S_past``) are bound from the inputs' shapes on each call, which under ``torch.export`` are symbolic too.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from torch.export import Dim

from umc.dtypes import torch_dtype
from umc.export.torch_library import FAKES, custom_impl
from umc.ir.core import Graph
from umc.ir.dims import Sym, evaluate_shape
from umc.runtime.backends.graph import GraphBackend, Program, bind_shared
from umc.runtime.checks import check_feeds, check_weights
from umc.spec import Spec

EXAMPLE_SIZES = {"B": 2, "T": 3, "S_past": 3}  # what torch.export traces with: not 0 or 1, which it would specialize


class GraphModule(torch.nn.Module):
    """One IR graph with bound weights; ``forward(*inputs)`` takes the graph's inputs in order and returns its
    outputs in order (a tuple)."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor]):
        super().__init__()
        check_weights({graph.name: graph}, weights)
        self.graph = graph
        self.program = Program(graph, {i: custom_impl(n.op) for i, n in enumerate(graph.nodes) if n.op in FAKES})
        param_names = {p.id: p.name for p in graph.params}
        self.buffer_of: dict[int, str] = {}
        for value_id, tensor in bind_shared({graph.name: graph}, weights)[graph.name].items():
            name = re.sub(r"\W", "_", param_names[value_id]) if value_id in param_names else f"load_time_{value_id}"
            self.register_buffer(name, tensor)
            self.buffer_of[value_id] = name

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs for its inputs (InputError when they do not fit its declared types)."""
        feeds = {value.name: tensor for value, tensor in zip(self.graph.inputs, inputs, strict=True)}
        sizes = check_feeds(self.graph, feeds)
        env = {value_id: getattr(self, name) for value_id, name in self.buffer_of.items()}
        env.update({value.id: feeds[value.name] for value in self.graph.inputs})
        outputs = self.program.run(env, sizes)
        return tuple(outputs[value.name] for value in self.graph.outputs)


def graph_module(graph: Graph, weights: Mapping[str, torch.Tensor]) -> GraphModule:
    """``graph`` with ``weights`` bound (checked, load-time nodes run once) as a torch module whose fused ops are
    ``torch.ops.umc`` custom ops (BindError when the weights do not fit)."""
    return GraphModule(graph, weights)


def size_ranges(spec: Spec, max_batch: int) -> dict[str, tuple[int, int]]:
    """The (min, max) of each size symbol a build's graphs use: batch up to ``max_batch``, the new tokens ``T``
    and the cached ones ``S_past`` within the spec's ``max_seq_len``."""
    longest = spec.model.max_seq_len
    return {"B": (1, max_batch), "T": (1, longest), "S_past": (1, longest - 1)}


def _symbol(dim) -> str | None:
    """The name of a dim that is one size symbol (``B``), else None (ints, ``S_past+1``)."""
    if isinstance(dim, Sym) and len(dim.symbols) == 1:
        name = next(iter(dim.symbols))
        return name if dim == Sym.of(name) else None
    return None


def dynamic_shapes(graph: Graph, ranges: Mapping[str, tuple[int, int]]) -> dict[str, tuple[dict[int, Dim], ...]]:
    """``torch.export``'s ``dynamic_shapes`` for a graph module (keyed by ``forward``'s ``*inputs``): each axis
    declared as a size symbol gets that symbol's ``Dim`` (one per name, so every input's ``B`` is the same size),
    within ``ranges``."""
    dims = {name: Dim(name, min=low, max=high) for name, (low, high) in ranges.items()}
    return {"inputs": tuple({axis: dims[_symbol(d)] for axis, d in enumerate(value.type.shape) if _symbol(d)}
                            for value in graph.inputs)}


def example_inputs(graph: Graph, sizes: Mapping[str, int], vocab: int, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Random inputs of the graph's declared types at ``sizes`` on ``device``: integer inputs (the tokens) in
    [0, vocab), floats standard normal."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for value in graph.inputs:
        shape, dtype = evaluate_shape(value.type.shape, sizes), torch_dtype(value.type.dtype)
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.randint(0, vocab, shape, generator=generator, dtype=dtype))
    return tuple(x.to(device) for x in inputs)


def export_graph(module: GraphModule, ranges: Mapping[str, tuple[int, int]],
                 vocab: int) -> torch.export.ExportedProgram:
    """``torch.export`` of a graph module (on its buffers' device) with its size symbols dynamic within ``ranges``,
    traced at ``EXAMPLE_SIZES``. Traced without autograd, as the graph backend runs: a grad-mode switch inside
    the trace would wrap the whole graph in one higher-order node."""
    graph, device = module.graph, next(module.buffers()).device
    with torch.no_grad():
        return torch.export.export(module, example_inputs(graph, EXAMPLE_SIZES, vocab, device=device),
                                   dynamic_shapes=dynamic_shapes(graph, ranges))


def custom_op_counts(program: torch.export.ExportedProgram) -> dict[str, int]:
    """How many ``torch.ops.umc.*`` nodes the exported program calls, per op name."""
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "umc":
            name = node.target.name().split("::")[1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def difference_from_graph_backend(run: Callable[..., tuple[torch.Tensor, ...]], graph: Graph,
                                  weights: Mapping[str, torch.Tensor], sizes: Mapping[str, int], vocab: int,
                                  seed: int = 1, device: torch.device | str = "cpu") -> float:
    """``run(*inputs)`` (an exported program's module, a compiled one) on ``device`` against the graph backend on
    the CPU, on random inputs at ``sizes``: the largest difference of any output relative to that output's largest
    magnitude (0.0 when identical; inf when a shape, a dtype or an integer output, e.g. a selection, differs)."""
    inputs = example_inputs(graph, sizes, vocab, seed)
    feeds = {value.name: tensor for value, tensor in zip(graph.inputs, inputs)}
    want = GraphBackend({graph.name: graph}, weights, threads=False).run(graph.name, feeds, check_feeds(graph, feeds))
    with torch.no_grad():
        got = [t.cpu() for t in run(*(x.to(device) for x in inputs))]
    worst = 0.0
    for value, tensor in zip(graph.outputs, got, strict=True):
        expected = want[value.name]
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            return float("inf")
        if not expected.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(tensor, expected) else float("inf"))
        elif expected.numel():
            scale = max(expected.double().abs().max().item(), 1e-30)
            worst = max(worst, (tensor.double() - expected.double()).abs().max().item() / scale)
    return worst
