"""The verifier's own machinery: forced selections reproduce the eager model, and the tie-aware
selection check fails on a swap that is not a tie."""

import pytest
import torch

from umc.reference import build_model
from umc.verify import selection_check


def free_and_forced(spec, shape, seed, change):
    """Logits of the eager model on random tokens, and again with each unit's own selection passed
    through ``change`` and forced."""
    model = build_model(spec)
    tokens = torch.randint(0, spec.model.vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    queries: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        free, _ = model(tokens, memory_inputs=queries)
        own = {j: model.memories[j].retrieve(q).indices.view(*shape, -1) for j, q in queries.items()}
        forced, _ = model(tokens, select={j: change(a) for j, a in own.items()})
    return free, forced


def test_forcing_the_models_own_selection_changes_nothing(tiny_spec):
    free, forced = free_and_forced(tiny_spec, (2, 6), 0, lambda address: address)
    assert (forced - free).abs().max() <= 1e-6


def test_forcing_another_selection_changes_the_output(tiny_spec):
    shift = lambda address: (address + 1) % tiny_spec.memory.virtual_values
    free, forced = free_and_forced(tiny_spec, (1, 4), 1, shift)
    assert (forced - free).abs().max() > 1e-3


def test_selection_check_accepts_the_same_and_rejects_a_real_swap(tiny_spec):
    layer = build_model(tiny_spec).memories[0]
    x = torch.randn(5, tiny_spec.model.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own = layer.retrieve(x).indices
        assert selection_check(layer, x, own, "float32", "same").ok
        # replace each head's best candidate by the lowest-scoring address of the whole grid
        n = tiny_spec.memory.keys_per_side
        rows, cols = layer.side_scores(x)
        worst = rows.argmin(-1) * n + cols.argmin(-1)  # (M, H)
        bad = own.clone().view(5, tiny_spec.memory.heads, -1)
        bad[:, :, 0] = worst
    check = selection_check(layer, x, bad.view(5, -1), "float32", "swapped")
    assert not check.ok and check.max_rel >= 1


VARIANTS = {
    "conv kernel 1": ("ultramem-tiny", {"query_conv": 1}),
    "E=1, one core, rank 1": ("ultramem-tiny", {"value_expansion": 1, "cores": 1, "tucker_rank": 1}),
    "topm = keys per side": ("ultramem-tiny", {"topm": 16}),
    "pkm with conv under a LayerNorm model": ("pkm-tiny", {"query_conv": 2}),
    "unshared queries, relu": ("ultramem-tiny", {"share_query": False, "score_activation": "relu"}),
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_verify_passes_on_spec_variants(tmp_path, variant):
    import dataclasses

    import umc
    from conftest import SPECS
    from umc.verify import verify_build

    name, changes = VARIANTS[variant]
    spec = umc.load_spec(SPECS / f"{name}.yaml")
    umc.compile(dataclasses.replace(spec, memory=dataclasses.replace(spec.memory, **changes)), tmp_path / "b")
    checks = verify_build(tmp_path / "b", steps=3)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
