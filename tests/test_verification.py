"""The verifier can fail, and fails only when it should.

Injected bugs it must catch: a repeated address, the (m+1)-th candidate swapped in for the m-th (caught as often
as rounding allows: the catch rate is reported next to two ceilings, the band's own and one computed from the
whole eager model's rounding independently of the band), wrong scores at the right addresses, a wrong additive
selection. Honest builds of every shipped small spec must pass in float16 and bfloat16 for 10 seeds. Selections
are judged without enumeration, however tied."""

import dataclasses

import pytest
import torch

import umc
from conftest import SPECS
from umc.reference import build_model
from umc.runtime.torch_ops import TORCH_IMPLS, winner_grid
from umc.verify import BAND_FACTOR, Stage, judge, prepare, selection_stages, trace_steps, verify_build

SMALL_SPECS = sorted(SPECS.glob("ablation/*.yaml")) + [SPECS / "ultramem-tiny.yaml", SPECS / "pkm-tiny.yaml"]
SEEDS = range(10)


def compiled(tmp_path, name="ultramem-tiny", dtype="float32", **memory):
    spec = umc.load_spec(SPECS / f"{name}.yaml")
    spec = dataclasses.replace(spec, dtype=dtype, memory=dataclasses.replace(spec.memory, **memory))
    return umc.compile(spec, tmp_path / f"{name}-{dtype}", force=True).path


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


def stage(scores, chosen, rounding=0.0):
    scores = torch.tensor([[scores]], dtype=torch.float64)
    return Stage("test", torch.tensor([[chosen]]), torch.arange(scores.shape[-1]).view(1, 1, -1), scores,
                 torch.full((1, 1), rounding, dtype=torch.float64))


def test_admissibility_needs_no_enumeration():
    assert not judge(stage([3.0, 2.0, 1.0, 0.0], [0, 1])).failed.any()
    assert judge(stage([3.0, 2.0, 1.0, 0.0], [0, 2])).beyond_band.all()  # the 3rd instead of the 2nd
    assert not judge(stage([3.0, 2.0, 1.9, 0.0], [0, 2], rounding=0.05)).failed.any()  # within the band
    assert judge(stage([3.0, 2.0, 1.0, 0.0], [0, 0])).repeated.all()
    tied = stage([1.0] * 5000, list(range(0, 5000, 2)))  # 2500 of 5000 equal scores: no combinatorics
    assert not judge(tied).failed.any()


def repeat_best(attrs, grid, i_row, i_col):
    """A wrong grid_select: the best candidate again in place of the m-th."""
    address, scores = HONEST["grid_select"](attrs, grid, i_row, i_col)
    address, scores = address.clone(), scores.clone()
    address[..., -1], scores[..., -1, :] = address[..., 0], scores[..., 0, :]
    return address, scores


