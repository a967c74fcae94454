"""Import of the authors' UltraMem V1 layer: official config dict + state dict -> eager MemoryLayer."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from umc.official import official_memory_spec
from umc.reference.memory import MemoryLayer


class OfficialLayer(nn.Module):
    """An official UltraMem layer as a plain module: ``forward(x)`` for x of shape (..., D)."""

    def __init__(self, layer: MemoryLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output, same leading shape as x."""
        return self.layer.retrieve(x.reshape(-1, x.shape[-1])).output.view(*x.shape[:-1], -1)


def memory_layer_from_official(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> OfficialLayer:
    """Build one memory layer from an official layer state dict and config (keys of shared/golden/README.md).

    Tensors not belonging to the layer (e.g. golden files' ``input``/``expected_*``) are ignored;
    a missing tensor or a shape mismatch is a ValueError naming the tensor.
    """
    layer = MemoryLayer(official_memory_spec(config), int(config["hidden_size"]))
    own = layer.state_dict()
    missing = [name for name in own if name not in state_dict]
    if missing:
        raise ValueError(f"official state dict lacks {', '.join(missing)}")
    for name, target in own.items():
        given = state_dict[name]
        if tuple(given.shape) != tuple(target.shape):
            raise ValueError(f"tensor {name}: shape {tuple(given.shape)} does not match the config's {tuple(target.shape)}")
    layer.load_state_dict({name: state_dict[name].to(own[name].dtype) for name in own})
    return OfficialLayer(layer.eval())
