"""What ``umc bench`` times: the eager reference, ``torch.compile`` of it, and every registered backend.

A contender is a callable plus how it takes the shared inputs of one configuration. Every contender of a
configuration gets the same inputs: for a whole model the same token per sequence and the same past (one
KV cache and query-conv state, handed to each contender as its own view of the very same tensors: nothing
is copied, so every contender decodes from an identical past, and one that wrote into it would be caught by
``check_untouched``); for one memory layer the same input rows.

The past is seeded random data, not a prefilled prompt: a decode step's work does not depend on the values
in its KV cache, and prefilling 2000 tokens at batch 64 through the eager model would take longer than the
bench. The eager model and ``torch.compile`` of it decode the same step from that past on every call (their
decode concatenates onto the past each step, in a loop or not). A session is timed as a generation loop runs
it (``Contender.loop``): each call continues the state the previous call returned, so a backend that appends to
its KV cache in place (``cpu``) is not charged a copy of the whole past per step; the first call takes the shared
past (copying it, for ``cpu``) and never writes into it. The past grows by one position per call, a few dozen at
most over a bench (``calls_per_config``), and stays within max_seq_len.

Whole-model contenders load the build through ``umc.runtime.load`` with the eager model's state dict (the
weights are held once); ``onnxruntime`` needs the build exported (``onnx_build``). One memory layer
(``--layer-only``) is the authors' layer: ``memory_layer_from_official`` against
``umc.compile_memory_layer`` for each backend.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import safetensors
import torch
from safetensors.torch import load_file

from umc.bench.timing import Step
from umc.dtypes import torch_dtype
from umc.layer import compile_memory_layer
from umc.official import OFFICIAL_CONFIG_KEYS, official_memory_spec
from umc.reference import (DecodeState, MemoryLayer, build_memory_layer, build_model, load_weights,
                           memory_layer_from_official)
from umc.reference.init import init_memory
from umc.runtime import list_backends, load, read_build
from umc.spec import MemorySpec, Spec, SpecError, load_spec

EAGER = "eager"
COMPILED = "torch-compile"
TRITON_WITHOUT_GPU = ("no GPU here: triton would run its kernels in Triton's interpreter, which is for "
                      "correctness, not speed")

# the authors' released UltraMem 227M/1.2B memory layer (specs/ultramem-v1-227m.yaml's memory section)
RELEASED_227M = {"hidden_size": 768, "knum": 808, "kdim": 192, "vdim": 384, "knn": 80, "head": 2, "tucker_rank": 2,
                 "tucker_multihead": 2, "value_expand_time": 4}
LAYER_227M = "227m"
LAYER_FROM_SPEC = "spec"


class BenchInputError(ValueError):
    """Something the bench was given that it cannot run (reported like every other user mistake)."""


def contender_reasons() -> dict[str, str | None]:
    """Every contender name -> None when it can run here, else why not: eager, torch-compile, then the registered
    backends (``umc.runtime.list_backends``), with triton skipped on a machine without a GPU."""
    reasons: dict[str, str | None] = {EAGER: None, COMPILED: None}
    for name, reason in list_backends().items():
        reasons[name] = TRITON_WITHOUT_GPU if name == "triton" and reason is None and not torch.cuda.is_available() \
            else reason
    return reasons


@dataclass(frozen=True)
class Contender:
    """``call(*adapt(inputs))`` is one timed step; ``adapt`` turns the shared inputs into what ``call`` takes."""

    name: str
    call: Callable[..., Any]
    adapt: Callable[[tuple], tuple] = lambda inputs: inputs
    loop: bool = False  # call(tokens, state) -> (logits, state): each step continues the state the last one returned

    def step(self, inputs: tuple) -> Step:
        """A zero-argument call of this contender on ``inputs`` (adapted once, outside the timed call)."""
        args = self.adapt(inputs)
        if not self.loop:
            return lambda: self.call(*args)
        tokens, latest = args[0], [args[1]]

        def next_step():
            logits, latest[0] = self.call(tokens, latest[0])
            return logits

        return next_step


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside nested tuples, lists, dicts and dataclasses."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def versions(inputs: tuple) -> list[int]:
    """The in-place modification counters of every input tensor (torch bumps one on every in-place write)."""
    return [t._version for t in _tensors(inputs)]


def check_untouched(name: str, inputs: tuple, before: list[int]) -> None:
    """RuntimeError (a bug in that backend) when ``name`` wrote into the inputs it shares with the others."""
    if versions(inputs) != before:
        raise RuntimeError(f"{name} wrote into the past state it was given: the other contenders would not decode "
                           f"from the same past")


# ---------------------------------------------------------------- whole models


@dataclass(frozen=True)
class ModelTarget:
    """A build to bench: its directory (read only), spec, and the weights file its manifest lists (or None: the
    eager reference's seeded weights)."""

    build_dir: Path
    spec: Spec
    weights_file: Path | None


def open_model(path: Path, workdir: Path) -> ModelTarget:
    """A build directory (has manifest.json) as it is, or a spec file compiled into ``workdir``."""
    from umc.compiler import compile as compile_spec

    if path.is_dir():
        build = read_build(path)
        return ModelTarget(path, build.spec, build.weights_file)
    build = compile_spec(path, workdir / "build")
    return ModelTarget(build.path, build.spec, None)


def onnx_build(target: ModelTarget, workdir: Path) -> Path:
    """A build directory holding the ONNX export of ``target``: the build itself when it has one or is the bench's
    own (compiled into ``workdir``: exported there), else a copy in ``workdir`` exported there (the user's build
    directory is never written)."""
    from umc.export.install import export

    if "onnx/decode.onnx" in read_build(target.build_dir).manifest["artifacts"]:
        return target.build_dir
    if workdir in target.build_dir.parents:
        export(target.build_dir, "onnx")
        return target.build_dir
    copy = workdir / "onnx-build"
    if not copy.exists():
        shutil.copytree(target.build_dir, copy)
        export(copy, "onnx")
    return copy


def eager_model(target: ModelTarget) -> torch.nn.Module:
    """The eager reference of the target's spec with the build's weights (seeded by the spec when it has none)."""
    model = build_model(target.spec, seed=target.spec.seed)
    if target.weights_file is not None:
        load_weights(model, target.weights_file)
    return model


def model_inputs(spec: Spec, batch: int, past: int, seed: int = 0) -> tuple[torch.Tensor, DecodeState]:
    """One token per sequence and a seeded random past of ``past`` tokens (KV cache and query-conv inputs)."""
    model, mem = spec.model, spec.memory
    gen = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(spec.dtype)
    tokens = torch.randint(0, model.vocab_size, (batch, 1), generator=gen)
    kv_shape = (batch, model.n_kv_heads, past, model.head_dim)
    kv = tuple((torch.randn(kv_shape, generator=gen).to(dtype), torch.randn(kv_shape, generator=gen).to(dtype))
               for _ in range(model.n_layers))
    conv = tuple(torch.randn(batch, mem.query_conv - 1, model.d_model, generator=gen).to(dtype) if mem.query_conv
                 else None for _ in mem.units)
    return tokens, DecodeState(past, kv, conv)


def _session_state(graph) -> Callable[[tuple], tuple]:
    """The shared (tokens, DecodeState) as a session's (tokens, state dict): the same tensors under slot names."""

    def adapt(inputs: tuple) -> tuple:
        tokens, state = inputs
        parts = {"kv_k": lambda i: state.kv[i][0], "kv_v": lambda i: state.kv[i][1], "conv": lambda i: state.conv[i]}
        return tokens, {slot.name: parts[slot.kind](slot.index) for slot in graph.state if slot.input is not None}

    return adapt


def model_contender(name: str, target: ModelTarget, model: torch.nn.Module, workdir: Path,
                    threads: bool = True) -> Contender:
    """The contender called ``name`` for a whole model: the eager ``model``, ``torch.compile`` of it (compiled at
    its first call), or a session of the build on that backend sharing the model's weights."""
    if name == EAGER:
        return Contender(name, model)
    if name == COMPILED:
        return Contender(name, torch.compile(model))
    build_dir = onnx_build(target, workdir) if name == "onnxruntime" else target.build_dir
    session = load(build_dir, backend=name, weights=model.state_dict(), threads=threads)
    return Contender(name, session.decode, _session_state(session.graphs["decode"]), loop=True)


# ---------------------------------------------------------------- one memory layer


@dataclass(frozen=True)
class LayerTarget:
    """One memory layer in the authors' format: what it is called, its config dict and tensors."""

    name: str
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def memory(self) -> MemorySpec:
        """The layer's validated MemorySpec."""
        return official_memory_spec(self.config)

    @property
    def d_model(self) -> int:
        """The layer's width."""
        return int(self.config["hidden_size"])

    @property
    def dtype(self) -> str:
        """The spec dtype name of the layer's weights."""
        return str(self.tensors["values_for_look_up"].dtype).removeprefix("torch.")


def seeded_layer(config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors for an official layer config, seeded as a model's memory unit 0 is (``umc.reference.init``)."""
    with torch.device("meta"):
        layer = MemoryLayer(official_memory_spec(config), int(config["hidden_size"]))
    layer = layer.to_empty(device="cpu")
    init_memory(layer, "memories.0", seed, n_layers=1)
    return dict(layer.state_dict())


def official_config(spec: Spec) -> dict:
    """A spec's memory section as the authors' layer config; BenchInputError naming the fields where the spec's
    layer is not the authors' layer (which ``umc.compile_memory_layer`` takes)."""
    mem = spec.memory
    config = {"hidden_size": spec.model.d_model, "knum": mem.knum, "kdim": mem.kdim, "vdim": mem.vdim,
              "knn": mem.topm, "head": mem.heads, "tucker_rank": mem.tucker_rank, "tucker_multihead": mem.cores,
              "value_expand_time": mem.value_expansion, "layer_norm_eps": mem.norm_eps}
    try:
        official = official_memory_spec(config)
    except SpecError as exc:
        raise BenchInputError(f"--layer-config spec: {exc}") from None
    differ = [f.name for f in dataclasses.fields(mem)
              if f.name != "units" and getattr(mem, f.name) != getattr(official, f.name)]
    if differ:
        raise BenchInputError(f"--layer-config spec: {spec.name}'s memory layer is not the authors' layer "
                              f"(differs in {', '.join(f'memory.{name}' for name in differ)}); "
                              f"use 227m or a golden file")
    return config


def open_layer(choice: str, source: Path | None) -> LayerTarget:
    """The layer ``--layer-config`` names: ``227m`` (the released config, seeded float32 tensors), ``spec`` (the
    first memory unit of ``source``, a spec or build, with its weights) or a golden ``.safetensors`` file."""
    if choice == LAYER_227M:
        return LayerTarget("ultramem-v1-227m memory layer (seeded, float32)", dict(RELEASED_227M),
                           seeded_layer(RELEASED_227M))
    if choice == LAYER_FROM_SPEC:
        if source is None:
            raise BenchInputError("--layer-config spec needs a spec or build argument")
        build = read_build(source) if source.is_dir() else None
        spec = build.spec if build else load_spec(source)
        config = official_config(spec)
        layer = build_memory_layer(spec, 0)
        if build and build.weights_file is not None:
            with safetensors.safe_open(str(build.weights_file), "pt") as file:
                layer.load_state_dict({name: file.get_tensor(f"memories.0.{name}") for name in layer.state_dict()})
        return LayerTarget(f"{spec.name} memory unit 0", config, dict(layer.state_dict()))
    path = Path(choice)
    if not path.is_file():
        raise BenchInputError(f"--layer-config {choice}: not 227m, spec, or a golden .safetensors file")
    with safetensors.safe_open(str(path), "pt") as file:
        metadata = file.metadata() or {}
    if "config" not in metadata:
        raise BenchInputError(f"{path}: no 'config' metadata (a golden file carries its layer config as JSON)")
    config = json.loads(metadata["config"])
    missing = [key for key in OFFICIAL_CONFIG_KEYS if key not in config]
    if missing:
        raise BenchInputError(f"{path}: its config lacks {', '.join(missing)}")
    return LayerTarget(path.name, config, load_file(str(path)))


def layer_inputs(target: LayerTarget, batch: int, seed: int = 0) -> tuple[torch.Tensor]:
    """``batch`` seeded input rows (one token of each sequence) in the layer's dtype."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, target.d_model, generator=gen).to(torch_dtype(target.dtype)),)


def layer_contender(name: str, target: LayerTarget, eager: torch.nn.Module | None) -> Contender:
    """The contender called ``name`` for one layer: the ``eager`` layer, ``torch.compile`` of it, or the layer
    compiled by umc for that backend (``umc.compile_memory_layer``; ``eager`` may then be None)."""
    if name == EAGER:
        return Contender(name, eager)
    if name == COMPILED:
        return Contender(name, torch.compile(eager))
    return Contender(name, compile_memory_layer(target.tensors, target.config, backend=name))


def eager_layer(target: LayerTarget) -> torch.nn.Module:
    """The authors' layer as the eager reference runs it."""
    return memory_layer_from_official(target.tensors, target.config)
