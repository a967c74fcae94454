"""The eager reference in a wider compute dtype, its memory footprint, and the memory layer's grid scores.

A low-precision model run with ``compute_dtype=torch.float64`` must equal a float64 copy of the
same weights (``copy.deepcopy(model).double()``), while holding no such copy.
"""

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from conftest import SPECS
from umc.reference import build_model

RELATIVE = 1e-12  # float64 runs of the same weights: only summation order may differ


def bf16(spec):
    return dataclasses.replace(spec, dtype="bfloat16")


def assert_same(got, want, what=""):
    """Equal dtype and shape, and equal values up to float64 summation order."""
    assert got.dtype == want.dtype == torch.float64, what
    assert got.shape == want.shape, what
    assert (got - want).abs().max() <= RELATIVE * want.abs().max(), what


def random_tokens(spec, shape, seed=0):
    return torch.randint(0, spec.model.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def random_selection(spec, batch, steps, seed=0):
    """Arbitrary grid addresses (B, T, H*m) for every memory unit: what ``select=`` forces."""
    gen = torch.Generator().manual_seed(seed)
    picks = spec.memory.heads * spec.memory.topm
    grid = spec.memory.keys_per_side ** 2
    return {j: torch.randint(0, grid, (batch, steps, picks), generator=gen) for j in range(len(spec.memory.units))}


def assert_same_state(got, want):
    """Two decode states agree: length, every KV cache, every query-conv state."""
    assert got.length == want.length
    for (k, v), (k64, v64) in zip(got.kv, want.kv):
        assert_same(k, k64, "k cache")
        assert_same(v, v64, "v cache")
    for conv, conv64 in zip(got.conv, want.conv):
        assert (conv is None) == (conv64 is None)
        if conv is not None:
            assert_same(conv, conv64, "conv state")


# ---------------------------------------------------------------- whole model in float64


@pytest.mark.parametrize("kind", ["tiny_spec", "pkm_spec"])
def test_float64_compute_equals_a_float64_copy(kind, request):
    spec = bf16(request.getfixturevalue(kind))
    model = build_model(spec, seed=4)
    exact = copy.deepcopy(model).double()
    tokens = random_tokens(spec, (2, 7))
    with torch.no_grad():
        got, state = model(tokens[:, :5], compute_dtype=torch.float64)
        want, state64 = exact(tokens[:, :5])
        assert_same(got, want, "prefill logits")
        assert_same_state(state, state64)
        got, state = model(tokens[:, 5:], state, compute_dtype=torch.float64)
        want, state64 = exact(tokens[:, 5:], state64)
    assert_same(got, want, "decode logits")
    assert_same_state(state, state64)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the model itself is untouched


@pytest.mark.parametrize("kind", ["tiny_spec", "pkm_spec"])
def test_float64_compute_with_forced_selection(kind, request):
    spec = bf16(request.getfixturevalue(kind))
    model = build_model(spec, seed=5)
    exact = copy.deepcopy(model).double()
    tokens = random_tokens(spec, (2, 6), seed=1)
    select = random_selection(spec, 2, 6)
    queries, queries64 = {}, {}
    with torch.no_grad():
        got, state = model(tokens, select=select, memory_inputs=queries, compute_dtype=torch.float64)
        want, state64 = exact(tokens, select=select, memory_inputs=queries64)
        own, _ = model(tokens, compute_dtype=torch.float64)
    assert_same(got, want, "logits")
    assert_same_state(state, state64)
    assert queries.keys() == queries64.keys()
    for j in queries:
        assert_same(queries[j], queries64[j], f"memory input {j}")
    assert (own - got).abs().max() > 1e-3  # the forced selection was really used


def test_default_compute_dtype_is_the_weights_dtype(tiny_spec):
    spec = bf16(tiny_spec)
    model = build_model(spec)
    tokens = random_tokens(spec, (2, 5))
    with torch.no_grad():
        got, state = model(tokens)
        same, _ = model(tokens, compute_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert all(k.dtype == v.dtype == torch.bfloat16 for k, v in state.kv)
    assert all(c.dtype == torch.bfloat16 for c in state.conv)
    assert torch.equal(got, same)


# ---------------------------------------------------------------- memory layer in float64


LAYER_VIEWS = {
    "retrieve.output": lambda layer, x, address: layer.retrieve(x).output,
    "retrieve.scores": lambda layer, x, address: layer.retrieve(x).scores,
    "side_scores.row": lambda layer, x, address: layer.side_scores(x)[0],
    "side_scores.col": lambda layer, x, address: layer.side_scores(x)[1],
    "scores_at": lambda layer, x, address: layer.scores_at(x, address),
    "output_at": lambda layer, x, address: layer.output_at(x, address),
    "forward": lambda layer, x, address: layer(x.view(2, -1, x.shape[-1]))[0],
    "forward.conv_state": lambda layer, x, address: layer(x.view(2, -1, x.shape[-1]))[1],
}


@pytest.mark.parametrize("kind", ["tiny_spec", "pkm_spec"])
@pytest.mark.parametrize("view", LAYER_VIEWS)
def test_layer_computes_in_the_dtype_of_a_wider_input(kind, view, request):
    spec = bf16(request.getfixturevalue(kind))
    if view == "forward.conv_state" and not spec.memory.query_conv:  # the view needs a conv to have a state
        spec = dataclasses.replace(spec, memory=dataclasses.replace(spec.memory, query_conv=2))
    layer = build_model(spec, seed=6).memories[0]
    exact = copy.deepcopy(layer).double()
    x = torch.randn(8, spec.model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    address = random_selection(spec, 8, 1)[0].view(8, -1)
    with torch.no_grad():
        got = LAYER_VIEWS[view](layer, x, address)
        want = LAYER_VIEWS[view](exact, x, address)
    assert_same(got, want, view)
    if view == "retrieve.output":
        assert torch.equal(layer.retrieve(x).indices, exact.retrieve(x).indices)


# ---------------------------------------------------------------- grid scores


def random_keys(spec, tokens, count, seed):
    """Distinct key indices (M, H, count) per side, as a build's top-m rows or columns would be."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(tokens, spec.memory.heads, spec.memory.keys_per_side, generator=gen).argsort(-1)[..., :count]


def grid_from_scores_at(layer, x, rows, cols):
    """The (M, H, h, m', m') grid computed address by address with scores_at: the independent oracle."""
    tokens, heads, count = rows.shape
    n = layer.spec.keys_per_side
    address = (rows.unsqueeze(-1) * n + cols.unsqueeze(-2)).flatten(1)  # (M, H*m'*m'), head-major
    per_address = layer.scores_at(x, address, heads=torch.arange(heads).repeat_interleave(count * count))
    return per_address.view(tokens, heads, count, count, -1).permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("kind", ["tiny_spec", "pkm_spec"])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_grid_at_matches_scores_at(kind, count, request):
    spec = request.getfixturevalue(kind)
    layer = build_model(spec, seed=7).memories[0]
    x = torch.randn(5, spec.model.d_model, generator=torch.Generator().manual_seed(4))
    rows, cols = random_keys(spec, 5, count, seed=1), random_keys(spec, 5, count, seed=2)
    with torch.no_grad():
        got = layer.grid_at(x, rows, cols)
        want = grid_from_scores_at(layer, x, rows, cols)
    assert got.shape == (5, spec.memory.heads, spec.memory.cores, count, count)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("kind", ["tiny_spec", "pkm_spec"])
def test_grid_at_in_float64_compute(kind, request):
    spec = bf16(request.getfixturevalue(kind))
    layer = build_model(spec, seed=8).memories[0]
    exact = copy.deepcopy(layer).double()
    x = torch.randn(5, spec.model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rows, cols = random_keys(spec, 5, 4, seed=3), random_keys(spec, 5, 4, seed=4)
    with torch.no_grad():
        got = layer.grid_at(x, rows, cols)
        want = grid_from_scores_at(exact, x, rows, cols)
    assert_same(got, want, "grid")


def test_grid_at_holds_the_layers_own_selection(tiny_spec):
    """The layer's top-m addresses are the top m of grid_at over its own top-m rows x columns."""
    layer = build_model(tiny_spec, seed=9).memories[0]
    m, n = tiny_spec.memory.topm, tiny_spec.memory.keys_per_side
    x = torch.randn(6, tiny_spec.model.d_model, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        rows, cols = (side.topk(m, dim=-1).indices for side in layer.side_scores(x))
        grid = layer.grid_at(x, rows, cols).sum(2).flatten(-2)  # (M, H, m*m)
        best = grid.topk(m, dim=-1).indices
        address = rows.gather(-1, best // m) * n + cols.gather(-1, best % m)
        chosen = layer.retrieve(x).indices.view(6, tiny_spec.memory.heads, m)
    assert torch.equal(address.sort(-1).values, chosen.sort(-1).values)


# ---------------------------------------------------------------- memory footprint

# A bfloat16 spec whose value tables dominate: 2 units x 625^2 rows x 256 = 200M values (400 MB).
MEMORY_BOUND_SCRIPT = """
import dataclasses, json, resource, sys
import torch
from umc.reference import build_model
from umc.spec import load_spec

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

tiny = dataclasses.replace(load_spec(sys.argv[1]), dtype="bfloat16")
spec = dataclasses.replace(tiny, memory=dataclasses.replace(tiny.memory, knum=625, vdim=256))
tokens = torch.randint(0, spec.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    build_model(tiny)(tokens, compute_dtype=torch.float64)  # loads torch's lazy libraries (LAPACK, ...) first
    base = peak()
    model = build_model(spec)
    built = peak()
    logits, state = model(tokens, compute_dtype=torch.float64)
    ran = peak()
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"weights": weights, "built": built - base, "ran": ran - base, "dtype": str(logits.dtype)}))
"""
TRANSIENT = 128 * 2**20  # one 2**24-element float32 draw (64 MiB) and the forward's activations, with slack


def test_float64_run_holds_no_float64_copy_of_the_weights():
    """Building holds the bf16 weights plus one bounded chunk of draws; the float64 run adds only
    gathered rows and activations. A float64 copy of the weights would add 4x their size (1.6 GB)."""
    done = subprocess.run([sys.executable, "-c", MEMORY_BOUND_SCRIPT, str(SPECS / "ultramem-tiny.yaml")],
                          capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert report["dtype"] == "torch.float64"
    assert report["weights"] > 400e6
    assert report["built"] < report["weights"] + TRANSIENT, report
    assert report["ran"] < report["weights"] + TRANSIENT, report
