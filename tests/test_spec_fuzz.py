"""Fuzzing the spec loader: any text gives a Spec or a SpecError, never another exception or a hang.

(a) random YAML-ish text, (b) random mutations of the shipped specs at any depth, and
(c) alias bombs. Every Spec that comes out is checked against the spec rules,
recomputed here independently of umc.spec.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from umc.spec import DTYPES, Spec, SpecError, parse_spec, spec_from_dict

SPECS = Path(__file__).resolve().parent.parent / "specs"
SHIPPED = sorted(SPECS.rglob("*.yaml"))
SHIPPED_TEXT = [p.read_text(encoding="utf-8") for p in SHIPPED]
SHIPPED_DATA = [yaml.safe_load(t) for t in SHIPPED_TEXT]

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INT64_MAX = 2**63 - 1
PETABYTE = 10**15

FIELD_NAMES = sorted({k for d in SHIPPED_DATA for k in d} | {k for d in SHIPPED_DATA for s in ("model", "memory") for k in d[s]})
CHOICES = ["float32", "float16", "bfloat16", "swiglu", "gelu", "rmsnorm", "layernorm", "ultramem", "pkm",
           "none", "softmax", "relu", "layernorm_bias", "official", "improved"]


def parse(text: str, source: str = "fuzz.yaml") -> Spec | SpecError:
    """parse_spec, returning the SpecError instead of raising it; anything else propagates and fails the test."""
    try:
        spec = parse_spec(text, source=source)
    except SpecError as err:
        check_error(err, text, source)
        return err
    check_invariants(spec)
    return spec


def check_error(err: SpecError, text: str, source: str) -> None:
    """A SpecError names its source, a line inside the text (or none), and is one bounded line."""
    message = str(err)
    assert err.source == source and message.startswith(source)
    if err.line is not None:
        assert 1 <= err.line <= len(text.splitlines()) + 1, (err.line, message)
        assert message.startswith(f"{source}:{err.line}: ")
    assert err.problem and len(message) < 2000, message


def check_invariants(spec: Spec) -> None:
    """The spec rules, recomputed from the fields (not from MemorySpec's properties)."""
    model, mem = spec.model, spec.memory
    assert spec.dtype in DTYPES
    assert isinstance(spec.name, str) and spec.name.strip() and len(spec.name) <= 200
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in spec.name)
    sizes = [spec.seed, model.vocab_size, model.d_model, model.n_layers, model.n_heads, model.n_kv_heads, model.ffn_hidden,
             model.max_seq_len, mem.knum, mem.kdim, mem.vdim, mem.topm, mem.heads, mem.tucker_rank, mem.cores, mem.value_expansion]
    if mem.query_conv is not None:
        sizes.append(mem.query_conv)
    for size in sizes:
        assert type(size) is int and 0 <= size <= INT64_MAX
    assert spec.seed >= 0 and all(s >= 1 for s in sizes[1:])
    for eps in (model.norm_eps, model.rope_theta, mem.norm_eps):
        assert type(eps) is float and math.isfinite(eps) and eps > 0
    for flag in (model.tie_embeddings, mem.share_query, mem.output_projection):
        assert type(flag) is bool
    assert model.d_model % model.n_heads == 0 and (model.d_model // model.n_heads) % 2 == 0
    assert model.n_heads % model.n_kv_heads == 0
    assert mem.units and all(0 <= u.read <= u.write < model.n_layers for u in mem.units)
    root = math.isqrt(mem.value_expansion)
    assert root * root == mem.value_expansion
    assert 1 <= mem.topm <= root * mem.knum
    assert mem.vdim % mem.cores == 0
    if mem.kind == "pkm":
        assert mem.kdim % 2 == 0 and mem.tucker_rank == 1 and mem.cores == 1
    if not mem.output_projection:
        assert mem.vdim == model.d_model and mem.value_expansion == 1
    # a few of the sizes a run allocates (batch 1, max_seq_len), bounded by 1 PB in the spec's dtype
    itemsize = 4 if spec.dtype == "float32" else 2
    tokens, n = model.max_seq_len, root * mem.knum
    for elements in (len(mem.units) * mem.knum ** 2 * mem.vdim, model.vocab_size * model.d_model, tokens * model.vocab_size,
                     model.n_heads * tokens * tokens, tokens * mem.heads * mem.cores * mem.topm ** 2, tokens * mem.heads * n):
        assert elements * itemsize <= PETABYTE
    # what comes out goes back in unchanged
    assert spec_from_dict(spec.to_dict()) == dataclasses.replace(spec, source="<dict>")


# ---------------------------------------------------------------- (a) random YAML-ish text

YAML_ALPHABET = st.sampled_from(list(" \t\n\r:-,[]{}&*!|>'\"#%@`?.~=<0123456789abcxyz_/\\") + ["\u00e9", "\u2028", "\x85", "\x00", "\x1b"])
SNIPPETS = st.sampled_from([
    "&a", "*a", "&anchor [1, 2]", "*anchor", "<<: *a", "!!python/object/apply:os.system ['true']", "!!str", "!!int",
    "!!float", "!!binary aGk=", "!!set {a, b}", "!!omap [a: 1]", "!!timestamp 2001-13-45", "!foo bar", "%YAML 1.1\n---",
    "---", "...", "? [a]\n: b", "\t", ": :", "- - -", "{a: [b, {c: d}]}", "'unterminated", '"\\x"', "|\n  block", ">-\n  fold",
    "2:5", "0:1/2:3", "1e-5", ".nan", "-.inf", "0x1F", "0o17", "1_000", "~", "null", "yes", "on", "2001-02-30",
    "9" * 5000, "[" * 60, "{" * 60,
])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(CHOICES + FIELD_NAMES + ["0:1", "2:5/6:9", "1e-5"]),
)
NESTED = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)), inner, max_size=5), max_leaves=25)


