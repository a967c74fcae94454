"""Seeded init, safetensors save/load, and errors that name the tensor."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors import safe_open

from umc.reference import WeightsError, build_model, load_weights, rank_one_vectors, save_weights


def test_same_seed_same_weights_other_seed_other_weights(tiny_spec):
    a, b, c = (build_model(tiny_spec, seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["memories.0.values_for_look_up"], c["memories.0.values_for_look_up"])


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
