"""Parameter counts and FLOPs: the released configs against the authors' figures, and the
shape arithmetic of umc.cost against the modules the eager reference actually builds."""

import functools
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


# ---------------------------------------------------------------- memory a run needs (umc.cost.memory_needs)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.cache
def eager(spec_name: str):
    """A shipped small spec and its eager model, built once for the tests below."""
    spec = load_spec(SPECS / f"{spec_name}.yaml")
    return spec, build_model(spec)


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: str(p.relative_to(SPECS)))
def test_weight_bytes_are_what_the_model_holds(path):
    from umc.cost import memory_needs

    spec = load_spec(path)
    model = build_model(spec, device="meta")
    needs = memory_needs(spec)
    assert needs.weight_bytes == tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    assert needs.value_table_bytes == tensor_bytes(m.values_for_look_up for m in model.memories)
    assert needs.shuffle_bytes == tensor_bytes(m.shuffle_index for m in model.memories if hasattr(m, "shuffle_index"))


@pytest.mark.parametrize("spec_name", ["ultramem-tiny", "pkm-tiny"])
@pytest.mark.parametrize("batch, seq_len", [(1, 7), (3, 5)])
def test_kv_cache_bytes_are_the_states_tensors(spec_name, batch, seq_len):
    from umc.cost import memory_needs

    spec, model = eager(spec_name)
    with torch.no_grad():
        _, state = model(torch.zeros(batch, seq_len, dtype=torch.long))
    assert memory_needs(spec, batch, seq_len).kv_cache_bytes == tensor_bytes(t for kv in state.kv for t in kv)


def largest_tensor_made(run) -> int:
    """Bytes of the largest storage any op allocates while ``run()`` runs (views of their inputs are no allocation)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                    Largest.largest = max(Largest.largest, t.untyped_storage().nbytes())
            return out

    with Largest():
        run()
    return Largest.largest


@pytest.mark.parametrize("spec_name", ["ultramem-tiny", "pkm-tiny"])
def test_working_set_covers_the_largest_tensor_of_a_real_step(spec_name):
    from umc.cost import memory_needs

    spec, model = eager(spec_name)
    batch, seq_len = 2, 32
    tokens = torch.zeros(batch, seq_len, dtype=torch.long)
    needs = memory_needs(spec, batch, seq_len)
    with torch.no_grad():
        prefill = largest_tensor_made(lambda: model(tokens))
        _, state = model(tokens[:, :-1])
        decode = largest_tensor_made(lambda: model(tokens[:, -1:], state))
    assert prefill <= needs.prefill_bytes <= 8 * prefill
    assert decode <= needs.decode_bytes <= 8 * decode
    assert needs.decode_bytes < needs.prefill_bytes


def test_memory_needs_scale_with_batch_and_length(tiny_spec):
    from umc.cost import memory_needs

    one, four = memory_needs(tiny_spec, 1, 64), memory_needs(tiny_spec, 4, 64)
    assert four.weight_bytes == one.weight_bytes
    assert four.kv_cache_bytes == 4 * one.kv_cache_bytes
    for step in ("prefill_bytes", "decode_bytes"):  # activations grow with the batch, the normalized keys do not
        assert getattr(one, step) < getattr(four, step) <= 4 * getattr(one, step)
    assert memory_needs(tiny_spec).seq_len == tiny_spec.model.max_seq_len == 256
    with pytest.raises(ValueError, match="max_seq_len 256"):
        memory_needs(tiny_spec, 1, 257)