@FUZZ
@given(st.text(max_size=300))
def test_random_text(text):
    parse(text)


@FUZZ
@given(st.lists(st.one_of(YAML_ALPHABET, SNIPPETS, st.text(max_size=5)), max_size=60).map("".join))
@example("!!int")  # found by this test: PyYAML raised IndexError on an empty !!int / !!float
@example("!!float")
@example("a: !!timestamp x")
@example("*a" + "9" * 5000)  # found by this test: PyYAML quotes the undefined alias in full
@example("model: {d_model: 0x40}\nmemory: {knum: 1:04}")
@example('name: "a\\e[31m"\nmodel: {}')
def test_random_yaml_ish_text(text):
    parse(text)


@FUZZ
@given(NESTED)
def test_random_structures(data):
    parse(yaml.safe_dump(data, sort_keys=False))


@FUZZ
@given(st.data())
def test_random_line_edits_of_shipped_specs(data):
    lines = data.draw(st.sampled_from(SHIPPED_TEXT)).splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(lines)))
        snippet = data.draw(st.one_of(SNIPPETS, st.text(YAML_ALPHABET, max_size=20)))
        action = data.draw(st.sampled_from(["insert", "replace", "append", "delete", "indent"]))
        if action == "insert" or at == len(lines):
            lines.insert(at, data.draw(st.sampled_from(["", "  ", "    "])) + snippet)
        elif action == "replace":
            key = lines[at].split(":")[0]
            lines[at] = f"{key}: {snippet}"
        elif action == "append":
            lines[at] += snippet
        elif action == "delete":
            del lines[at]
        else:
            lines[at] = data.draw(st.sampled_from(["\t", " ", "   "])) + lines[at]
    parse("\n".join(lines) + "\n")


INT_LINE = re.compile(r"^(\s*)(\w+): ([0-9]+)\s*(#.*)?$")  # in the shipped specs, every such line is an integer field
NOTATIONS = [  # YAML 1.1 spellings of n other than plain decimal; None where n has none
    lambda n: hex(n),
    lambda n: bin(n),
    lambda n: "0" + oct(n)[2:],
    lambda n: f"{n // 60}:{n % 60:02d}" if n >= 60 else None,
    lambda n: f"{str(n)[0]}_{str(n)[1:]}" if n >= 10 else None,
]


