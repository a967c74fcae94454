"""Random inputs for executing IR graphs directly (tokens, past KV, conv state), from the graph's own types."""

import torch

from umc.ir.core import Graph
from umc.runtime.graph_backend import TORCH_DTYPES

SIZES = {"B": 2, "T": 5, "S_past": 4}


def concrete(shape) -> list[int]:
    """Symbolic dims bound to small sizes."""
    return [d if isinstance(d, int) else sum(int(p) if p.isdigit() else SIZES[p] for p in d.split("+")) for d in shape]


def random_inputs(graph: Graph, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor per graph input: tokens in range, everything else standard normal."""
    gen = torch.Generator().manual_seed(seed)
    feeds = {}
    for value in graph.inputs:
        shape = concrete(value.type.shape)
        if value.type.dtype == "i64":
            feeds[value.name] = torch.randint(0, vocab, shape, generator=gen)
        else:
            feeds[value.name] = torch.randn(shape, generator=gen).to(TORCH_DTYPES[value.type.dtype])
    return feeds