def swap_in_next(attrs, grid, i_row, i_col):
    """A wrong grid_select: the (m+1)-th candidate in place of the m-th."""
    m = grid.shape[-1]
    ranked = torch.topk(grid.flatten(-2).float().sum(-2), m + 1, dim=-1).indices
    winners = torch.cat([ranked[..., :m - 1], ranked[..., m:]], -1)
    address = torch.take_along_dim(i_row, winners // m, -1) * attrs["n"] + torch.take_along_dim(i_col, winners % m, -1)
    return address, torch.take_along_dim(grid.flatten(-2), winners.unsqueeze(-2), -1).transpose(-1, -2)


def scaled_scores(attrs, grid, i_row, i_col):
    """Right addresses, scores 1% off."""
    address, scores = HONEST["grid_select"](attrs, grid, i_row, i_col)
    return address, scores * 1.01


def drop_best_additive(attrs, v_row, i_row, v_col, i_col):
    """A wrong additive_select: skips the best candidate and takes the (m+1)-th."""
    m = v_row.shape[-1]
    total = (v_row[..., :, None] + v_col[..., None, :]).flatten(-2)
    values, winners = torch.topk(total, m + 1, dim=-1)
    address = torch.take_along_dim(i_row, winners[..., 1:] // m, -1) * attrs["n"] + \
        torch.take_along_dim(i_col, winners[..., 1:] % m, -1)
    return address, values[..., 1:].unsqueeze(-1)


HONEST = dict(TORCH_IMPLS)


def grid_topm_with(select):
    """A grid_topm implementation whose selection over the (float32) grid is ``select`` — how the bugs above
    reach the fused op the optimized graphs run."""
    def fused(attrs, q_row, q_col, keys_row, keys_col, i_row, i_col, cores):
        grid = winner_grid(q_row, q_col, keys_row, keys_col, i_row, i_col, cores)
        address, scores = select(attrs, grid, i_row, i_col)
        return address, scores.to(q_row.dtype)

    return fused


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_repeated_address_fails(tmp_path, monkeypatch, dtype):
    build = compiled(tmp_path, dtype=dtype)
    monkeypatch.setitem(TORCH_IMPLS, "grid_topm", grid_topm_with(repeat_best))
    checks = [c for c in verify_build(build, steps=2) if c.output.endswith(".selection")]
    assert checks and all(not c.ok and "repeated" in c.note for c in checks)


def test_wrong_scores_at_the_right_addresses_fail(tmp_path, monkeypatch):
    build = compiled(tmp_path)
    monkeypatch.setitem(TORCH_IMPLS, "grid_topm", grid_topm_with(scaled_scores))
    prefill = {c.output: c for c in verify_build(build, steps=0) if c.step == "prefill"}
    assert not prefill["mem0.scores"].ok and prefill["mem0.selection"].ok  # the first unit's inputs are untouched


def test_a_wrong_additive_selection_fails(tmp_path, monkeypatch):
    build = compiled(tmp_path, "pkm-tiny")
    monkeypatch.setitem(TORCH_IMPLS, "additive_select", drop_best_additive)
    checks = [c for c in verify_build(build, steps=1) if c.output.endswith(".selection")]
    assert checks and all(not c.ok for c in checks)


def share_beyond(scores64: torch.Tensor, rounding: torch.Tensor, m: int) -> int:
    """Token-heads whose float64 m-th/(m+1)-th gap exceeds twice the rounding: the most any sound check can
    catch of a swap of those two."""
    ranked = scores64.sort(-1, descending=True).values
    return int(((ranked[..., m - 1] - ranked[..., m]) > 2 * rounding).sum())


def catch_rate(build, seeds) -> dict[str, float]:
    """With ``swap_in_next`` installed: the share of token-heads whose grid selection is flagged, and two
    ceilings: the share whose m-th/(m+1)-th gap exceeds twice the eager layer's rounding on the build's query
    (what the band is made of), and twice the whole eager model's rounding (float64 run vs the dtype)."""
    caught = local = whole = total = 0
    for seed in seeds:
        session, eager, tokens = prepare(build, "graph", seed, steps=2, batch=2, prompt=8)
        for record in trace_steps(session, eager, tokens, prompt=8):
            for j, taps in record.taps.items():
                layer, x, x64 = eager.memories[j], record.queries[j], record.queries64[j]
                grid = selection_stages(layer, taps["query"].reshape(x.shape[0], -1), taps)[2]
                m = grid.chosen.shape[-1]
                rows, cols = (taps[k].reshape(grid.chosen.shape) for k in ("rows", "cols"))
                with torch.no_grad():
                    own = layer.grid_at(x, rows, cols).sum(2).flatten(-2).double()
                    own64 = layer.grid_at(x64, rows, cols).sum(2).flatten(-2).double()
                caught += int(judge(grid).failed.sum())
                local += share_beyond(grid.scores64, grid.rounding, m)
                whole += share_beyond(own64, (own - own64).abs().amax(-1), m)
                total += grid.rounding.numel()
    return {"caught": caught / total, "ceiling": local / total, "whole-model ceiling": whole / total, "token-heads": total}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_injected_swap_is_caught_as_often_as_rounding_allows(tmp_path, monkeypatch, dtype):
    build = compiled(tmp_path, dtype=dtype)
    monkeypatch.setitem(TORCH_IMPLS, "grid_topm", grid_topm_with(swap_in_next))
    rates = catch_rate(build, SEEDS)
    print(f"\n{dtype}: injected (m+1)-th swap caught in {rates['caught']:.1%} of {rates['token-heads']} token-heads; "
          f"ceiling {rates['ceiling']:.1%} (whole-model rounding: {rates['whole-model ceiling']:.1%}); "
          f"band {BAND_FACTOR:g} x measured rounding")
    if dtype == "float32":
        assert rates["caught"] == 1.0
    elif dtype == "float16":
        assert rates["caught"] >= 0.90
    else:
        assert rates["caught"] >= rates["ceiling"] - 0.05 and rates["caught"] >= rates["whole-model ceiling"] - 0.05


@pytest.mark.parametrize("path", SMALL_SPECS, ids=lambda p: p.stem)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_honest_builds_pass_for_ten_seeds(tmp_path, path, dtype):
    spec = umc.load_spec(path)
    build = umc.compile(dataclasses.replace(spec, dtype=dtype), tmp_path / "b").path
    for seed in SEEDS:
        failed = [c for c in verify_build(build, seed=seed, steps=2, prompt=8) if not c.ok]
        assert not failed, (seed, failed)


VARIANTS = {
    "conv kernel 1": ("ultramem-tiny", {"query_conv": 1}),
    "E=1, one core, rank 1": ("ultramem-tiny", {"value_expansion": 1, "cores": 1, "tucker_rank": 1}),
    "topm = keys per side": ("ultramem-tiny", {"topm": 16}),
    "E=9, rank 3": ("ultramem-tiny", {"value_expansion": 9, "tucker_rank": 3}),
    "pkm with conv under a LayerNorm model": ("pkm-tiny", {"query_conv": 2}),
    "unshared queries, relu": ("ultramem-tiny", {"share_query": False, "score_activation": "relu"}),
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_verify_passes_on_spec_variants(tmp_path, variant):
    name, changes = VARIANTS[variant]
    checks = verify_build(compiled(tmp_path, name, **changes), steps=3)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
