"""Graph passes. Each is pure: Graph -> (Graph, notes); the pipeline verifies after every pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from umc.ir.core import Graph
from umc.ir.verify import verify
from umc.passes.cleanup import cleanup
from umc.passes.ive_projector_merging import ive_projector_merging
from umc.passes.kernel_fusion import kernel_fusion
from umc.passes.query_conv_folding import query_conv_folding
from umc.passes.skip_layer_overlap import skip_layer_overlap

Pass = Callable[[Graph], tuple[Graph, list[str]]]


@dataclass(frozen=True)
class PassResult:
    """One pass applied to one graph: the graph after it and what it changed."""

    name: str
    graph: Graph
    notes: tuple[str, ...]


PASSES: dict[str, Pass] = {
    "skip_layer_overlap": skip_layer_overlap,
    "query_conv_folding": query_conv_folding,
    "ive_projector_merging": ive_projector_merging,
    "kernel_fusion": kernel_fusion,
    "cleanup": cleanup,
}
PIPELINE: tuple[str, ...] = tuple(PASSES)


def apply_pass(name: str, graph: Graph) -> PassResult:
    """One pass, the graph verified after it."""
    after, notes = PASSES[name](graph)
    return PassResult(name, verify(after), tuple(notes))


def run_pipeline(graph: Graph, names: tuple[str, ...] = PIPELINE) -> list[PassResult]:
    """Apply the named passes in order, verifying after each; one result per pass."""
    results = []
    for name in names:
        results.append(apply_pass(name, graph))
        graph = results[-1].graph
    return results
