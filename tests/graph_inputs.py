"""Running IR graphs directly in tests: random values from the graph's own types, one call of the graph
backend (weights bound, inputs checked), and comparing two runs' outputs."""

import torch

from umc.dtypes import torch_dtype
from umc.ir.core import Graph
from umc.ir.dims import evaluate_shape
from umc.runtime.backends.graph import GraphBackend
from umc.runtime.checks import check_feeds

SIZES = {"B": 2, "T": 5, "S_past": 4}


def random_values(values, seed: int, sizes: dict | None = None, ranges: dict | None = None) -> dict[str, torch.Tensor]:
    """A tensor per named value: integers below ``ranges[name]`` (a 1-D integer value without a range is a
    permutation), floats standard normal; symbolic dims bound by ``sizes``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for value in values:
        shape = evaluate_shape(value.type.shape, sizes or SIZES)
        if value.type.dtype == "i64":
            bound = (ranges or {}).get(value.name)
            out[value.name] = torch.randint(0, bound, shape, generator=gen) if bound else torch.randperm(shape[0], generator=gen)
        else:
            out[value.name] = torch.randn(shape, generator=gen).to(torch_dtype(value.type.dtype))
    return out


def random_inputs(graph: Graph, vocab: int, seed: int = 0, sizes: dict | None = None) -> dict[str, torch.Tensor]:
    """One tensor per graph input: tokens in range, everything else standard normal."""
    return random_values(graph.inputs, seed, sizes, {"tokens": vocab})


def run_graph(graph: Graph, weights, feeds, threads=False, force=None, observer=None) -> dict[str, torch.Tensor]:
    """Every named output of ``graph`` on ``feeds`` through the graph backend."""
    backend = GraphBackend({graph.name: graph}, weights, threads=threads)
    return backend.run(graph.name, feeds, check_feeds(graph, feeds), force=force, observer=observer)


def assert_outputs_close(want: dict, got: dict, tolerance: float = 1e-5) -> None:
    """The same output names, each within ``tolerance`` x max |want|."""
    assert set(want) == set(got)
    for name in want:
        scale = max(want[name].double().abs().max().item(), 1e-30)
        assert (got[name].double() - want[name].double()).abs().max().item() <= tolerance * scale, name
