"""Running IR graphs directly in tests: random inputs from the graph's own types, and one call of the
graph backend (weights bound, inputs checked)."""

import torch

from umc.dtypes import torch_dtype
from umc.ir.core import Graph
from umc.ir.dims import evaluate_shape
from umc.runtime.backends.graph import GraphBackend
from umc.runtime.checks import check_feeds

SIZES = {"B": 2, "T": 5, "S_past": 4}


def random_inputs(graph: Graph, vocab: int, seed: int = 0, sizes: dict | None = None) -> dict[str, torch.Tensor]:
    """One tensor per graph input: tokens in range, everything else standard normal."""
    gen = torch.Generator().manual_seed(seed)
    feeds = {}
    for value in graph.inputs:
        shape = evaluate_shape(value.type.shape, sizes or SIZES)
        if value.type.dtype == "i64":
            feeds[value.name] = torch.randint(0, vocab, shape, generator=gen)
        else:
            feeds[value.name] = torch.randn(shape, generator=gen).to(torch_dtype(value.type.dtype))
    return feeds


def run_graph(graph: Graph, weights, feeds, threads=False, force=None, observer=None) -> dict[str, torch.Tensor]:
    """Every named output of ``graph`` on ``feeds`` through the graph backend."""
    backend = GraphBackend({graph.name: graph}, weights, threads=threads)
    return backend.run(graph.name, feeds, check_feeds(graph, feeds), force=force, observer=observer)