@FUZZ
@given(st.data())
def test_integer_fields_in_other_notations_are_refused(data):
    """Rewrite one integer field of a shipped spec as the same number in another notation: always refused, at that key."""
    index = data.draw(st.integers(0, len(SHIPPED_TEXT) - 1))
    lines = SHIPPED_TEXT[index].splitlines()
    candidates = [i for i, line in enumerate(lines) if INT_LINE.match(line)]
    at = data.draw(st.sampled_from(candidates))
    indent, key, digits, _ = INT_LINE.match(lines[at]).groups()
    written = data.draw(st.sampled_from(NOTATIONS))(int(digits))
    if written is None:
        return
    lines[at] = f"{indent}{key}: {written}"
    result = parse("\n".join(lines) + "\n")
    assert isinstance(result, SpecError), written
    section = next(line[:-1] for line in reversed(lines[:at]) if re.fullmatch(r"\w+:", line)) if indent else ""
    assert (result.line, result.key) == (at + 1, f"{section}.{key}" if indent else key), str(result)
    assert f"{written} is " in str(result) and "write integers in plain decimal" in str(result)


# ---------------------------------------------------------------- (b) mutations of valid specs

NASTY_NUMBERS = st.sampled_from([0, -1, 1, 2, 3, 4, 7, 9, 16, 64, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -10**30, 10**300,
                                 0.0, -0.0, 0.5, 1e-5, 1e308, -1e-5, math.inf, -math.inf, math.nan])
VALUES = st.one_of(
    NASTY_NUMBERS, st.integers(-5, 200), st.integers(), st.floats(), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(CHOICES + ["0:0", "0:3", "1:2", "3:3", "2:1", "0:1/2:3", "9:9", "a:b", "1e-5", ""]),
    st.lists(st.one_of(st.integers(-2, 10), st.sampled_from(["0:1", "1:1", "2:3", "x"])), max_size=4),
    NESTED,
)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (mapping keys and list indices) inside ``node``."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append(prefix + (key,))
            out.extend(paths(value, prefix + (key,)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append(prefix + (i,))
            out.extend(paths(value, prefix + (i,)))
    return out


def parent_of(root: Any, path: tuple) -> Any:
    for step in path[:-1]:
        root = root[step]
    return root


def mutate(data: Any, draw) -> Any:
    """Delete a key, replace a value or add a key, anywhere in ``data``."""
    candidates = paths(data)
    action = draw(st.sampled_from(["delete", "replace", "replace", "replace", "add"]))
    if not candidates:
        return draw(VALUES)
    path = draw(st.sampled_from(candidates))
    parent = parent_of(data, path)
    if action == "delete":
        del parent[path[-1]]
    elif action == "replace":
        parent[path[-1]] = draw(VALUES)
    else:
        target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
        if isinstance(target, dict):
            key = draw(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10), st.integers(), st.booleans()))
            target[key] = draw(VALUES)
        else:
            target.append(draw(VALUES))
    return data


@FUZZ
@given(st.data())
def test_mutated_shipped_specs(data):
    spec_data = copy.deepcopy(data.draw(st.sampled_from(SHIPPED_DATA)))
    for _ in range(data.draw(st.integers(1, 3))):
        spec_data = mutate(spec_data, data.draw)
    text = yaml.safe_dump(spec_data, sort_keys=data.draw(st.booleans()), default_flow_style=data.draw(st.sampled_from([False, None, True])))
    result = parse(text)
    if isinstance(result, Spec) and isinstance(spec_data, dict):
        # what the file said is what the spec holds
        for section in ("model", "memory"):
            for key, value in spec_data[section].items():
                if type(value) is int:  # an int given for a float field comes out as that float
                    expected = float(value) if key in ("norm_eps", "rope_theta") else value
                    assert getattr(getattr(result, section), key) == expected, (section, key)


@FUZZ
@given(st.data())
def test_mutated_specs_through_spec_from_dict(data):
    spec_data = copy.deepcopy(data.draw(st.sampled_from(SHIPPED_DATA)))
    spec_data = mutate(spec_data, data.draw)
    try:
        spec = spec_from_dict(spec_data, source="dict")
    except SpecError as err:
        assert err.line is None and str(err).startswith("dict: ")
        return
    check_invariants(spec)


