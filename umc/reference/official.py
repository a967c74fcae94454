"""Import of the authors' UltraMem V1 layer: official config dict + state dict -> eager MemoryLayer."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from umc.reference.memory import MemoryLayer
from umc.spec import MemorySpec, MemoryUnit

OFFICIAL_CONFIG_KEYS = ("hidden_size", "knum", "kdim", "vdim", "knn", "head", "tucker_rank",
                        "tucker_multihead", "value_expand_time")


class OfficialLayer(nn.Module):
    """An official UltraMem layer as a plain module: ``forward(x)`` for x of shape (..., D)."""

    def __init__(self, layer: MemoryLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output, same leading shape as x."""
        return self.layer.retrieve(x.reshape(-1, x.shape[-1])).output.view(*x.shape[:-1], -1)


def official_memory_spec(config: Mapping[str, Any]) -> MemorySpec:
    """The MemorySpec equal to an official layer config (shared query, LN on query and keys, no conv)."""
    missing = [k for k in OFFICIAL_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"official config lacks {', '.join(missing)} (needs {', '.join(OFFICIAL_CONFIG_KEYS)})")
    expansion = int(config["value_expand_time"])
    if math.isqrt(expansion) ** 2 != expansion:
        raise ValueError(f"official config value_expand_time {expansion} is not a perfect square")
    return MemorySpec(
        kind="ultramem", units=(MemoryUnit(0, 0),), knum=int(config["knum"]), kdim=int(config["kdim"]),
        vdim=int(config["vdim"]), topm=int(config["knn"]), heads=int(config["head"]), share_query=True,
        tucker_rank=int(config["tucker_rank"]), cores=int(config["tucker_multihead"]), value_expansion=expansion,
        query_conv=None, score_activation="none", query_norm="layernorm", key_norm="layernorm",
        output_projection=True, norm_eps=float(config.get("layer_norm_eps", 1e-5)), init="official",
    )


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
