"""Shared fixtures: paths to the repo's specs and the shared golden files."""

from pathlib import Path

import pytest
import torch
from hypothesis import settings

# the tests run tiny tensors: intra-op threads only add synchronization (and spin under load)
torch.set_num_threads(1)

# the same examples on every run: CI must not pass or fail by the luck of a seed
settings.register_profile("umc", derandomize=True)
settings.load_profile("umc")

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
GOLDEN = ROOT.parent / "shared" / "golden"


def golden_files() -> list[Path]:
    """Every golden layer file; an empty list fails the golden tests loudly rather than skipping them."""
    return sorted(GOLDEN.glob("*.safetensors"))


@pytest.fixture
def tiny_spec():
    from umc.spec import load_spec

    return load_spec(SPECS / "ultramem-tiny.yaml")


@pytest.fixture
def pkm_spec():
    from umc.spec import load_spec

    return load_spec(SPECS / "pkm-tiny.yaml")
