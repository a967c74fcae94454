"""Weights on disk: safetensors only (never pickle), with errors that name the tensor."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "umc-weights-v1"


class WeightsError(ValueError):
    """A weights file that does not fit the model: names the file and the tensor."""


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's state dict (parameters and buffers) to a safetensors file."""
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if any(t.is_meta for t in tensors.values()):
        raise WeightsError(f"{path}: the model was built on the meta device and has no weights to save")
    name = getattr(getattr(model, "spec", None), "name", "")
    save_file(tensors, str(path), metadata={"format": FORMAT, "spec": name})


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors file into the model in place; every name, shape and dtype must match."""
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise WeightsError(f"{path}: cannot read safetensors weights: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise WeightsError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise WeightsError(f"{path}: tensor {unexpected[0]} is not part of the model ({len(unexpected)} unexpected in all)")
    for name, target in expected.items():
        given = tensors[name]
        if given.shape != target.shape:
            raise WeightsError(f"{path}: tensor {name} has shape {tuple(given.shape)}, the model needs {tuple(target.shape)}")
        if given.dtype != target.dtype:
            raise WeightsError(f"{path}: tensor {name} has dtype {given.dtype}, the model needs {target.dtype}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])
    return model
