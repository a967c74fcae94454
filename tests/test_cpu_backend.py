"""The "cpu" backend: each fast implementation against the op's torch implementation (and, through the shared
sampler, its decomposition); the in-place KV cache never changes a state it handed out; whole builds against the
graph backend and the eager model."""

import numpy as np
import pytest
import torch

import op_samples
from conftest import SPECS
from op_samples import check_instance
from test_decompositions import EXAMPLES
from umc.compiler import compile as compile_spec
from umc.reference import build_model
from umc.runtime import load
from umc.runtime.backends.cpu import FastOps, KVCache
from umc.runtime.backends.cpu_kernels import gather_pool, grid_topm, kernel, linear_small, top_k_rows
from umc.runtime.torch_ops import TORCH_IMPLS
from umc.spec import load_spec
from umc.verify import verify_build

FAST = FastOps()
OVERRIDDEN = {"attention": FAST.attention, "linear": FastOps.linear, "rms_norm": FastOps.rms_norm,
              "coarse_topm": FastOps.coarse_topm, "lookup_pool": FastOps.lookup_pool, "grid_topm": FastOps.grid_topm}


def _close(got, want, dtype):
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.is_floating_point():
            scale = max(w.double().abs().max().item(), 1e-30)
            assert (g.double() - w.double()).abs().max().item() <= tolerance * scale
        else:
            assert torch.equal(g, w)


