"""Sessions: a build directory plus weights, ready to prefill and decode.

``load(build_dir, backend="graph", weights=...)`` checks the manifest's hashes, reads
the final prefill and decode graphs, binds the weights by parameter name (the eager
model's state-dict names; inside memory layers, the authors' checkpoint names) and runs
their load-time nodes once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from umc.ir.serialize import graph_from_json
from umc.manifest import BuildDirError, read_manifest
from umc.runtime.graph_backend import BindError, bind, check_inputs, execute_checked

BACKENDS = ("graph",)


State = dict[str, torch.Tensor]


class Session:
    """Prefill and decode through one backend; the state is a dict of named tensors."""

    def __init__(self, build_dir: Path, weights: Mapping[str, torch.Tensor], backend: str, threads: bool):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (allowed: {', '.join(BACKENDS)})")
        read_manifest(build_dir)
        self.max_seq_len = json.loads((build_dir / "spec.json").read_text())["model"]["max_seq_len"]
        self.graphs = {kind: graph_from_json(json.loads((build_dir / f"graphs/{kind}.json").read_text()))
                       for kind in ("prefill", "decode")}
        self.bound = {kind: bind(graph, weights) for kind, graph in self.graphs.items()}
        self.threads = threads

    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, State]:
        """tokens (B, T) -> logits (B, T, vocab) and the state to continue from."""
        logits, state, _ = self._run("prefill", {"tokens": tokens}, trace=False)
        return logits, state

    def decode(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token per sequence (B, 1) after ``state`` -> logits (B, 1, vocab) and the new state."""
        logits, state, _ = self._run("decode", self._decode_feeds(tokens, state), trace=False)
        return logits, state

    def trace_prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, State, dict[int, torch.Tensor]]:
        """prefill, plus each memory unit's selected grid addresses (B, T, H*m) for tie-aware verification."""
        return self._run("prefill", {"tokens": tokens}, trace=True)

    def trace_decode(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, dict[int, torch.Tensor]]:
        """decode, plus each memory unit's selected grid addresses (B, 1, H*m)."""
        return self._run("decode", self._decode_feeds(tokens, state), trace=True)

    def _decode_feeds(self, tokens: torch.Tensor, state: State) -> dict[str, torch.Tensor]:
        feeds = {"tokens": tokens}
        for value in self.graphs["decode"].inputs:
            if value.name != "tokens":
                feeds[value.name] = state[value.name.replace("past_", "present_")]
        return feeds

    def _run(self, kind: str, feeds: dict[str, torch.Tensor], trace: bool):
        graph = self.graphs[kind]
        sizes = check_inputs(graph, feeds)
        length = sizes.get("S_past", 0) + (sizes["T"] if "T" in sizes else feeds["tokens"].shape[1])
        if length > self.max_seq_len:
            raise BindError(f"sequence length {length} exceeds the spec's max_seq_len {self.max_seq_len}")
        taps = selection_taps(graph) if trace else {}
        out = execute_checked(graph, self.bound[kind], feeds, self.threads, observe={f"selection.{j}": i for j, i in taps.items()})
        selections = {j: out.pop(f"selection.{j}").flatten(2) for j in taps}
        return out.pop("logits"), out, selections


def selection_taps(graph) -> dict[int, int]:
    """Memory unit index -> id of the value holding its selected grid addresses (B, T, H, m)."""
    return {int(n.scope.split(".")[0][len("mem"):]): n.outputs[0].id
            for n in graph.nodes if n.op in ("grid_select", "additive_select")}


def load(build_dir: str | Path, backend: str = "graph", weights: str | Path | Mapping[str, torch.Tensor] | None = None,
         threads: bool = True) -> Session:
    """Open a build directory with weights: a safetensors file, a state dict, or (default)
    ``build_dir/weights.safetensors``."""
    build_dir = Path(build_dir)
    if weights is None:
        weights = build_dir / "weights.safetensors"
        if not weights.is_file():
            raise BuildDirError(f"{build_dir}: no weights given and no weights.safetensors in the build")
    if not isinstance(weights, Mapping):
        weights = load_file(str(weights))
    return Session(build_dir, weights, backend, threads)
