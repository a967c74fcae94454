"""Seeded initialization of fresh models, following the authors' release (DESIGN.md §2.4)."""

from __future__ import annotations

import torch
from torch import nn

from umc.reference.memory import MemoryLayer
from umc.reference.model import MemoryLM

DENSE_STD = 0.02


def rank_one_vectors(cores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading singular vectors of sum_c C_c per head, (H, r) each.

    Sign convention: u's larger-magnitude component is positive; v flips with u so u σ vᵀ is unchanged.
    """
    u_all, _, vh_all = torch.linalg.svd(cores.sum(dim=1))  # cores (H, h, r, r)
    u, v = u_all[..., :, 0], vh_all[..., 0, :]
    lead = u.gather(-1, u.abs().argmax(-1, keepdim=True))
    sign = torch.where(lead < 0, -1.0, 1.0)
    return u * sign, v * sign


def _normal(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    t.copy_(torch.randn(t.shape, generator=gen) * std)


def _init_memory(layer: MemoryLayer, n_layers: int, gen: torch.Generator) -> None:
    spec = layer.spec
    kd = spec.side_dim
    _normal(layer.query_proj.weight, kd ** -0.5, gen)
    for norm in (getattr(layer, "query_norm", None), getattr(layer, "keys_norm", None)):
        if norm is not None:
            norm.weight.fill_(kd ** -0.33)
            if norm.bias is not None:
                norm.bias.zero_()
    _normal(layer.keys, kd ** -0.5, gen)
    if spec.init == "improved":
        value_std = (spec.value_expansion / (2 * spec.topm * spec.heads * n_layers)) ** 0.5  # L: blocks (§2)
    else:
        value_std = DENSE_STD
    _normal(layer.values_for_look_up, value_std, gen)
    if spec.output_projection:
        _normal(layer.values_proj.weight, (spec.value_expansion * spec.vdim) ** -0.5, gen)
    if spec.has_shuffle:
        layer.shuffle_index.copy_(torch.randperm(spec.virtual_values, generator=gen))
    if spec.kind == "ultramem":
        for core in layer.tucker_core:
            core.copy_(torch.rand(core.shape, generator=gen))
        u, v = rank_one_vectors(torch.stack(list(layer.tucker_core), dim=1))
        layer.tucker_core_u.copy_(u.view_as(layer.tucker_core_u))
        layer.tucker_core_v.copy_(v.view_as(layer.tucker_core_v))
    if layer.query_conv is not None:
        _normal(layer.query_conv.weight, layer.query_conv.kernel ** -0.5, gen)
        _normal(layer.query_conv.bias, DENSE_STD, gen)
    if spec.init == "improved":
        _calibrate_scores(layer, gen)


def _calibrate_scores(layer: MemoryLayer, gen: torch.Generator) -> None:
    """Improved init: scale the query side so the mean |top-m score| on unit-normal inputs is about 1.

    Tucker scores are quadratic in the query scale (row score times column score), additive scores linear.
    """
    width = layer.query_proj.in_features
    probe = torch.randn(256, width, generator=gen)
    mean_score = layer.retrieve(probe).scores.abs().mean().item()
    power = 0.5 if layer.spec.kind == "ultramem" else 1.0
    target = getattr(layer, "query_norm", None)
    weight = target.weight if target is not None else layer.query_proj.weight
    weight.mul_(mean_score ** -power)


def initialize(model: MemoryLM, seed: int) -> None:
    """Fill every parameter from one seeded generator, in module order (reproducible across runs).

    Dense weights ~ N(0, 0.02^2); norms keep their construction values (weight 1, bias 0).
    """
    gen = torch.Generator().manual_seed(seed)
    dense = [model.embed, *model.blocks, getattr(model, "lm_head", None)]
    with torch.no_grad():
        for part in filter(None, dense):
            for module in part.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    _normal(module.weight, DENSE_STD, gen)
        for layer in model.memories:
            _init_memory(layer, model.spec.model.n_layers, gen)