@FUZZ
@given(st.data())
def test_small_valid_looking_specs(data):
    """Change a few sizes to small, mostly sensible values, so many drawn specs pass and the invariants get checked."""
    base = copy.deepcopy(data.draw(st.sampled_from(SHIPPED_DATA)))
    small = st.sampled_from([0, 1, 2, 3, 4, 6, 8, 9, 12, 16, 32, 64, 128])
    sometimes = st.integers(0, 3).map(lambda n: n == 0)
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads"):
        if data.draw(sometimes):
            base["model"][key] = data.draw(small)
    for key in ("knum", "kdim", "vdim", "topm", "heads", "tucker_rank", "cores", "value_expansion"):
        if data.draw(sometimes):
            base["memory"][key] = data.draw(small)
    for key, choices in (("kind", ["ultramem", "pkm"]), ("output_projection", [True, False]), ("query_conv", [None, 1, 4])):
        if data.draw(sometimes):
            base["memory"][key] = data.draw(st.sampled_from(choices))
    if data.draw(sometimes):
        n = data.draw(st.integers(1, 3))
        base["memory"]["units"] = "/".join(f"{data.draw(st.integers(0, 9))}:{data.draw(st.integers(0, 9))}" for _ in range(n))
    parse(yaml.safe_dump(base, sort_keys=False))


def test_valid_inputs_come_out_as_specs():
    """Guard against a fuzz run that only ever exercises the error paths."""
    results = []

    @settings(max_examples=100, deadline=None, database=None)
    @given(st.data())
    def collect(data):
        base = copy.deepcopy(SHIPPED_DATA[0])
        base["memory"]["topm"] = data.draw(st.integers(1, 8))
        results.append(parse(yaml.safe_dump(base)))

    collect()
    assert any(isinstance(r, Spec) for r in results)


# ---------------------------------------------------------------- (c) alias bombs and deep nesting

TINY = (SPECS / "ultramem-tiny.yaml").read_text(encoding="utf-8")


def laughs(levels: int = 9, width: int = 9) -> str:
    """A flow list whose last item expands to width**levels strings: the "billion laughs"."""
    items = ['&l0 ["lol"' + ', "lol"' * (width - 1) + "]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


BOMB_SITES = [
    ("name: ultramem-tiny", "name: {bomb}"),
    ("seed: 0", "seed: {bomb}"),
    ("  vocab_size: 512", "  vocab_size: {bomb}"),
    ("  norm_eps: 1.0e-5", "  norm_eps: {bomb}"),
    ("  tie_embeddings: true", "  tie_embeddings: {bomb}"),
    ('  units: "0:1/2:3"', "  units: {bomb}"),
    ('  units: "0:1/2:3"', '  units: ["0:1", {bomb}]'),
    ("  kind: ultramem", "  kind: {bomb}"),
    ("  init: official", "  init: official\n  extra: {bomb}"),
    ("seed: 0", "seed: 0\nextra: {bomb}"),
]


@pytest.mark.parametrize("old, new", BOMB_SITES, ids=[new.split(":")[0].strip() + str(i) for i, (_, new) in enumerate(BOMB_SITES)])
def test_billion_laughs_finishes_fast(old, new):
    assert old in TINY
    text = TINY.replace(old, new.format(bomb=laughs()), 1)
    started = time.perf_counter()
    result = parse(text)
    assert time.perf_counter() - started < 2.0
    assert isinstance(result, SpecError)
    assert len(str(result)) < 500


def test_billion_laughs_as_the_whole_model_section():
    text = f"a: &m {laughs()}\n" + TINY
    started = time.perf_counter()
    assert isinstance(parse(text), SpecError)
    assert time.perf_counter() - started < 2.0


def test_aliases_that_are_fine_are_accepted():
    text = TINY.replace("  n_heads: 4", "  n_heads: &h 4").replace("  n_kv_heads: 2", "  n_kv_heads: *h")
    spec = parse(text)
    assert isinstance(spec, Spec) and spec.model.n_kv_heads == 4


@pytest.mark.parametrize("text", [
    "name: &a [*a]\n",  # a list that contains itself
    "model: &m {inner: *m}\nmemory: {}\n",  # a mapping that contains itself
    TINY.replace("name: ultramem-tiny", "name: &a [*a]"),
    TINY.replace('  units: "0:1/2:3"', "  units: &u [*u]"),
])
def test_self_referencing_aliases(text):
    assert isinstance(parse(text), SpecError)


@pytest.mark.parametrize("depth", [100, 2000, 20000])
def test_deep_nesting(depth):
    for text in ("name: " + "[" * depth + "]" * depth + "\n", "name: " + "{a: " * depth + "1" + "}" * depth + "\n",
                 "name:\n" + "".join("  " * i + "- \n" for i in range(1, min(depth, 500)))):
        started = time.perf_counter()
        assert isinstance(parse(text), SpecError)
        assert time.perf_counter() - started < 5.0
