"""The authors' layer config (golden files, checkpoints) is validated like a spec's memory section,
and every error names the config key as the authors wrote it."""

from __future__ import annotations

import json

import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import golden_files
from umc.official import OFFICIAL_CONFIG_KEYS, official_memory_spec
from umc.spec import MemorySpec, MemoryUnit, SpecError

SMALL = {"hidden_size": 64, "knum": 16, "kdim": 16, "vdim": 32, "knn": 8, "head": 2, "tucker_rank": 2,
         "tucker_multihead": 2, "value_expand_time": 4, "layer_norm_eps": 1e-05}  # ultramem_v1_small's config
SOURCE = "ultramem_v1_small.safetensors"


def refused(config, key: str, *fragments: str) -> SpecError:
    """official_memory_spec(config) raises one SpecError line naming SOURCE and ``key``, holding every fragment."""
    with pytest.raises(SpecError) as info:
        official_memory_spec(config, source=SOURCE)
    message = str(info.value)
    assert (info.value.source, info.value.line, info.value.key) == (SOURCE, None, key), message
    assert message.startswith(f"{SOURCE}: {key}: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_golden_configs_are_valid(path):
    config = json.loads(safetensors.safe_open(str(path), "pt").metadata()["config"])
    mem = official_memory_spec(config, source=path.name)
    assert isinstance(mem, MemorySpec)
    assert (mem.knum, mem.kdim, mem.vdim, mem.topm, mem.heads, mem.tucker_rank, mem.cores, mem.value_expansion) == tuple(
        config[k] for k in ("knum", "kdim", "vdim", "knn", "head", "tucker_rank", "tucker_multihead", "value_expand_time"))
    assert (mem.kind, mem.units, mem.share_query, mem.query_conv, mem.norm_eps) == ("ultramem", (MemoryUnit(0, 0),), True, None, 1e-5)


def test_the_reference_imports_the_same_function():
    from umc.reference import official

    assert official.official_memory_spec is official_memory_spec


def test_layer_norm_eps_is_optional_and_other_keys_are_ignored():
    config = {k: v for k, v in SMALL.items() if k != "layer_norm_eps"} | {"layer_norm_eps_typo": 3, "mem_type": "ultramem"}
    assert official_memory_spec(config).norm_eps == 1e-5


@pytest.mark.parametrize("key, value, fragments", [
    ("knn", 0, ("0 is too small (allowed: a positive integer below 2**63)",)),
    ("knn", 33, ("33 exceeds the keys per side sqrt(value_expand_time)*knum = 32 (allowed: 1..32)",)),
    ("knum", -1, ("-1 is too small",)),
    ("head", 2.0, ("expected an integer, got a number 2.0",)),
    ("kdim", "16", ("expected an integer, got a string '16'",)),
    ("tucker_rank", True, ("expected an integer, got a boolean True",)),
    ("hidden_size", None, ("expected an integer, got null",)),
    ("value_expand_time", 3, ("3 is not a perfect square (allowed: 1, 4, 9, 16, ...)",)),
    ("vdim", 33, ("33 is not divisible by tucker_multihead 2 (allowed: multiples of tucker_multihead)",)),
    ("layer_norm_eps", -1, ("-1 is not allowed (allowed: a finite number > 0)",)),
    ("knum", 10**10, ("10000000000 is too large: the layer's weights would be 3.2e+21 parameters, more than int64 holds",
                      "(allowed: sizes whose weights and per-token lookup tensors stay within int64 elements and 1 PB)")),
    ("vdim", 10**14, ("is too large: the layer's weights would be", "bytes, more than 1 PB")),
])
def test_bad_values_name_the_authors_key(key, value, fragments):
    refused(SMALL | {key: value}, f"config.{key}", *fragments)


def test_huge_hidden_size_names_hidden_size():
    refused(SMALL | {"hidden_size": 10**13}, "config.hidden_size", "is too large: the layer's weights would be", "more than 1 PB")


@pytest.mark.parametrize("key", OFFICIAL_CONFIG_KEYS)
def test_missing_key(key):
    config = {k: v for k, v in SMALL.items() if k != key}
    refused(config, "config", f"missing required key {key!r} (required: {', '.join(OFFICIAL_CONFIG_KEYS)})")


@pytest.mark.parametrize("config, kind", [([1, 2], "list"), ("knum", "str"), (None, "NoneType")])
def test_config_that_is_not_a_mapping(config, kind):
    refused(config, "config", "expected a mapping with keys hidden_size, knum", f"got {kind}")


def test_default_source_and_value_error_compatibility():
    with pytest.raises(ValueError, match=r"^<config>: config\.knn: 0 is too small"):
        official_memory_spec(SMALL | {"knn": 0})


VALUES = st.one_of(st.integers(-3, 40), st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=5),
                   st.lists(st.integers(), max_size=2), st.sampled_from([2**63, 10**30, 10**9, 10**12]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(list(SMALL)), VALUES, max_size=4), st.sets(st.sampled_from(list(SMALL)), max_size=2))
def test_fuzzed_configs_raise_nothing_but_spec_error(changes, dropped):
    config = {k: v for k, v in (SMALL | changes).items() if k not in dropped}
    try:
        mem = official_memory_spec(config, source=SOURCE)
    except SpecError as err:
        assert str(err).startswith(f"{SOURCE}: config") and "\n" not in str(err)
        return
    assert 1 <= mem.topm <= mem.keys_per_side and mem.vdim % mem.cores == 0
