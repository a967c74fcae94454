"""The eager memory layer against the authors' implementation (shared/golden)."""

import json

import pytest
import safetensors
import torch
from safetensors.torch import load_file

from conftest import GOLDEN, golden_files
from umc.reference import memory_layer_from_official


def test_golden_files_are_present():
    assert len(golden_files()) >= 3, f"golden files missing under {GOLDEN}"


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_layer_matches_official(path):
    tensors = load_file(str(path))
    config = json.loads(safetensors.safe_open(str(path), "pt").metadata()["config"])
    layer = memory_layer_from_official(tensors, config)
    x, expected = tensors["input"], tensors["expected_output"]
    with torch.no_grad():
        out = layer(x)
        picked = layer.layer.retrieve(x.reshape(-1, x.shape[-1]))
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()

    heads, m = config["head"], config["knn"]
    got = picked.indices.view(-1, heads, m)
    want = tensors["expected_indices"].view(-1, heads, m)
    for token in range(got.shape[0]):
        for head in range(heads):
            assert set(got[token, head].tolist()) == set(want[token, head].tolist()), (token, head)

    # per-core scores, matched by address (order within a head may differ on ties)
    got_scores = picked.scores.view(-1, heads, m, config["tucker_multihead"])
    want_scores = tensors["expected_scores"].view_as(got_scores)
    order_got, order_want = got.argsort(-1), want.argsort(-1)
    idx = lambda o: o.unsqueeze(-1).expand(-1, -1, -1, got_scores.shape[-1])
    aligned_got = got_scores.gather(2, idx(order_got))
    aligned_want = want_scores.gather(2, idx(order_want))
    assert (aligned_got - aligned_want).abs().max() <= 1e-5 * want_scores.abs().max()


def test_official_import_names_a_wrong_tensor():
    path = golden_files()[0]
    tensors = load_file(str(path))
    config = json.loads(safetensors.safe_open(str(path), "pt").metadata()["config"])
    tensors["keys"] = tensors["keys"][..., :1]
    with pytest.raises(ValueError, match="tensor keys: shape"):
        memory_layer_from_official(tensors, config)
    del tensors["values_proj.weight"]
    with pytest.raises(ValueError, match="values_proj.weight"):
        memory_layer_from_official(tensors, config)
