"""Seeded init (per tensor name, so slices build alone), safetensors save/load, and errors that name the tensor."""

import dataclasses
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import umc.numerics
from conftest import SPECS
from umc.reference import (WeightsError, build_block, build_memory_layer, build_model, load_weights, rank_one_vectors,
                           save_weights)
from umc.reference.init import init_model
from umc.spec import load_spec

KINDS = [SPECS / "ultramem-tiny.yaml", SPECS / "pkm-tiny.yaml", SPECS / "ablation" / "10-improved-init.yaml"]


def assert_equal_tensors(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def test_same_seed_same_weights_other_seed_other_weights(tiny_spec):
    a, b, c = (build_model(tiny_spec, seed=s).state_dict() for s in (1, 1, 2))
    assert_equal_tensors(a, b)
    assert not torch.equal(a["memories.0.values_for_look_up"], c["memories.0.values_for_look_up"])
    assert not torch.equal(a["blocks.0.attn.q_proj.weight"], c["blocks.0.attn.q_proj.weight"])


@pytest.mark.parametrize("path", KINDS, ids=lambda p: p.stem)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slices_build_alone_with_the_whole_models_weights(path, dtype):
    spec = dataclasses.replace(load_spec(path), dtype=dtype)
    model = build_model(spec, seed=3)
    for unit, layer in enumerate(model.memories):
        assert_equal_tensors(build_memory_layer(spec, unit, seed=3).state_dict(), layer.state_dict())
    for index, block in enumerate(model.blocks):
        assert_equal_tensors(build_block(spec, index, seed=3).state_dict(), block.state_dict())


def test_slices_of_another_seed_differ(tiny_spec):
    model = build_model(tiny_spec, seed=3)
    other_layer, other_block = build_memory_layer(tiny_spec, 0, seed=4), build_block(tiny_spec, 0, seed=4)
    assert not torch.equal(other_layer.keys, model.memories[0].keys)
    assert not torch.equal(other_block.ffn.up_proj.weight, model.blocks[0].ffn.up_proj.weight)


def test_each_tensor_draws_its_own_values(tiny_spec):
    """The name is part of the seed: same-shaped tensors of different units, blocks or roles differ."""
    weights = build_model(tiny_spec).state_dict()
    different = [("memories.0.values_for_look_up", "memories.1.values_for_look_up"),
                 ("memories.0.shuffle_index", "memories.1.shuffle_index"),
                 ("blocks.0.attn.q_proj.weight", "blocks.1.attn.q_proj.weight"),
                 ("blocks.0.attn.k_proj.weight", "blocks.0.attn.v_proj.weight")]
    for a, b in different:
        assert weights[a].shape == weights[b].shape
        assert not torch.equal(weights[a], weights[b]), (a, b)


def test_slice_index_out_of_range(tiny_spec):
    with pytest.raises(IndexError, match="memory unit 2 does not exist"):
        build_memory_layer(tiny_spec, 2)
    with pytest.raises(IndexError, match="block -1 does not exist"):
        build_block(tiny_spec, -1)


def test_meta_slices_allocate_nothing(tiny_spec):
    parts = (build_memory_layer(tiny_spec, 1, device="meta"), build_block(tiny_spec, 3, device="meta"))
    assert all(t.is_meta for part in parts for t in part.state_dict().values())


def test_every_dtype_starts_from_the_same_values(tiny_spec, pkm_spec):
    """Draws are float32 and cast once: a bfloat16 build is the float32 build cast to bfloat16."""
    for spec in (tiny_spec, pkm_spec):
        wide = build_model(spec).state_dict()
        narrow = build_model(dataclasses.replace(spec, dtype="bfloat16")).state_dict()
        assert_equal_tensors(narrow, {name: t.to(narrow[name].dtype) for name, t in wide.items()})


@pytest.mark.parametrize("path", KINDS, ids=lambda p: p.stem)
def test_initialization_fills_every_tensor(path):
    """Uninitialized storage poisoned with NaN (floats) and -1 (indices), then initialized: nothing of the
    poison survives, and the result is build_model's."""
    spec = load_spec(path)
    model = build_model(spec, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(float("nan") if tensor.is_floating_point() else -1)
    init_model(model, seed=5)
    assert_equal_tensors(model.state_dict(), build_model(spec, seed=5).state_dict())


def fingerprint(spec_path: str, seed: int) -> str:
    """sha256 over every tensor's name and bytes: equal fingerprints mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in build_model(load_spec(spec_path), seed=seed).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_weights_are_the_same_in_every_process():
    """Seeds come from a stable hash of the tensor name, not Python's per-process salted hash()."""
    path = str(SPECS / "ultramem-tiny.yaml")
    script = f"import sys; sys.path.insert(0, {str(SPECS.parent / 'tests')!r}); import test_weights; " \
             f"print(test_weights.fingerprint({path!r}, 11))"
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONHASHSEED": salt}) for salt in ("1", "2")]
    others = [run.communicate()[0].strip() for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert others == [fingerprint(path, 11)] * 2


def test_roundtrip_reproduces_outputs(tiny_spec, tmp_path):
    path = tmp_path / "w.safetensors"
    source = build_model(tiny_spec, seed=1)
    save_weights(source, path)
    with safe_open(str(path), "pt") as f:  # a plain safetensors file, readable without umc
        assert "memories.0.shuffle_index" in f.keys()
    target = load_weights(build_model(tiny_spec, seed=2), path)
    tokens = torch.randint(0, tiny_spec.model.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(source(tokens)[0], target(tokens)[0])


def test_shape_mismatch_names_the_tensor(tiny_spec, tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(build_model(tiny_spec), path)
    other = dataclasses.replace(tiny_spec, memory=dataclasses.replace(tiny_spec.memory, vdim=16))
    with pytest.raises(WeightsError, match=r"tensor memories\.0\.values_for_look_up has shape \(64, 32\)"):
        load_weights(build_model(other), path)


def test_dtype_mismatch_names_the_tensor(tiny_spec, tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(build_model(tiny_spec), path)
    half = dataclasses.replace(tiny_spec, dtype="bfloat16")
    with pytest.raises(WeightsError, match=r"tensor \S+ has dtype torch.float32, the model needs torch.bfloat16"):
        load_weights(build_model(half), path)


def test_missing_and_unexpected_tensors(tiny_spec, pkm_spec, tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(build_model(pkm_spec), path)
    with pytest.raises(WeightsError, match="is missing|is not part of the model"):
        load_weights(build_model(tiny_spec), path)


def test_unreadable_file_is_a_weights_error(tiny_spec, tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(build_model(tiny_spec), path)


def test_rank_one_vectors_match_numpy_svd():
    cores = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # (H, h, r, r)
    u, v = rank_one_vectors(cores)
    for head in range(3):
        total = cores[head].sum(0).double().numpy()
        uu, ss, vh = np.linalg.svd(total)
        leading = ss[0] * np.outer(uu[:, 0], vh[0])
        got = ss[0] * np.outer(u[head].double().numpy(), v[head].double().numpy())
        np.testing.assert_allclose(got, leading, atol=1e-5)
        assert u[head][u[head].abs().argmax()] > 0  # sign convention


def test_improved_init_puts_mean_top_m_score_near_one(tiny_spec):
    improved = dataclasses.replace(tiny_spec, memory=dataclasses.replace(tiny_spec.memory, init="improved"))
    layer = build_model(improved).memories[0]
    probe = torch.randn(512, tiny_spec.model.d_model, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mean_score = layer.retrieve(probe).scores.abs().mean().item()
    assert 0.7 < mean_score < 1.4


def test_meta_model_cannot_be_saved(tiny_spec, tmp_path):
    with pytest.raises(WeightsError, match="meta"):
        save_weights(build_model(tiny_spec, device="meta"), tmp_path / "w.safetensors")


def write_with(path, tensors, name, values):
    """Save ``tensors`` with ``values`` ({flat position: value}) written into the tensor ``name``."""
    tensors = dict(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[list(values)] = torch.tensor(list(values.values()), dtype=tensors[name].dtype)
    save_file(tensors, str(path))


@pytest.mark.parametrize("infinity", [float("inf"), float("-inf")])
def test_non_finite_values_name_the_tensor(tiny_spec, tmp_path, infinity):
    path = tmp_path / "w.safetensors"
    save_weights(build_model(tiny_spec), path)
    injected = {0: float("nan"), 17: infinity, 8191: float("nan")}
    write_with(path, load_file(str(path)), "blocks.0.ffn.up_proj.weight", injected)
    with pytest.raises(WeightsError, match=r"w\.safetensors: tensor blocks\.0\.ffn\.up_proj\.weight has 3 "
                                           r"non-finite values \(NaN or Inf\)"):
        load_weights(build_model(tiny_spec), path)


def test_non_finite_values_are_counted_across_chunks(tiny_spec, tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_weights(build_model(tiny_spec), path)
    injected = {1: float("nan"), 2: float("inf"), 40: float("nan"), 1000: float("-inf")}
    write_with(path, load_file(str(path)), "memories.1.keys", injected)
    monkeypatch.setattr(umc.numerics, "CHUNK", 7)
    with pytest.raises(WeightsError, match=r"tensor memories\.1\.keys has 4 non-finite values"):
        load_weights(build_model(tiny_spec), path)
