"""Parameter counts and FLOPs: the released configs against the authors' figures, and the
shape arithmetic of umc.cost against the modules the eager reference actually builds."""

import subprocess
import sys

import pytest
import torch

from conftest import SPECS
from umc.cost import spec_cost
from umc.reference import build_model
from umc.spec import load_spec

ALL_SPECS = sorted(SPECS.rglob("*.yaml"))


def test_released_227m_config():
    cost = spec_cost(load_spec(SPECS / "ultramem-v1-227m.yaml"))
    assert cost.params_dense == pytest.approx(227e6, rel=0.02)  # authors: 227M dense
    assert cost.params_total == pytest.approx(1.23e9, rel=0.03)  # authors: 1.2B with value tables


def test_paper_1_6b_x12_config():
    cost = spec_cost(load_spec(SPECS / "ultramem-1.6b-x12.yaml"))
    assert cost.params_total == pytest.approx(21.41e9, rel=0.01)  # paper Table 1
    assert cost.flops_per_token == pytest.approx(3.50e9, rel=0.01)  # paper Table 1


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: str(p.relative_to(SPECS)))
def test_cost_counts_what_the_model_builds(path):
    spec = load_spec(path)
    model = build_model(spec, device="meta")
    cost = spec_cost(spec)
    values = sum(m.values_for_look_up.numel() for m in model.memories)
    assert sum(p.numel() for p in model.parameters()) == cost.params_total
    assert values == cost.params_values
    assert all(p.is_meta for p in model.parameters())


def test_meta_build_of_the_largest_spec_allocates_nothing():
    script = (
        "import resource, umc; from umc.reference import build_model;"
        f"m = build_model(umc.load_spec({str(SPECS / 'ultramem-1.6b-x12.yaml')!r}), device='meta');"
        "print(sum(p.numel() for p in m.parameters()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    params, peak_kib = int(out[0]), int(out[1])
    assert params > 21e9
    assert peak_kib < 2 * 1024 * 1024  # 2 GiB, far below the 43 GB of bf16 weights


def test_tiny_model_forward_shapes(tiny_spec):
    model = build_model(tiny_spec)
    with torch.no_grad():
        logits, _ = model(torch.zeros(2, 3, dtype=torch.long))
    assert logits.shape == (2, 3, tiny_spec.model.vocab_size)
