"""One compiled memory layer as a torch module: the compiled counterpart of the authors' layer.

``compile_memory_layer(state_dict, config)`` takes what ``umc.reference.memory_layer_from_official``
takes (a layer's tensors under the authors' names and their config dict) and returns a module with
the same ``forward(x)``: the layer lowered, optimized by the whole pass pipeline and run by a
registered backend. For users who drop the layer into their own serving stack.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from umc.ir.core import Graph
from umc.lower import lower_layer
from umc.official import official_memory_spec
from umc.passes import PIPELINE, run_pipeline
from umc.runtime.backends import lookup_backend
from umc.runtime.checks import check_feeds, check_weights


class CompiledMemoryLayer(torch.nn.Module):
    """``forward(x)``: x (..., D) -> the layer's output (..., D), through the backend the layer was compiled for."""

    def __init__(self, graph: Graph, runner, d_model: int):
        super().__init__()
        self.graph = graph
        self.runner = runner
        self.d_model = d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for every token of x (any leading shape), as the authors' layer returns it."""
        flat = x.reshape(1, -1, x.shape[-1])
        feeds = {"x": flat}
        out = self.runner.run("layer", feeds, check_feeds(self.graph, feeds))["out"]
        return out.reshape(*x.shape[:-1], -1)


def compile_memory_layer(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                         backend: str = "cpu", passes: tuple[str, ...] = PIPELINE) -> CompiledMemoryLayer:
    """The authors' layer (tensors ``state_dict``, config dict ``config``) compiled through ``passes`` for
    ``backend``: SpecError naming the config key when the config is invalid, BindError naming the tensor when
    the tensors do not fit it, BackendError when the backend cannot run here."""
    mem = official_memory_spec(config)
    d_model = int(config["hidden_size"])
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    graph = lower_layer(mem, d_model, str(dtype).removeprefix("torch."))
    graph = run_pipeline(graph, passes)[-1].graph if passes else graph
    weights = {p.name: state_dict[p.name] for p in graph.params if p.name in state_dict}
    check_weights({"layer": graph}, weights)
    runner = lookup_backend(backend)({"layer": graph}, weights, threads=False)
    return CompiledMemoryLayer(graph, runner, d_model)
