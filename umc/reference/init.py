"""Seeded initialization of fresh models, following the authors' release (DESIGN.md §2.4).

Every tensor draws from its own generator, seeded from (seed, the tensor's state-dict
name): a tensor's values do not depend on the rest of the model, so one block or memory
unit can be built alone and equals the same slice of the whole model. Random draws are
float32 and cast once when copied into the tensor, so every dtype starts from the same
values; large tensors are drawn in chunks so the float32 draws never hold more than
``CHUNK`` elements at a time.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from umc.reference.memory import MemoryLayer
from umc.reference.model import MemoryLM, RMSNorm

DENSE_STD = 0.02
CHUNK = 2**24  # elements per float32 draw: 64 MiB of transient memory at most
CALIBRATION_TOKENS = 256


def rank_one_vectors(cores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading singular vectors of sum_c C_c per head, (H, r) each.

    Sign convention: u's larger-magnitude component is positive; v flips with u so u σ vᵀ is unchanged.
    """
    u_all, _, vh_all = torch.linalg.svd(cores.sum(dim=1))  # cores (H, h, r, r)
    u, v = u_all[..., :, 0], vh_all[..., 0, :]
    lead = u.gather(-1, u.abs().argmax(-1, keepdim=True))
    sign = torch.where(lead < 0, -1.0, 1.0)
    return u * sign, v * sign


def generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of tensor ``name``: seeded by a stable hash (sha256, 63 bits) of seed and name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _fill_normal(target: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Fill tensor ``name`` with N(0, std^2): float32 draws from its own generator, chunk by chunk, each cast once."""
    gen = generator(seed, name)
    flat = target.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        stop = min(start + CHUNK, flat.numel())
        flat[start:stop].copy_(torch.randn(stop - start, generator=gen).mul_(std))


def _init_norm(norm: nn.Module, weight: float = 1.0) -> None:
    """A norm's weight to a constant (1 for the dense norms), its bias (if any) to 0."""
    norm.weight.fill_(weight)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()


@torch.no_grad()
def init_dense(module: nn.Module, name: str, seed: int) -> None:
    """A dense part (embedding, block, final norm, LM head) named ``name`` in the model:
    linear and embedding weights ~ N(0, 0.02^2), norms weight 1 and bias 0."""
    for sub_name, sub in module.named_modules(prefix=name):
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            _fill_normal(sub.weight, f"{sub_name}.weight", seed, std=DENSE_STD)
        elif isinstance(sub, (RMSNorm, nn.LayerNorm)):
            _init_norm(sub)


def _init_query(layer: MemoryLayer, name: str, seed: int, scale: float = 1.0) -> None:
    """Query projection ~ N(0, 1/kdim), query LayerNorm weight kdim^-0.33 and bias 0.

    ``scale`` (the improved-init calibration) multiplies the query LayerNorm weight if there is
    one, else the projection; the tensor is filled again rather than multiplied, so it is cast once.
    """
    kd = layer.spec.side_dim
    has_norm = layer.spec.query_norm != "none"
    projection_std = kd ** -0.5 * (1.0 if has_norm else scale)
    _fill_normal(layer.query_proj.weight, f"{name}.query_proj.weight", seed, std=projection_std)
    if has_norm:
        _init_norm(layer.query_norm, kd ** -0.33 * scale)


def _init_tucker(layer: MemoryLayer, name: str, seed: int) -> None:
    """Cores ~ U(0, 1); u, v from the SVD of the float32 draws (the same for every dtype)."""
    drawn = []
    for c, core in enumerate(layer.tucker_core):
        values = torch.rand(core.shape, generator=generator(seed, f"{name}.tucker_core.{c}"))
        core.copy_(values)
        drawn.append(values)
    u, v = rank_one_vectors(torch.stack(drawn, dim=1))
    layer.tucker_core_u.copy_(u.view_as(layer.tucker_core_u))
    layer.tucker_core_v.copy_(v.view_as(layer.tucker_core_v))


@torch.no_grad()
def init_memory(layer: MemoryLayer, name: str, seed: int, n_layers: int) -> None:
    """Memory unit ``name`` (e.g. "memories.0") of a model with ``n_layers`` blocks (§2.4)."""
    spec = layer.spec
    kd = spec.side_dim
    _init_query(layer, name, seed)
    if spec.key_norm != "none":
        _init_norm(layer.keys_norm, kd ** -0.33)
    _fill_normal(layer.keys, f"{name}.keys", seed, std=kd ** -0.5)
    if spec.init == "improved":
        value_std = (spec.value_expansion / (2 * spec.topm * spec.heads * n_layers)) ** 0.5  # L: blocks (§2)
    else:
        value_std = DENSE_STD
    _fill_normal(layer.values_for_look_up, f"{name}.values_for_look_up", seed, std=value_std)
    if spec.output_projection:
        _fill_normal(layer.values_proj.weight, f"{name}.values_proj.weight", seed,
                     std=(spec.value_expansion * spec.vdim) ** -0.5)
    if spec.has_shuffle:
        permutation = torch.randperm(spec.virtual_values, generator=generator(seed, f"{name}.shuffle_index"))
        layer.shuffle_index.copy_(permutation)
    if spec.kind == "ultramem":
        _init_tucker(layer, name, seed)
    if layer.query_conv is not None:
        _fill_normal(layer.query_conv.weight, f"{name}.query_conv.weight", seed, std=layer.query_conv.kernel ** -0.5)
        _fill_normal(layer.query_conv.bias, f"{name}.query_conv.bias", seed, std=DENSE_STD)
    if spec.init == "improved":
        _init_query(layer, name, seed, _calibration_scale(layer, name, seed))


def _calibration_scale(layer: MemoryLayer, name: str, seed: int) -> float:
    """Improved init: the query-side factor that brings the mean |top-m score| on unit-normal inputs to about 1.

    Tucker scores are quadratic in the query scale (row score times column score), additive scores linear.
    The probe is float32 and seeded by the layer's name, so the factor is reproducible.
    """
    gen = generator(seed, f"{name}.calibration")
    probe = torch.randn(CALIBRATION_TOKENS, layer.query_proj.in_features, generator=gen)
    mean_score = layer.retrieve(probe.to(layer.keys.device)).scores.abs().mean().item()
    power = 0.5 if layer.spec.kind == "ultramem" else 1.0
    return mean_score ** -power


def init_model(model: MemoryLM, seed: int) -> None:
    """Fill every parameter and buffer of ``model``; each tensor from its own name-seeded generator."""
    for name, part in model.named_children():
        if part is model.memories:
            for unit, layer in enumerate(part):
                init_memory(layer, f"{name}.{unit}", seed, model.spec.model.n_layers)
        else:
            init_dense(part, name, seed)
