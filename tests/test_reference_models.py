"""Every shipped small spec builds and runs in the eager reference, in every dtype."""

import dataclasses

import pytest
import torch

from conftest import SPECS
from umc.reference import build_model
from umc.spec import load_spec

SMALL = sorted(SPECS.glob("ablation/*.yaml")) + [SPECS / "ultramem-tiny.yaml", SPECS / "pkm-tiny.yaml"]


@pytest.mark.parametrize("path", SMALL, ids=lambda p: p.stem)
def test_small_spec_runs_and_decodes(path):
    spec = load_spec(path)
    model = build_model(spec)
    tokens = torch.randint(0, spec.model.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(tokens)
        logits, state = model(tokens[:, :5])
        last, _ = model(tokens[:, 5:], state)
    assert torch.isfinite(full).all()
    assert (last - full[:, 5:]).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_model_tracks_the_float64_model(tiny_spec, dtype):
    """A low-precision model computes in its dtype and stays close in direction to a float64 run of the
    same weights. Only a loose check: rounding swaps near-tied top-m candidates (DESIGN.md §7), which
    moves individual logits; the tie-aware comparison belongs to `umc verify`."""
    low = build_model(dataclasses.replace(tiny_spec, dtype=dtype))
    tokens = torch.randint(0, tiny_spec.model.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _ = low(tokens)
        want, _ = low(tokens, compute_dtype=torch.float64)
    assert got.dtype == getattr(torch, dtype)
    assert want.dtype == torch.float64
    cosine = torch.nn.functional.cosine_similarity(got.double().flatten(), want.flatten(), dim=0)
    assert cosine > 0.95