@pytest.mark.parametrize("op", ["linear", "rms_norm", "coarse_topm", "lookup_pool", "grid_topm"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("batch", [2, 4])
def test_fast_op_equals_its_definition(op, dtype, batch, monkeypatch):
    """Against the op's decomposition (float64 as the yardstick), on the op instances of the example graphs: at 2 x 3
    and 4 x 3 tokens (the C++ paths for a few tokens, and the paths above ``MAX_ROWS``)."""
    monkeypatch.setitem(op_samples.SIZES, "B", batch)
    for n, (types, attrs) in enumerate(EXAMPLES[op][:4]):
        check_instance(op, types, attrs, lambda inputs: OVERRIDDEN[op](dict(attrs), *inputs), n, dtype)


@pytest.mark.parametrize("rows", [1, 8, 9, 128, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_on_each_path_equals_a_float64_product(rows, dtype):
    """The C++ kernel (1-8 rows), the transposed product (9-128, in chunks of weight rows: 2100 is three, the last
    partial) and F.linear (more) against float64, rounded once."""
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(1, rows, 96, generator=gen).to(dtype), torch.randn(2100, 96, generator=gen).to(dtype)
    (got,) = FastOps.linear({}, x, w)
    want = torch.nn.functional.linear(x.double(), w.double())
    assert got.dtype == dtype and got.shape == (1, rows, 2100) and got.is_contiguous()
    bound = (2 ** -8 if dtype == torch.bfloat16 else 1e-5) * want.abs().max()
    assert (got.double() - want).abs().max() <= bound


def _stable_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, ties to the lower index, NaN above every number (as torch.topk ranks it):
    numpy's lexsort (NaN first, then descending score, index order kept), written apart from the C++ selection."""
    nan = np.isnan(scores)
    return np.stack([np.lexsort((-np.where(n, 0.0, row), ~n))[:k] for row, n in zip(scores, nan)])


@pytest.mark.parametrize("n,k", [(1616, 80), (6400, 80), (100, 7), (13, 13), (9, 1), (50, 49)])
def test_cpp_top_k_equals_a_stable_sort(n, k):
    """The C++ selection (a bound from k disjoint sets' maxima, then an exact ranking) against numpy's stable sort:
    random scores, scores with many exact ties, -0 against +0, a NaN, infinities, n not a multiple of k, k = n."""
    gen = torch.Generator().manual_seed(n * 7 + k)
    rows = [torch.randn(n, generator=gen), torch.randint(0, 5, (n,), generator=gen).float(),
            torch.zeros(n).index_fill_(0, torch.arange(0, n, 2), -0.0)]
    with_nan = torch.randn(n, generator=gen)
    with_nan[n // 2] = float("nan")
    with_inf = torch.randn(n, generator=gen)
    with_inf[0], with_inf[-1] = float("-inf"), float("inf")
    scores = torch.stack(rows + [with_nan, with_inf])
    values, indices = top_k_rows(scores, k)
    want = _stable_top(scores.numpy(), k)
    assert np.array_equal(indices.numpy(), want)
    assert torch.equal(values.nan_to_num(7.0), torch.gather(scores, 1, indices).nan_to_num(7.0))


def test_a_wrong_selection_is_caught():
    """An off-by-one top-k (the best dropped, the (k+1)-th taken) fails the same check the C++ selection passes."""
    def off_by_one(attrs, q, keys):
        values, indices = FastOps.coarse_topm({"k": attrs["k"] + 1}, q, keys)
        return values[..., 1:], indices[..., 1:]

    types, attrs = EXAMPLES["coarse_topm"][0]
    with pytest.raises(AssertionError):
        check_instance("coarse_topm", types, attrs, lambda inputs: off_by_one(dict(attrs), *inputs), 0, "f32")


def test_cpp_memory_kernels_refuse_addresses_outside_their_tables():
    """A forged row index or virtual address is an error naming it, never a read outside the tensor."""
    table, scores = torch.randn(10, 8), torch.randn(1, 1, 1, 2, 2)
    with pytest.raises(RuntimeError, match="virtual address"):
        gather_pool(table, torch.tensor([[[[3, 40]]]]), scores, 4)  # 40 >= N * E = 40
    with pytest.raises(RuntimeError, match="virtual address"):
        gather_pool(table, torch.tensor([[[[-1, 3]]]]), scores, 4)
    with pytest.raises(RuntimeError, match="on the CPU"):
        gather_pool(table.to("meta"), torch.tensor([[[[3, 4]]]]), scores, 4)
    q, keys, cores = torch.randn(1, 1, 1, 4), torch.randn(1, 5, 4, 2), torch.randn(1, 2, 2, 2)
    good, bad = torch.tensor([[[[0, 4]]]]), torch.tensor([[[[0, 5]]]])
    assert grid_topm(q, q, keys, keys, good, good, cores, 5)[0].shape == (1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="i_col"):
        grid_topm(q, q, keys, keys, good, bad, cores, 5)


ATTENTION_CASES = [(4, 2, 8, 5, 0, False), (4, 2, 8, 1, 6, False), (4, 4, 8, 3, 4, False), (2, 1, 16, 1, 1, False),
                   (4, 2, 8, 1, 6, True), (4, 2, 8, 2, 5, True)]  # heads, kv, hd, T, past, ragged


@pytest.mark.parametrize("heads,kv,hd,steps,past,ragged", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_attention_equals_the_torch_implementation(heads, kv, hd, steps, past, ragged, dtype):
    """Prefill (no past), decode (one step), a multi-token step after a past, grouped and plain heads, and ragged
    batches (each sequence's own past length)."""
    gen = torch.Generator().manual_seed(heads * 100 + steps * 10 + past)
    batch = 3
    q = torch.randn(batch, steps, heads * hd, generator=gen).to(dtype)
    k, v = (torch.randn(batch, steps, kv * hd, generator=gen).to(dtype) for _ in range(2))
    pasts = [torch.randn(batch, kv, past, hd, generator=gen).to(dtype) for _ in range(2)] if past else []
    if ragged:
        pasts.append(torch.tensor([past, 0, past - 2]))
    attrs = {"n_heads": heads, "n_kv_heads": kv, "head_dim": hd, "rope_theta": 10000.0}
    _close(FastOps().attention(attrs, q, k, v, *pasts), TORCH_IMPLS["attention"](attrs, q, k, v, *pasts), dtype)


def test_decode_step_never_writes_a_users_past_and_refuses_a_bad_ragged_start():
    """The one-step C++ attention copies a past it did not make before appending (the caller's tensors unchanged);
    a sequence whose past would start before position 0 is an error, not a read before the buffer."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 1, 16, generator=gen), torch.randn(2, 1, 8, generator=gen), torch.randn(2, 1, 8, generator=gen)
    past = [torch.randn(2, 1, 4, 8, generator=gen) for _ in range(2)]
    kept = [p.clone() for p in past]
    attrs = {"n_heads": 2, "n_kv_heads": 1, "head_dim": 8, "rope_theta": 10000.0}
    _close(FastOps().attention(attrs, q, k, v, *past), TORCH_IMPLS["attention"](attrs, q, k, v, *past), torch.float32)
    assert all(torch.equal(p, c) for p, c in zip(past, kept))
    with pytest.raises(RuntimeError, match="first position"):
        FastOps().attention(attrs, q, k, v, *past, torch.tensor([4, 5]))


def test_a_wrong_fast_op_is_caught():
    wrong = lambda attrs, x, w: (torch.nn.functional.rms_norm(x, x.shape[-1:], w, attrs["eps"] * 1e4),)
    types, attrs = EXAMPLES["rms_norm"][0]
    with pytest.raises(AssertionError):
        check_instance("rms_norm", types, attrs, lambda inputs: wrong(dict(attrs), *inputs), 0, "f32")


def test_kv_cache_appends_in_place_and_never_changes_a_state_it_gave_out():
    cache = KVCache()
    first = cache.append(None, torch.ones(2, 1, 3, 4))
    second = cache.append(first, torch.full((2, 1, 1, 4), 2.0))
    assert second._base is first._base and second.shape[2] == 4  # continued in place
    third = cache.append(second, torch.full((2, 1, 1, 4), 3.0))
    branch = cache.append(second, torch.full((2, 1, 1, 4), 7.0))  # the same state continued again: copied
    assert branch._base is not third._base
    assert torch.equal(third[:, :, 4], torch.full((2, 1, 4), 3.0)) and torch.equal(branch[:, :, 4], torch.full((2, 1, 4), 7.0))
    assert torch.equal(second, torch.cat([torch.ones(2, 1, 3, 4), torch.full((2, 1, 1, 4), 2.0)], 2))
    users = torch.zeros(2, 1, 10, 4)
    extended = cache.append(users[:, :, :5], torch.ones(2, 1, 1, 4))  # a user's tensor is never written
    assert torch.equal(users, torch.zeros(2, 1, 10, 4)) and extended.shape[2] == 6
    grown = first
    for step in range(70):  # past the first buffer's capacity: grows, keeps every position
        grown = cache.append(grown, torch.full((2, 1, 1, 4), float(step)))
    assert grown.shape[2] == 73 and torch.equal(grown[0, 0, 3:, 0], torch.arange(70.0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu") / "build"
    compile_spec(SPECS / "ultramem-tiny.yaml", out)
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    return out, build_model(spec, seed=spec.seed).state_dict()


def test_cpu_backend_equals_graph_backend_while_decoding_and_branching(tiny):
    out, weights = tiny
    graph, cpu = load(out, "graph", weights, threads=False), load(out, "cpu", weights)
    tokens = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    want_logits, want_state = graph.prefill(tokens[:, :6])
    got_logits, got_state = cpu.prefill(tokens[:, :6])
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    fork_want, fork_got = want_state, got_state
    for t in range(6, 12):
        want_step, want_state = graph.decode(tokens[:, t:t + 1], want_state)
        got_step, got_state = cpu.decode(tokens[:, t:t + 1], got_state)
        torch.testing.assert_close(got_step, want_step, atol=1e-5, rtol=1e-4)
    kept = {k: v.clone() for k, v in got_state.items()}
    for name in kept:  # the states it returned are the graph backend's, position for position
        torch.testing.assert_close(got_state[name], want_state[name], atol=1e-5, rtol=1e-4)
    other = torch.randint(0, 512, (3, 1), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(cpu.decode(other, fork_got)[0], graph.decode(other, fork_want)[0], atol=1e-5, rtol=1e-4)
    assert all(torch.equal(kept[k], got_state[k]) for k in kept)  # continuing an old state changed nothing newer


def test_cpu_backend_verifies_against_eager(tiny):
    out, _ = tiny
    checks = verify_build(out, backend="cpu", steps=8)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(1, 768), (3, 37), (8, 16), (2, 15), (5, 7), (6, 8), (7, 100), (4, 64)])
def test_small_row_kernel_equals_a_float32_product(rows, width, dtype):
    """The C++ kernel (built on this machine: AVX2/FMA are there) against float32 F.linear of the same values, for
    every row count 1-8 and widths that are and are not multiples of its 8-wide step; rounded once to x's dtype."""
    module, why = kernel()
    assert module is not None, why
    gemv = module.gemv_small
    gen = torch.Generator().manual_seed(rows * width)
    x = torch.randn(1, rows, width, generator=gen).to(dtype)
    w = torch.randn(33, width, generator=gen).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float())
    got = linear_small(x, w)
    assert got.dtype == dtype and got.shape == (1, rows, 33)
    rounding = 2 ** -8 if dtype == torch.bfloat16 else 1e-6
    assert (got.float() - want).abs().max() <= rounding * want.abs().max()
    assert (gemv(x[0].float(), w) - want[0]).abs().max() <= 1e-5 * want.abs().max()


def test_small_row_kernel_refuses_what_it_cannot_compute():
    """More than 8 rows, a float16 weight, mismatched widths or a weight not in CPU memory are errors, not wrong
    numbers (or a read through a pointer that is not the CPU's)."""
    module, why = kernel()
    assert module is not None, why
    gemv = module.gemv_small
    for x, w in ((torch.randn(9, 8), torch.randn(4, 8)), (torch.randn(2, 8), torch.randn(4, 8).half()),
                 (torch.randn(2, 8), torch.randn(4, 9)), (torch.randn(2, 8), torch.randn(4, 8, device="meta"))):
        with pytest.raises(RuntimeError):
            gemv(x, w)
