"""Sessions: a build directory plus weights, ready to prefill and decode through any registered backend.

``load(build_dir, backend="graph", weights=...)`` checks the manifest (format and hashes),
reads and re-verifies the final prefill and decode graphs, checks the weights against them
(names, shapes, dtypes, finiteness, permutations) and hands them to the backend. The session
owns everything that does not depend on the backend: token and state checks, the sequence
length limit, and the state dict (keyed by the graphs' declared state slots).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from umc.ir.core import TAP_STAGES, Graph, IRError
from umc.ir.serialize import graph_from_json
from umc.lower import GRAPH_KINDS
from umc.manifest import BuildDirError, read_manifest
from umc.report import build_shards
from umc.runtime.backends import BACKENDS, BackendError, lookup_backend
from umc.runtime.distributed import World, table_slices
from umc.runtime.checks import InputError, check_feeds, check_state, check_tokens, check_weights
from umc.spec import Spec, SpecError, spec_from_dict

Taps = dict[int, dict[str, torch.Tensor]]


class State(dict):
    """A session's state (slot name -> tensor: KV caches, conv states), tagged with the build that made it and its
    batch size, so continuing it in another build's session, or with another batch, is a clear error. A ragged
    batch (``Session.batch`` of sequences with different pasts) also carries each sequence's past length
    (``lengths``, (B,) int64); its KV caches are left-padded to the longest."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], build_id: str, batch: int,
                 lengths: torch.Tensor | None = None):
        super().__init__(tensors)
        self.build_id = build_id
        self.batch = batch
        self.lengths = lengths


@dataclass(frozen=True)
class BuildFiles:
    """What a runtime reads from a verified build directory."""

    path: Path
    manifest: dict
    spec: Spec
    graphs: dict[str, Graph]

    @property
    def weights_file(self) -> Path | None:
        """The build's ``weights.safetensors`` when its manifest lists it (its hash was checked), else None: a file
        the manifest does not list is never used."""
        return self.path / "weights.safetensors" if "weights.safetensors" in self.manifest["artifacts"] else None


def read_build(build_dir: str | Path) -> BuildFiles:
    """Manifest (format, hashes), spec and graphs of a build, each verified; BuildDirError names what is wrong."""
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    listed = manifest["artifacts"]
    missing = [name for name in ("spec.json", *(f"graphs/{kind}.json" for kind in GRAPH_KINDS)) if name not in listed]
    if missing:
        raise BuildDirError(f"{build_dir}: the manifest does not list {', '.join(missing)}")
    try:
        spec = spec_from_dict(json.loads((build_dir / "spec.json").read_text()), source=str(build_dir / "spec.json"))
    except (ValueError, SpecError) as exc:
        raise BuildDirError(f"{build_dir}/spec.json: {exc}") from None
    graphs = {}
    for kind in GRAPH_KINDS:
        path = build_dir / "graphs" / f"{kind}.json"
        try:
            graphs[kind] = graph_from_json(json.loads(path.read_text()))
            check_ports(graphs[kind], spec, decode=kind != "prefill", ragged=kind == "decode_ragged")
        except (ValueError, IRError) as exc:
            raise BuildDirError(f"{path}: not a valid umc graph: {exc}") from None
    return BuildFiles(build_dir, manifest, spec, graphs)


def check_ports(graph: Graph, spec: Spec, decode: bool, ragged: bool = False) -> None:
    """IRError unless the graph declares what its spec implies: tokens in (and each sequence's past length in a
    ragged decode graph), logits out, every memory unit's five taps, and KV state for every block (read back in
    decode graphs) plus conv state for every unit with one."""
    names = {v.name for v in graph.inputs}
    if "tokens" not in names or "logits" not in {v.name for v in graph.outputs}:
        raise IRError("the graph does not take tokens and give logits")
    if ragged != ("past_len" in names):
        raise IRError("a ragged decode graph, and only one, takes past_len")
    units = len(spec.memory.units)
    taps = {(t.unit, t.stage) for t in graph.taps}
    wanted = {(j, stage) for j in range(units) for stage in TAP_STAGES}
    if taps != wanted:
        raise IRError(f"the graph's selection taps do not match the spec's {units} memory units")
    conv = units if spec.memory.query_conv and spec.memory.query_conv > 1 else 0
    slots = {(s.kind, s.index, s.input is not None) for s in graph.state}
    expected = {(kind, i, decode) for i in range(spec.model.n_layers) for kind in ("kv_k", "kv_v")}
    expected |= {("conv", j, decode) for j in range(conv)}
    if slots != expected:
        raise IRError("the graph's state slots do not match the spec's blocks and memory units")


