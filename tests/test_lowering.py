"""Lowering of the tiny spec: expected IR text, and both the unoptimized and the optimized build
equal the eager reference for a prompt and 8 decode steps."""

import pytest
import torch

import umc
from conftest import SPECS
from snapshots import assert_matches_expected
from umc.ir import format_graph
from umc.lower import lower
from umc.passes import run_pipeline
from umc.reference import build_model
from umc.runtime import load


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_tiny_spec_ir_text(tiny_spec, kind):
    graph = lower(tiny_spec)[kind]
    assert_matches_expected(f"ultramem-tiny.{kind}.initial.txt", format_graph(graph))
    assert_matches_expected(f"ultramem-tiny.{kind}.optimized.txt", format_graph(run_pipeline(graph)[-1].graph))


@pytest.mark.parametrize("spec_name", ["ultramem-tiny", "pkm-tiny"])
@pytest.mark.parametrize("passes", [(), None], ids=["unoptimized", "optimized"])
def test_build_equals_eager_for_prefill_and_decode(tmp_path, spec_name, passes):
    spec = umc.load_spec(SPECS / f"{spec_name}.yaml")
    umc.compile(spec, tmp_path / "build", passes=passes)
    eager = build_model(spec, seed=5)
    session = load(tmp_path / "build", weights=eager.state_dict())
    tokens = torch.randint(0, spec.model.vocab_size, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, _ = eager(tokens)
        got, state = session.prefill(tokens[:, :6])
        pieces = [got]
        for t in range(6, 14):
            got, state = session.decode(tokens[:, t:t + 1], state)
            pieces.append(got)
    got = torch.cat(pieces, dim=1)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
