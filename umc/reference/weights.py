"""Weights on disk: safetensors only (never pickle), with errors that name the tensor."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from umc.dtypes import TABLE, torch_dtype
from umc.numerics import non_finite_count

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
    """Load a safetensors file into the model in place; every name, shape and dtype must match and
    every value must be finite.

    Names, shapes and dtypes are checked from the file's header before anything is copied. Then each
    tensor is read through its own mapping of the file, released right after, so loading holds the
    model plus one tensor, not the model plus the file. Each tensor is checked for NaN/Inf before it
    is copied: a non-finite tensor stops the load with the model partly overwritten.
    """
    expected = model.state_dict()
    with _opened(path) as file:
        _check_header(file, expected, path)
    with torch.no_grad():
        for name, target in expected.items():
            with _opened(path) as file:
                given = file.get_tensor(name)
            bad = non_finite_count(given)
            if bad:
                raise WeightsError(f"{path}: tensor {name} has {bad} non-finite values (NaN or Inf)")
            target.copy_(given)
    return model


@contextmanager
def _opened(path: str | Path) -> Iterator:
    """The file opened with safe_open; a failure to open or read it is a WeightsError naming the file."""
    try:
        with safe_open(str(path), "pt") as file:
            yield file
    except (OSError, SafetensorError) as exc:
        raise WeightsError(f"{path}: cannot read safetensors weights: {exc}") from None


def _check_header(file, expected: dict[str, torch.Tensor], path: str | Path) -> None:
    """WeightsError naming the first tensor the file lacks, has in excess, or holds in another shape or dtype."""
    stored = set(file.keys())
    missing = sorted(set(expected) - stored)
    unexpected = sorted(stored - set(expected))
    if missing:
        raise WeightsError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise WeightsError(f"{path}: tensor {unexpected[0]} is not part of the model "
                           f"({len(unexpected)} unexpected in all)")
    for name, target in expected.items():
        header = file.get_slice(name)
        shape, dtype = tuple(header.get_shape()), _torch_name(header.get_dtype())
        if shape != tuple(target.shape):
            raise WeightsError(f"{path}: tensor {name} has shape {shape}, the model needs {tuple(target.shape)}")
        if dtype != str(target.dtype):
            raise WeightsError(f"{path}: tensor {name} has dtype {dtype}, the model needs {target.dtype}")


def _torch_name(safetensors_dtype: str) -> str:
    """A safetensors dtype as torch prints it ("BF16" -> "torch.bfloat16"); unchanged if umc has no such dtype."""
    for entry in TABLE:
        if entry.safetensors == safetensors_dtype:
            return str(torch_dtype(entry.ir))
    return safetensors_dtype