def _left_fit(cache: torch.Tensor, length: int) -> torch.Tensor:
    """A KV cache (B, kv, S, hd) as its last ``length`` positions, zero-padded at the front when shorter."""
    have = cache.shape[2]
    if have >= length:
        return cache[:, :, have - length:]
    return torch.cat([cache.new_zeros(*cache.shape[:2], length - have, cache.shape[3]), cache], 2)


def build_id(build: BuildFiles) -> str:
    """What identifies a build's graphs: the sha256 of their files (identical graphs, identical id)."""
    artifacts = build.manifest["artifacts"]
    return hashlib.sha256("".join(artifacts[f"graphs/{kind}.json"] for kind in GRAPH_KINDS).encode()).hexdigest()


def _taps(graph: Graph, outputs: dict[str, torch.Tensor]) -> Taps:
    taps: Taps = {}
    for tap in graph.taps:
        taps.setdefault(tap.unit, {})[tap.stage] = outputs[tap.output]
    return taps


class Session:
    """Prefill and decode through one backend; the state is a dict of named tensors (``StateSlot.name``).

    A sharded build runs in a ``world`` of its shard count: each rank decodes its own sequences, holds its piece
    of every value table (whole tables given are cut) and exchanges values in each lookup."""

    def __init__(self, build: BuildFiles, weights: Mapping[str, torch.Tensor], backend: str = "graph",
                 threads: bool = True, world: World | None = None):
        backend_class = lookup_backend(backend)
        slices = check_world(build, world, backend_class)
        shapes = {name: _shard_shape(build, name, cut) for name, cut in slices.items()}
        weights = {name: (_cut(t, slices[name]).contiguous() if name in slices and t.shape != shapes[name] else t)
                   for name, t in weights.items()}
        check_weights(build.graphs, weights, shapes)
        self.build = build
        self.spec = build.spec
        self.graphs = build.graphs
        self.world = world
        self.table_bytes = {name: weights[name].nbytes for name in slices}  # this rank's pieces of the tables
        extra = {"world": world} if world is not None else {}
        self.backend = backend_class(build.graphs, weights, threads=threads, artifacts=build.path, **extra)
        self.build_id = build_id(build)

    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, State]:
        """tokens (B, T) -> logits (B, T, vocab) and the state to continue from."""
        logits, state, _ = self.trace_prefill(tokens)
        return logits, state

    def decode(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token per sequence (B, 1) after ``state`` -> logits (B, 1, vocab) and the new state."""
        logits, state, _ = self.trace_decode(tokens, state)
        return logits, state

    def trace_prefill(self, tokens: torch.Tensor, force: Mapping[str, torch.Tensor] | None = None):
        """prefill, plus each memory unit's selection taps {unit: {stage: tensor}} (rows, cols, grid, scores)."""
        check_tokens(tokens, self.spec.model.vocab_size)
        return self._run("prefill", {"tokens": tokens}, force)

    def trace_decode(self, tokens: torch.Tensor, state: State, force: Mapping[str, torch.Tensor] | None = None):
        """decode, plus the selection taps."""
        check_tokens(tokens, self.spec.model.vocab_size)
        if isinstance(state, State) and state.build_id != self.build_id:
            raise InputError(f"the state comes from another build (build id {state.build_id[:12]}, this session's is "
                             f"{self.build_id[:12]}); continue it with the session that made it")
        if isinstance(state, State) and state.batch != tokens.shape[0]:
            raise InputError(f"the state holds {state.batch} sequences but tokens has {tokens.shape[0]} rows; "
                             "decode one token per sequence of the state")
        feeds = {"tokens": tokens, **check_state(self.graphs["decode"], state)}
        lengths = state.lengths if isinstance(state, State) else None
        if lengths is None:
            return self._run("decode", feeds, force)
        logits, new_state, taps = self._run("decode_ragged", {**feeds, "past_len": lengths}, force)
        new_state.lengths = lengths + tokens.shape[1]
        return logits, new_state, taps

    def batch(self, states: list[State]) -> State:
        """One state holding every sequence of ``states`` (each from this session, any past lengths), so one decode
        call serves sequences that arrived at different times: KV caches left-padded to the longest past, each
        sequence's own length kept (decoding it equals decoding each sequence alone). Equal lengths give an
        ordinary state."""
        if not states or not all(isinstance(st, State) and st.build_id == self.build_id for st in states):
            raise InputError("batch takes a non-empty list of states this session's build returned")
        own = [st.lengths if st.lengths is not None else torch.full((st.batch,), self._past(st), dtype=torch.int64)
               for st in states]
        lengths = torch.cat(own)
        longest = int(lengths.max())
        merged = {}
        for name in states[0]:
            parts = states[0][name], *(st[name] for st in states[1:])
            if name.startswith("kv_"):
                parts = [_left_fit(part, longest) for part in parts]
            merged[name] = torch.cat(parts, 0)
        uniform = bool((lengths == longest).all())
        return State(merged, self.build_id, int(lengths.numel()), None if uniform else lengths)

    def unbatch(self, state: State) -> list[State]:
        """One state per sequence of ``state`` (its padding removed): to continue, drop or re-batch sequences."""
        if not isinstance(state, State) or state.build_id != self.build_id:
            raise InputError("unbatch takes a state this session's build returned")
        past = self._past(state)
        lengths = state.lengths if state.lengths is not None else torch.full((state.batch,), past, dtype=torch.int64)
        return [State({name: (t[b:b + 1, :, past - int(lengths[b]):] if name.startswith("kv_") else t[b:b + 1])
                       for name, t in state.items()}, self.build_id, 1) for b in range(state.batch)]

    def _past(self, state: State) -> int:
        """The KV caches' length (positions, padding included) of a state."""
        slot = next(s for s in self.graphs["decode"].state if s.kind == "kv_k")
        return state[slot.name].shape[2]

    def _run(self, kind: str, feeds: dict[str, torch.Tensor], force):
        graph = self.graphs[kind]
        sizes = check_feeds(graph, feeds)
        length = sizes.get("S_past", 0) + feeds["tokens"].shape[1]
        if length > self.spec.model.max_seq_len:
            raise InputError(f"sequence length {length} exceeds the spec's max_seq_len {self.spec.model.max_seq_len}")
        outputs = self.backend.run(kind, feeds, sizes, force)
        state = State({slot.name: outputs[slot.output] for slot in graph.state}, self.build_id, feeds["tokens"].shape[0])
        return outputs["logits"], state, _taps(graph, outputs)


def check_shard_count(build: BuildFiles, ranks: int) -> int:
    """The build's shard count; InputError unless ``ranks`` processes run it (an unsharded build: one)."""
    shards = build_shards(build.graphs["decode"])
    if shards != ranks:
        if shards == 1:
            raise InputError(f"{build.path} is not sharded, but {ranks} processes were asked for; compile it with "
                             f"--shard {ranks}, or run it without --nproc")
        raise InputError(f"{build.path} splits its value tables over {shards} ranks, but {ranks} process"
                         f"{'es were' if ranks > 1 else ' was'} asked for; run it with --nproc {shards}")
    return shards


def check_world(build: BuildFiles, world: World | None, backend) -> dict[str, tuple[int, int, int]]:
    """The value tables this rank holds a piece of, {name: (axis, start, stop)}; InputError when the build's shard
    count and the world's size differ (an unsharded build runs in a world of one), BackendError when the backend
    cannot run a sharded build."""
    shards = check_shard_count(build, 1 if world is None else world.size)
    if shards > 1 and not backend.shardable:
        raise BackendError(f"backend {backend.name!r} does not run sharded builds (these do: "
                           f"{', '.join(n for n, c in BACKENDS.items() if c.shardable)})")
    return {} if world is None else table_slices(build.graphs, world.rank)


def _shard_shape(build: BuildFiles, name: str, cut: tuple[int, int, int]) -> tuple[int, ...]:
    axis, start, stop = cut
    shape = list(next(p.type.shape for p in build.graphs["decode"].params if p.name == name))
    shape[axis] = stop - start
    return tuple(shape)


def _cut(tensor, cut: tuple[int, int, int]):
    axis, start, stop = cut
    return tensor[start:stop] if axis == 0 else tensor[:, start:stop]


def load_weights_file(path: str | Path, slices: Mapping[str, tuple[int, int, int]] | None = None
                      ) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (BuildDirError naming the file if it cannot be read); of the tensors in
    ``slices`` only the given (axis, start, stop) piece is read."""
    try:
        if not slices:
            return load_file(str(path))
        with safe_open(str(path), "pt") as f:
            return {name: (_cut(f.get_slice(name), slices[name]).contiguous() if name in slices else f.get_tensor(name))
                    for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise BuildDirError(f"{path}: cannot read safetensors weights: {exc}") from None


def load(build_dir: str | Path, backend: str = "graph", weights: str | Path | Mapping[str, torch.Tensor] | None = None,
         threads: bool = True, world: World | None = None) -> Session:
    """Open a build directory with weights: a safetensors file, a state dict, or (default) the build's own
    ``weights.safetensors`` — used only if the manifest lists it (and its hash matched). A sharded build
    (``umc compile --shard P``) needs the ``world`` of a P-rank run (``World.from_env()`` inside torchrun); each
    rank reads only its piece of every value table."""
    build = read_build(build_dir)
    slices = check_world(build, world, lookup_backend(backend))
    if weights is None:
        if build.weights_file is None:
            raise BuildDirError(f"{build.path}: no weights given, and the build's manifest lists no weights.safetensors")
        weights = build.weights_file
    if not isinstance(weights, Mapping):
        weights = load_weights_file(weights, slices)
    return Session(build, weights, backend, threads, world)
