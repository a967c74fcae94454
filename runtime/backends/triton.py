"""The "triton" backend: the optimized graph with generated Triton kernels for its kernel-sized ops.

Every node with a kernel renderer (``umc.kernels``) runs its kernel; every other node runs its torch
implementation, as in the graph backend. Kernels come from the build's ``kernels/`` directory (each
file checked to be exactly what this umc renders for that node), or are rendered afresh when there
is no build (a golden file's layer). On a CUDA machine everything runs on the GPU; without one the
kernels run in Triton's interpreter, which is for correctness only. The interpreter must be switched on
(``TRITON_INTERPRET=1``) before Triton is first imported — and torch imports it early — so importing this
module (that is, ``umc.runtime``) on a machine without CUDA sets ``TRITON_INTERPRET=1`` unless the
environment already says otherwise or Triton is already loaded.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable

import torch

from umc.ir.core import Graph
from umc.kernels import RENDERERS, load
from umc.manifest import parse_manifest
from umc.runtime.backends import BackendError, register_backend
from umc.runtime.backends.graph import GraphBackend


if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


INTERPRETER_ON = ("1", "true", "on", "yes")


def _device() -> torch.device:
    """The GPU when there is one; else the CPU, where the kernels need Triton's interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET", "").lower() not in INTERPRETER_ON:
        raise BackendError("no GPU here, and Triton's interpreter is off: run with TRITON_INTERPRET=1 "
                           "(set before anything imports Triton)")
    return torch.device("cpu")


@register_backend
class TritonBackend(GraphBackend):
    """Generated Triton kernels for coarse_topm, grid_topm and lookup_pool; torch for the rest."""

    name = "triton"
    shardable = False

    @classmethod
    def unavailable(cls) -> str | None:
        """Triton must be installed (it runs through its interpreter on a machine without a GPU)."""
        return None if importlib.util.find_spec("triton") else "the triton package is not installed"

    def __init__(self, graphs, weights, threads=True, artifacts=None):
        self.device = _device()
        # Triton's interpreter keeps global state: kernels of concurrent branches must not run at once on the CPU
        threads = threads and self.device.type == "cuda"
        super().__init__(graphs, {k: v.to(self.device) for k, v in weights.items()}, threads, artifacts)

    def overrides(self, graph: Graph) -> dict[int, Callable]:
        """Each kernel-sized node's kernel, checked against the build's kernels/ (or rendered afresh without a
        build); BackendError when the graph has memory layers but no kernel-sized node (built without the
        kernel_fusion pass: nothing would run as a kernel)."""
        directory, listed = None, frozenset()
        if self.artifacts is not None:
            directory, listed = self.artifacts / "kernels", frozenset(parse_manifest(self.artifacts)["artifacts"])
        out = {}
        for i, node in enumerate(graph.nodes):
            if node.op in RENDERERS:
                module = load(RENDERERS[node.op](node), directory, listed)
                out[i] = lambda attrs, *inputs, launch=module.launch: launch(*inputs)
        if not out and any(n.scope.unit is not None for n in graph.nodes):
            raise BackendError(f"graph {graph.name} has no kernel-sized op (built without the kernel_fusion pass?): "
                               "the triton backend would run no kernel; use --backend graph")
        return out

    def run(self, kind, feeds, sizes, force=None, observer=None):
        """See ``Backend.run``: inputs moved to the device, outputs back to the CPU; selections cannot be forced."""
        if force:
            raise BackendError("the triton backend cannot force selections (use the graph backend)")
        outputs = super().run(kind, {k: v.to(self.device) for k, v in feeds.items()}, sizes, None, observer)
        return {k: v.cpu() for k, v in outputs.items()}
