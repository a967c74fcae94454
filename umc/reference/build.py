"""Model construction from a spec: seeded weights, or shapes only on the meta device.

A model (or one block, or one memory unit) is constructed on the meta device, given
uninitialized storage directly in the spec's dtype, and then every tensor is filled
explicitly (umc.reference.init): building holds the weights plus a bounded chunk of
random draws, never a float32 copy of the model.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from umc.dtypes import torch_dtype
from umc.reference.init import init_dense, init_memory, init_model
from umc.reference.memory import MemoryLayer
from umc.reference.model import Block, MemoryLM
from umc.spec import Spec

Part = TypeVar("Part", bound=nn.Module)


def _build(construct: Callable[[], Part], spec: Spec, device: str, fill: Callable[[Part], None]) -> Part:
    """``construct()`` on meta in the spec's dtype, in eval mode; unless ``device`` is meta, given
    uninitialized storage there and filled by ``fill``."""
    with torch.device("meta"):
        module = construct().to(torch_dtype(spec.dtype)).eval()
    if device == "meta":
        return module
    module = module.to_empty(device=device)
    fill(module)
    return module


def build_model(spec: Spec, seed: int | None = None, device: str = "cpu") -> MemoryLM:
    """The eager reference model of ``spec`` in the spec's dtype, in eval mode.

    ``seed`` defaults to the spec's seed. ``device="meta"`` allocates no weights: use it to
    inspect shapes and parameter counts of models too big for memory.
    """
    seed = spec.seed if seed is None else seed
    return _build(lambda: MemoryLM(spec), spec, device, lambda model: init_model(model, seed))


def build_block(spec: Spec, block: int, seed: int | None = None, device: str = "cpu") -> Block:
    """Block ``block`` of ``build_model(spec, seed)`` alone, with equal weights: for checking a model
    too big for memory one block at a time."""
    _check_index("block", block, spec.model.n_layers)
    seed = spec.seed if seed is None else seed
    return _build(lambda: Block(spec.model), spec, device, lambda part: init_dense(part, f"blocks.{block}", seed))


def build_memory_layer(spec: Spec, unit: int, seed: int | None = None, device: str = "cpu") -> MemoryLayer:
    """Memory unit ``unit`` of ``build_model(spec, seed)`` alone, with equal weights: for checking a model
    too big for memory one memory unit at a time."""
    _check_index("memory unit", unit, len(spec.memory.units))
    seed = spec.seed if seed is None else seed
    return _build(lambda: MemoryLayer(spec.memory, spec.model.d_model), spec, device,
                  lambda layer: init_memory(layer, f"memories.{unit}", seed, spec.model.n_layers))


def _check_index(what: str, index: int, count: int) -> None:
    """IndexError unless 0 <= index < count (a negative index would seed another tensor's name)."""
    if not 0 <= index < count:
        raise IndexError(f"{what} {index} does not exist: the spec has {count} (0..{count - 1})")
