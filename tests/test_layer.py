"""``umc.compile_memory_layer``: the compiled counterpart of the authors' layer, on every golden file, against the
authors' expected output and the eager reference layer built from the same tensors."""

import json

import pytest
import safetensors
from safetensors.torch import load_file

import umc
from conftest import golden_files
from umc.reference import memory_layer_from_official
from umc.runtime import BindError
from umc.spec import SpecError

TOLERANCE = 1e-5  # of the output's largest magnitude (float32, DESIGN §7)


def read(path):
    with safetensors.safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    return load_file(str(path)), config


@pytest.mark.parametrize("backend", ["cpu", "graph"])
@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_compiled_layer_equals_the_authors_output(path, backend):
    tensors, config = read(path)
    layer = umc.compile_memory_layer(tensors, config, backend=backend)
    x = tensors["input"]
    got = layer(x)
    eager = memory_layer_from_official(tensors, config)(x)
    scale = tensors["expected_output"].abs().max().item()
    assert got.shape == x.shape
    assert (got - tensors["expected_output"]).abs().max().item() <= TOLERANCE * scale
    assert (got - eager).abs().max().item() <= TOLERANCE * scale
    assert (layer(x[:3]) - got[:3]).abs().max().item() <= TOLERANCE * scale  # tokens are independent


def test_bad_config_and_tensors_are_clear_errors():
    tensors, config = read(golden_files()[0])
    with pytest.raises(SpecError, match="knn"):
        umc.compile_memory_layer(tensors, {**config, "knn": 0})
    missing = {k: v for k, v in tensors.items() if k != "values_for_look_up"}
    with pytest.raises(BindError, match="values_for_look_up"):
        umc.compile_memory_layer(missing, config)
