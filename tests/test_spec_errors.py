"""Every class of spec mistake is a SpecError naming the file, the exact line, the key path and what is allowed.

Each test writes a copy of specs/ultramem-tiny.yaml (``TINY`` below, comments dropped so
its line numbers are fixed) with one or two lines changed, so the expected line is known
from the text itself.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from umc.cli import main
from umc.cost import memory_needs
from umc.spec import MAX_SPEC_BYTES, Spec, SpecError, load_spec, parse_spec, spec_from_dict

SPECS = Path(__file__).resolve().parent.parent / "specs"

# specs/ultramem-tiny.yaml without its two comment lines; line numbers on the right.
TINY = """\
name: ultramem-tiny
dtype: float32
seed: 0
model:
  vocab_size: 512
  d_model: 64
  n_layers: 4
  n_heads: 4
  n_kv_heads: 2
  ffn: swiglu
  ffn_hidden: 128
  norm: rmsnorm
  norm_eps: 1.0e-5
  rope_theta: 10000.0
  max_seq_len: 256
  tie_embeddings: true
memory:
  kind: ultramem
  units: "0:1/2:3"
  knum: 8
  kdim: 16
  vdim: 32
  topm: 6
  heads: 2
  share_query: true
  tucker_rank: 2
  cores: 2
  value_expansion: 4
  query_conv: 3
  score_activation: none
  query_norm: layernorm
  key_norm: layernorm
  output_projection: true
  init: official
"""
# 1 name  2 dtype  3 seed  4 model  5 vocab_size  6 d_model  7 n_layers  8 n_heads  9 n_kv_heads
# 10 ffn  11 ffn_hidden  12 norm  13 norm_eps  14 rope_theta  15 max_seq_len  16 tie_embeddings
# 17 memory  18 kind  19 units  20 knum  21 kdim  22 vdim  23 topm  24 heads  25 share_query
# 26 tucker_rank  27 cores  28 value_expansion  29 query_conv  30 score_activation  31 query_norm
# 32 key_norm  33 output_projection  34 init

MODEL_KEYS = "vocab_size, d_model, n_layers, n_heads, n_kv_heads, ffn, ffn_hidden, norm, norm_eps, rope_theta, max_seq_len, tie_embeddings"
TOP_KEYS = "name, dtype, seed, model, memory"


def write(tmp_path: Path, *edits: tuple[int, str, str], text: str = TINY, name: str = "spec.yaml") -> Path:
    """Write ``text`` with edits (line, old line, new text; new may hold several lines or be '' to delete)."""
    lines = text.splitlines()
    for line, old, new in sorted(edits, reverse=True):  # bottom-up, so the other line numbers still hold
        assert lines[line - 1] == old, f"line {line} is {lines[line - 1]!r}, not {old!r}"
        lines[line - 1:line] = new.splitlines()
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def expect_error(path: Path, line: int | None, key: str, *fragments: str) -> SpecError:
    """load_spec(path) raises a SpecError at ``line`` and ``key`` whose message holds every fragment."""
    with pytest.raises(SpecError) as info:
        load_spec(path)
    err = info.value
    message = str(err)
    assert (err.source, err.line, err.key) == (str(path), line, key), message
    where = f"{path}:{line}" if line is not None else str(path)
    assert message.startswith(f"{where}: {key}: " if key else f"{where}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message
    return err


def test_the_base_text_is_valid(tmp_path):
    spec = load_spec(write(tmp_path))
    assert spec.name == "ultramem-tiny"
    assert spec.memory.keys_per_side == 16  # sqrt(4) * 8: the bound the topm tests use


# ---------------------------------------------------------------- unknown, mistyped, missing keys


@pytest.mark.parametrize("line, old, new, key, suggestion, allowed", [
    (6, "  d_model: 64", "  d_modle: 64", "model.d_modle", "did you mean 'd_model'?", MODEL_KEYS),
    (21, "  kdim: 16", "  kdims: 16", "memory.kdims", "did you mean 'kdim'?", "kind, units, knum, kdim, vdim, topm"),
    (17, "memory:", "memroy:", "memroy", "did you mean 'memory'?", TOP_KEYS),
])
def test_unknown_key_suggests_the_close_one(tmp_path, line, old, new, key, suggestion, allowed):
    path = write(tmp_path, (line, old, new))
    expect_error(path, line, key, "unknown key", suggestion, f"allowed: {allowed}")


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(tmp_path):
    path = write(tmp_path, (11, "  ffn_hidden: 128", "  ffn_hidden: 128\n  zzzzzz: 1"))
    err = expect_error(path, 12, "model.zzzzzz", f"unknown key (allowed: {MODEL_KEYS})")
    assert "did you mean" not in str(err)


@pytest.mark.parametrize("line, old, new, key, fragments", [
    (7, "  n_layers: 4", "  n_layers: four", "model.n_layers",
     ("expected an integer, got a string 'four'", "allowed: a positive integer")),
    (20, "  knum: 8", "  knum: true", "memory.knum", ("expected an integer, got a boolean True", "allowed: a positive integer")),
    (6, "  d_model: 64", "  d_model: 64.0", "model.d_model", ("expected an integer, got a number 64.0", "allowed: a positive integer")),
    (6, "  d_model: 64", '  d_model: "64"', "model.d_model", ("expected an integer, got a string '64'",)),
    (3, "seed: 0", "seed: [0]", "seed", ("expected an integer, got a list", "allowed: an integer >= 0")),
    (16, "  tie_embeddings: true", '  tie_embeddings: "yes"', "model.tie_embeddings",
     ("expected true or false, got a string 'yes'", "allowed: true, false")),
    (13, "  norm_eps: 1.0e-5", "  norm_eps: tiny", "model.norm_eps",
     ("expected a number, got the string 'tiny'", "allowed: a finite number > 0")),
    (14, "  rope_theta: 10000.0", "  rope_theta: true", "model.rope_theta", ("expected a number, got a boolean", "allowed: a finite number > 0")),
    (13, "  norm_eps: 1.0e-5", "  norm_eps: .nan", "model.norm_eps", ("nan is not allowed", "allowed: a finite number > 0")),
    (13, "  norm_eps: 1.0e-5", "  norm_eps: -1.0e-5", "model.norm_eps", ("-1e-05 is not allowed", "allowed: a finite number > 0")),
    (1, "name: ultramem-tiny", "name: 42", "name", ("expected a non-empty string, got an integer 42", "allowed: a non-empty string")),
    (2, "dtype: float32", "dtype: float64", "dtype", ("'float64' is not allowed", "allowed: float32, float16, bfloat16")),
    (10, "  ffn: swiglu", "  ffn: relu", "model.ffn", ("'relu' is not allowed", "allowed: swiglu, gelu")),
    (3, "seed: 0", "seed: " + "9" * 30, "seed", ("is too large", "below 2**63")),
])
def test_wrong_type(tmp_path, line, old, new, key, fragments):
    expect_error(write(tmp_path, (line, old, new)), line, key, *fragments)


def test_section_not_a_mapping(tmp_path):
    drop_model_body = [(n, TINY.splitlines()[n - 1], "") for n in range(5, 17)]
    path = write(tmp_path, (4, "model:", "model: 3"), *drop_model_body)
    expect_error(path, 4, "model", "expected a mapping with keys vocab_size", "got an integer")


@pytest.mark.parametrize("line, old, section_line, key, required", [
    (20, "  knum: 8", 17, "memory", "missing required key 'knum' (required: kind, units, knum, kdim, vdim, topm)"),
    (5, "  vocab_size: 512", 4, "model", "missing required key 'vocab_size' (required: vocab_size, d_model, n_layers, n_heads, ffn_hidden)"),
])
def test_missing_required_key(tmp_path, line, old, section_line, key, required):
    expect_error(write(tmp_path, (line, old, "")), section_line, key, required)


def test_missing_section(tmp_path):
    path = write(tmp_path, *[(n, TINY.splitlines()[n - 1], "") for n in range(17, 35)])
    expect_error(path, 1, "", "missing required key 'memory' (required: model, memory)")


# ---------------------------------------------------------------- sizes and cross-field rules


@pytest.mark.parametrize("line, old, new, key, fragments", [
    (22, "  vdim: 32", "  vdim: 0", "memory.vdim", ("0 is too small (allowed: a positive integer",)),
    (7, "  n_layers: 4", "  n_layers: -1", "model.n_layers", ("-1 is too small (allowed: a positive integer",)),
    (5, "  vocab_size: 512", "  vocab_size: 0", "model.vocab_size", ("0 is too small (allowed: a positive integer",)),
    (23, "  topm: 6", "  topm: -3", "memory.topm", ("-3 is too small (allowed: a positive integer",)),
    (3, "seed: 0", "seed: -1", "seed", ("-1 is too small (allowed: an integer >= 0",)),
    (29, "  query_conv: 3", "  query_conv: 0", "memory.query_conv", ("0 is too small (allowed: a positive integer",)),
])
def test_negative_and_zero_sizes(tmp_path, line, old, new, key, fragments):
    expect_error(write(tmp_path, (line, old, new)), line, key, *fragments)


def test_topm_above_keys_per_side(tmp_path):
    # keys per side = sqrt(value_expansion 4) * knum 8 = 16
    path = write(tmp_path, (23, "  topm: 6", "  topm: 17"))
    expect_error(path, 23, "memory.topm", "17 exceeds the keys per side sqrt(value_expansion)*knum = 16", "(allowed: 1..16)")


def test_topm_equal_to_keys_per_side_is_accepted(tmp_path):
    assert load_spec(write(tmp_path, (23, "  topm: 6", "  topm: 16"))).memory.topm == 16


def test_unit_index_out_of_range(tmp_path):
    path = write(tmp_path, (19, '  units: "0:1/2:3"', '  units: "0:1/2:4"'))
    expect_error(path, 19, "memory.units", "unit 1 (2:4): block 4 is out of range", "(allowed: 0..3 for n_layers 4)")


def test_unit_read_after_write(tmp_path):
    path = write(tmp_path, (19, '  units: "0:1/2:3"', '  units: "0:1/3:2"'))
    expect_error(path, 19, "memory.units", "unit 1 (3:2): read 3 is after write 2", "(allowed: read <= write)")


@pytest.mark.parametrize("units, shown", [
    ('"0-1/2:3"', "'0-1'"),
    ('"0:1/2:3:4"', "'2:3:4'"),
    ('"0:1/"', "''"),
    ('"a:b"', "'a:b'"),
    ('"-1:2"', "'-1:2'"),
    ('"²:3"', "'²:3'"),  # a Unicode digit that int() rejects
])
def test_malformed_unit_string(tmp_path, units, shown):
    path = write(tmp_path, (19, '  units: "0:1/2:3"', f"  units: {units}"))
    expect_error(path, 19, "memory.units", f"{shown} is not a unit", '(allowed: "read:write" with 0-based block indices, e.g. "2:5")')


def test_malformed_unit_in_a_list_points_at_its_own_line(tmp_path):
    path = write(tmp_path, (19, '  units: "0:1/2:3"', '  units:\n    - "0:1"\n    - "2;3"'))
    expect_error(path, 21, "memory.units.1", "'2;3' is not a unit", "(allowed: \"read:write\"")


def test_unquoted_unit_read_as_base_60_says_to_quote_it(tmp_path):
    path = write(tmp_path, (19, '  units: "0:1/2:3"', "  units: 2:3"))  # YAML 1.1: 2*60 + 3 = 123
    expect_error(path, 19, "memory.units", "got an integer", "quote it")


def test_no_units(tmp_path):
    path = write(tmp_path, (19, '  units: "0:1/2:3"', "  units: []"))
    expect_error(path, 19, "memory.units", "no memory units given (allowed: one or more")


def test_heads_must_divide_d_model(tmp_path):
    path = write(tmp_path, (8, "  n_heads: 4", "  n_heads: 5"))
    expect_error(path, 8, "model.n_heads", "5 heads do not divide d_model 64", "(allowed: divisors of d_model)")


def test_head_width_must_be_even(tmp_path):
    path = write(tmp_path, (8, "  n_heads: 4", "  n_heads: 64"))
    expect_error(path, 8, "model.n_heads", "head width d_model/n_heads = 1 is odd", "(allowed: even")


@pytest.mark.parametrize("kv", [3, 8])
def test_kv_heads_must_divide_heads(tmp_path, kv):
    path = write(tmp_path, (9, "  n_kv_heads: 2", f"  n_kv_heads: {kv}"))
    expect_error(path, 9, "model.n_kv_heads", f"{kv} does not divide n_heads 4", "(allowed: divisors of n_heads)")


def test_vdim_must_be_divisible_by_cores(tmp_path):
    path = write(tmp_path, (22, "  vdim: 32", "  vdim: 33"))
    expect_error(path, 22, "memory.vdim", "33 is not divisible by cores 2", "(allowed: multiples of cores)")


@pytest.mark.parametrize("expansion", [2, 3, 8, 15])
def test_value_expansion_must_be_a_perfect_square(tmp_path, expansion):
    path = write(tmp_path, (28, "  value_expansion: 4", f"  value_expansion: {expansion}"))
    expect_error(path, 28, "memory.value_expansion", f"{expansion} is not a perfect square (allowed: 1, 4, 9, 16, ...)")


def test_pkm_needs_even_kdim(tmp_path):
    path = write(tmp_path, (18, "  kind: ultramem", "  kind: pkm"), (21, "  kdim: 16", "  kdim: 15"))
    expect_error(path, 21, "memory.kdim", "15 is odd", "(allowed for pkm: even")


def test_pkm_needs_tucker_rank_1(tmp_path):
    path = write(tmp_path, (18, "  kind: ultramem", "  kind: pkm"))  # tucker_rank stays 2 on line 26
    expect_error(path, 26, "memory.tucker_rank", "2 is not allowed for kind pkm", "(allowed: 1;")


def test_pkm_needs_one_core(tmp_path):
    path = write(tmp_path, (18, "  kind: ultramem", "  kind: pkm"), (26, "  tucker_rank: 2", "  tucker_rank: 1"))
    expect_error(path, 27, "memory.cores", "2 is not allowed for kind pkm", "(allowed: 1;")


def test_no_output_projection_needs_vdim_equal_d_model(tmp_path):
    path = write(tmp_path, (28, "  value_expansion: 4", "  value_expansion: 1"),
                 (33, "  output_projection: true", "  output_projection: false"))
    expect_error(path, 33, "memory.output_projection", "vdim == d_model 64", "vdim 32",
                 "(allowed: true, or false with value_expansion 1 and vdim 64)")


def test_no_output_projection_needs_no_value_expansion(tmp_path):
    path = write(tmp_path, (22, "  vdim: 32", "  vdim: 64"), (33, "  output_projection: true", "  output_projection: false"))
    expect_error(path, 33, "memory.output_projection", "value_expansion 4", "(allowed: true, or false with value_expansion 1")


def test_no_output_projection_with_vdim_equal_d_model_is_accepted(tmp_path):
    path = write(tmp_path, (22, "  vdim: 32", "  vdim: 64"), (28, "  value_expansion: 4", "  value_expansion: 1"),
                 (33, "  output_projection: true", "  output_projection: false"))
    spec = load_spec(path)
    assert (spec.memory.output_projection, spec.memory.vdim) == (False, 64)


# ---------------------------------------------------------------- whole-file problems


@pytest.mark.parametrize("text", ["", "   \n\t\n  \n"])
def test_empty_or_whitespace_file(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    expect_error(path, 1, "", "the file is empty", "expected a mapping with keys model and memory")


def test_comment_only_file(tmp_path):
    path = tmp_path / "comments.yaml"
    path.write_text("# nothing here\n# at all\n", encoding="utf-8")
    expect_error(path, 1, "", "holds no document", "expected a mapping with keys model and memory")


@pytest.mark.parametrize("text, line, kind", [
    ("- model\n- memory\n", 1, "a list"),
    ("# a comment first\n- model\n", 2, "a list"),
    ("just a string\n", 1, "a string"),
    ("\n\n42\n", 3, "an integer"),
])
def test_document_not_a_mapping(tmp_path, text, line, kind):
    path = tmp_path / "notmap.yaml"
    path.write_text(text, encoding="utf-8")
    expect_error(path, line, "", f"the document is {kind}, expected a mapping with keys model and memory")


def test_yaml_syntax_error_names_its_line(tmp_path):
    path = write(tmp_path, (10, "  ffn: swiglu", "  ffn: swiglu: gelu"))
    expect_error(path, 10, "", "YAML syntax error", "mapping values are not allowed here")


def test_yaml_syntax_error_in_a_flow_list(tmp_path):
    path = write(tmp_path, (19, '  units: "0:1/2:3"', '  units: ["0:1", "2:3"}'))
    expect_error(path, 19, "", "YAML syntax error")


def test_tab_indentation_is_a_syntax_error(tmp_path):
    path = write(tmp_path, (7, "  n_layers: 4", "\tn_layers: 4"))
    expect_error(path, 7, "", "YAML syntax error", "tab")


def test_control_character_names_its_line(tmp_path):
    path = write(tmp_path, (2, "dtype: float32", "dtype: float32\x01"))
    expect_error(path, 2, "", "control character U+0001", "(allowed: printable text")


def test_duplicate_key_names_both_lines(tmp_path):
    path = write(tmp_path, (7, "  n_layers: 4", "  n_layers: 4\n  d_model: 128"))  # d_model first on line 6
    err = expect_error(path, 8, "model.d_model", "duplicate key", "first given on line 6", "each key may appear once")
    assert "line 8" not in err.problem and err.line == 8


def test_duplicate_top_level_key(tmp_path):
    path = write(tmp_path, (3, "seed: 0", "seed: 0\nname: again"))
    expect_error(path, 4, "name", "duplicate key (first given on line 1;")


def test_duplicate_key_written_quoted(tmp_path):
    path = write(tmp_path, (20, "  knum: 8", '  knum: 8\n  "knum": 9'))
    expect_error(path, 21, "memory.knum", "duplicate key (first given on line 20;")


def test_non_scalar_key(tmp_path):
    path = write(tmp_path, (3, "seed: 0", "seed: 0\n? [a, b]\n: 1"))
    expect_error(path, 4, "", "a key must be a plain name")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    expect_error(path, None, "", "cannot read the file", "No such file or directory")


def test_directory_instead_of_a_file(tmp_path):
    expect_error(tmp_path, None, "", "cannot read the file: it is a directory", "(allowed: a regular UTF-8 YAML file of at most 1 MiB)")


@contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    with within(5):
        expect_error(fifo, None, "", "cannot read the file: it is a FIFO", "(allowed: a regular UTF-8 YAML file")


def test_endless_device_is_refused_without_reading_it():
    with within(5):
        expect_error(Path("/dev/zero"), None, "", "cannot read the file: it is a character device")


@pytest.mark.parametrize("size, sparse", [(MAX_SPEC_BYTES + 1, False), (10 * 2**30, True)])
def test_file_over_one_mib_is_refused(tmp_path, size, sparse):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as file:
        if sparse:  # 10 GiB on disk as a hole: only the first MiB + 1 byte may be read
            file.truncate(size)
        else:
            file.write(TINY.encode() + b"#" * (size - len(TINY.encode())))
    with within(5):
        expect_error(path, None, "", "cannot read the file: it is larger than 1 MiB (1048576 bytes)")


def test_the_cap_itself_is_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr("umc.spec.MAX_SPEC_BYTES", len(TINY.encode()) + 10)  # parsing a whole MiB of YAML takes seconds
    path = tmp_path / "padded.yaml"
    path.write_bytes(TINY.encode() + b"#" * 10)
    assert load_spec(path).name == "ultramem-tiny"
    path.write_bytes(TINY.encode() + b"#" * 11)
    expect_error(path, None, "", "cannot read the file: it is larger than")


def test_crlf_file_keeps_its_line_numbers(tmp_path):
    path = tmp_path / "crlf.yaml"
    path.write_bytes(TINY.replace("  n_heads: 4", "  n_heads: 5").replace("\n", "\r\n").encode())
    expect_error(path, 8, "model.n_heads", "5 heads do not divide d_model 64")


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(TINY.replace("ultramem-tiny", "caf\xe9").encode("latin-1"))
    expect_error(path, None, "", "cannot read the file", "utf-8")


def test_path_with_a_nul_byte():
    with pytest.raises(SpecError) as info:
        load_spec("bad\0name.yaml")
    assert "cannot read the file" in str(info.value)


@pytest.mark.parametrize("payload", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:subprocess.call [['touch', '{marker}']]",
    "!!python/name:os.system",
    "!!python/object/new:os.system ['touch {marker}']",
    "!custom_tag 0",
])
def test_yaml_tags_are_refused_and_never_run(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = write(tmp_path, (3, "seed: 0", "seed: " + payload.format(marker=marker)))
    expect_error(path, 3, "", "unsupported YAML value", "(allowed: plain strings, numbers, booleans, null, lists and mappings; no tags)")
    assert not marker.exists()


@pytest.mark.parametrize("line, old, new", [
    (1, "name: ultramem-tiny", "name: 2001-02-30"),  # a timestamp that is no date
    (3, "seed: 0", "seed: !!int zero"),
    (3, "seed: 0", "seed: !!int"),  # empty: PyYAML itself raises IndexError
    (14, "  rope_theta: 10000.0", "  rope_theta: !!float"),
    (13, "  norm_eps: 1.0e-5", "  norm_eps: !!float small"),
    (16, "  tie_embeddings: true", "  tie_embeddings: !!bool maybe"),
    (3, "seed: 0", "seed: " + "7" * 5000),  # beyond Python's int() digit limit
])
def test_values_yaml_cannot_build(tmp_path, line, old, new):
    expect_error(write(tmp_path, (line, old, new)), line, "", "unsupported YAML value")


@pytest.mark.parametrize("line, old, new, key, fragment", [
    (6, "  d_model: 64", "  d_model: 1:04", "model.d_model", "1:04 is a YAML 1.1 base-60 number (64)"),
    (6, "  d_model: 64", "  d_model: 0x40", "model.d_model", "0x40 is a hexadecimal number (64)"),
    (6, "  d_model: 64", "  d_model: 0100", "model.d_model", "0100 is an octal number (64)"),
    (6, "  d_model: 64", "  d_model: !!int 0o100", "model.d_model", "0o100 is an octal number (64)"),
    (6, "  d_model: 64", "  d_model: 0b1000000", "model.d_model", "0b1000000 is a binary number (64)"),
    (5, "  vocab_size: 512", "  vocab_size: 1_024", "model.vocab_size", "1_024 is a number with underscores (1024)"),
    (5, "  vocab_size: 512", "  vocab_size: +0x200", "model.vocab_size", "+0x200 is a hexadecimal number (512)"),
    (3, "seed: 0", "seed: 00", "seed", "00 is an octal number (0)"),
    (3, "seed: 0", "seed: 1:00:00", "seed", "1:00:00 is a YAML 1.1 base-60 number (3600)"),
    (29, "  query_conv: 3", "  query_conv: 0x3", "memory.query_conv", "0x3 is a hexadecimal number (3)"),
    (20, "  knum: 8", "  knum: !!int \"0x8\"", "memory.knum", "0x8 is a hexadecimal number (8)"),
])
def test_integers_must_be_plain_decimal(tmp_path, line, old, new, key, fragment):
    err = expect_error(write(tmp_path, (line, old, new)), line, key, fragment, "write integers in plain decimal", "(allowed: ")
    assert "below 2**63" in str(err)


def test_yaml_1_2_octal_string_says_to_write_decimal(tmp_path):
    path = write(tmp_path, (6, "  d_model: 64", "  d_model: 0o100"))  # YAML 1.1 reads this as a string
    expect_error(path, 6, "model.d_model", "got the string '0o100' (YAML 1.1 has no 0o octal numbers)",
                 "write integers in plain decimal (allowed: a positive integer below 2**63)")


def test_non_decimal_integer_behind_an_alias_is_refused_where_it_is_used(tmp_path):
    path = write(tmp_path, (8, "  n_heads: 4", "  n_heads: &h 0x4"), (9, "  n_kv_heads: 2", "  n_kv_heads: *h"))
    expect_error(path, 8, "model.n_heads", "0x4 is a hexadecimal number (4)")


@pytest.mark.parametrize("line, old, new", [
    (6, "  d_model: 64", "  d_model: +64"),
    (3, "seed: 0", "seed: -0"),
    (6, "  d_model: 64", '  d_model: !!int "64"'),
    (13, "  norm_eps: 1.0e-5", "  norm_eps: 1e-5"),
    (14, "  rope_theta: 10000.0", "  rope_theta: 10000"),
])
def test_plain_decimal_and_floats_are_accepted(tmp_path, line, old, new):
    assert load_spec(write(tmp_path, (line, old, new))).model.d_model == 64


def test_huge_integer_norm_eps(tmp_path):
    path = write(tmp_path, (13, "  norm_eps: 1.0e-5", "  norm_eps: 1" + "0" * 400))
    expect_error(path, 13, "model.norm_eps", "is not allowed (allowed: a finite number > 0)")


def test_huge_unit_index(tmp_path):
    path = write(tmp_path, (19, '  units: "0:1/2:3"', '  units: "0:' + "1" * 5000 + '"'))
    err = expect_error(path, 19, "memory.units", "block index too large")
    assert len(str(err)) < 400


@pytest.mark.parametrize("section, line, old, new", [
    ("model", 13, "  norm_eps: 1.0e-5", "  norm_eps: 1e-5"),
    ("memory", 34, "  init: official", "  init: official\n  norm_eps: 1e-5"),
])
def test_float_without_a_dot_is_accepted(tmp_path, section, line, old, new):
    spec = load_spec(write(tmp_path, (line, old, new)))
    assert getattr(spec, section).norm_eps == 1e-5


def test_rope_theta_without_a_dot_is_accepted(tmp_path):
    spec = load_spec(write(tmp_path, (14, "  rope_theta: 10000.0", "  rope_theta: 5e5")))
    assert spec.model.rope_theta == 500000.0


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("new, fragment", [
    ('name: "two\\nlines"', "'two\\nlines' holds a control character (U+000A at position 3)"),
    ("name: |\n  two\n  lines", "holds a control character (U+000A at position 3)"),
    ('name: "carriage\\rreturn"', "holds a control character (U+000D at position 8)"),
    ('name: "\\e[31mred"', "'\\x1b[31mred' holds a control character (U+001B at position 0)"),
    ('name: "tab\\there"', "holds a control character (U+0009 at position 3)"),
    ('name: "zero\\u200bwidth"', "holds a format character (U+200B at position 4)"),
    ('name: "right\\u202eto-left"', "holds a format character (U+202E at position 5)"),
    ('name: "line\\Lsep"', "holds a line separator (U+2028 at position 4)"),
    ("name: " + "n" * 201, "a name of 201 characters is too long"),
])
def test_name_must_be_printable_text(tmp_path, new, fragment):
    path = write(tmp_path, (1, "name: ultramem-tiny", new))
    err = expect_error(path, 1, "name", fragment, "(allowed: printable text of at most 200 characters)")
    assert "\x1b" not in str(err) and "\r" not in str(err)


@pytest.mark.parametrize("name", ["n" * 200, "ultramem v1 (227M)", "модель-ü 模型", "a | b *c* `d`"])
def test_printable_names_are_accepted(tmp_path, name):
    assert load_spec(write(tmp_path, (1, "name: ultramem-tiny", f"name: {json.dumps(name)}"))).name == name


def test_name_from_a_dict_is_checked_too():
    data = load_spec(SPECS / "ultramem-tiny.yaml").to_dict()
    data["name"] = "build\n# forged heading"
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, source="spec.json")
    assert str(info.value).startswith("spec.json: name: 'build\\n# forged heading' holds a control character (U+000A")


def test_file_name_standing_in_for_a_name_is_checked(tmp_path):
    path = write(tmp_path, (1, "name: ultramem-tiny", ""), name="red\x1b[31m.yaml")
    expect_error(path, 1, "name", "no name given, and the file name cannot stand in for one", "U+001B", "add a name key")


# ---------------------------------------------------------------- sizes that cannot run


@pytest.mark.parametrize("line, old, new, key, fragments", [
    (20, "  knum: 8", "  knum: 1000000000", "memory.knum",
     ("1000000000 is too large: the weights would be 6.4e+19 parameters, more than int64 holds (9.22e+18)",)),
    (5, "  vocab_size: 512", "  vocab_size: 1000000000000", "model.vocab_size",
     ("the logits (tokens x vocab_size) of a max_seq_len forward would be 1.02e+15 bytes, more than 1 PB",)),
    (7, "  n_layers: 4", "  n_layers: 1000000000000000", "model.n_layers", ("the weights would be", "parameters, more than int64 holds")),
    (15, "  max_seq_len: 256", "  max_seq_len: 100000000", "model.max_seq_len",
     ("the attention scores (n_heads x tokens x context) of a max_seq_len forward would be 1.6e+17 bytes, more than 1 PB",)),
    (22, "  vdim: 32", "  vdim: 10000000000000", "memory.vdim", ("the weights would be",)),
])
def test_sizes_that_cannot_run(tmp_path, line, old, new, key, fragments):
    expect_error(write(tmp_path, (line, old, new)), line, key, *fragments,
                 "(allowed: sizes whose weights, KV cache and batch-1 tensors at max_seq_len stay within int64 elements and 1 PB)")


def test_grids_too_large_blame_topm(tmp_path):
    # the weights stay under 1 PB (2 units x 10**12 rows x 32 floats = 256 TB), but one max_seq_len
    # forward would build 256 tokens x 2 heads x 2 cores x (2 * 10**6)**2 grid entries (16 PB in float32)
    path = write(tmp_path, (20, "  knum: 8", "  knum: 1000000"), (23, "  topm: 6", "  topm: 2000000"))
    expect_error(path, 23, "memory.topm", "2000000 is too large: the memory grids (tokens x heads x cores x topm x topm)",
                 "more than 1 PB")


def test_size_rule_applies_to_dicts_and_names_a_defaulted_field():
    data = load_spec(SPECS / "ultramem-tiny.yaml").to_dict()
    del data["model"]["max_seq_len"]  # default 2048
    data["model"]["vocab_size"] = 10**12
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, source="spec.json")
    assert (info.value.line, info.value.key) == (None, "model.vocab_size")
    assert "8.19e+15 bytes, more than 1 PB" in str(info.value)


def test_largest_shipped_spec_is_within_the_size_rule():
    spec = load_spec(SPECS / "ultramem-1.6b-x12.yaml")
    assert memory_needs(spec).weight_bytes < 50 * 10**9


def test_spec_from_dict_errors_have_no_line():
    with pytest.raises(SpecError) as info:
        spec_from_dict({"model": {}, "memory": {}}, source="built")
    assert (info.value.source, info.value.line, info.value.key) == ("built", None, "model")
    assert str(info.value).startswith("built: model: missing required key 'vocab_size'")


def test_parse_spec_names_its_source():
    with pytest.raises(SpecError) as info:
        parse_spec(TINY.replace("  n_heads: 4", "  n_heads: 5"), source="inline")
    assert str(info.value).startswith("inline:8: model.n_heads: ")


# ---------------------------------------------------------------- the CLI and the shipped specs


def test_cli_check_reports_a_bad_spec_with_exit_2(tmp_path):
    path = write(tmp_path, (23, "  topm: 6", "  topm: 17"))
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 2, result.output
    assert f"error: {path}:23: memory.topm: 17 exceeds the keys per side" in result.stderr
    assert "(allowed: 1..16)" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("text", ["", "- a list\n", "seed: !!python/object/apply:os.system ['true']\n", "a: [\n"])
def test_cli_check_bad_files_exit_2_without_traceback(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}:")
    assert "Traceback" not in result.output


def test_cli_check_missing_file_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["check", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "cannot read the file" in result.stderr
    assert "Traceback" not in result.output


def test_cli_check_json_on_a_valid_spec():
    result = CliRunner().invoke(main, ["check", "--json", str(SPECS / "ultramem-tiny.yaml")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"spec", "cost", "memory"}
    assert set(data["spec"]) == {"name", "dtype", "seed", "model", "memory"}
    assert data["spec"]["name"] == "ultramem-tiny"
    assert data["spec"]["memory"]["units"] == ["0:1", "2:3"]
    assert data["spec"]["model"]["n_kv_heads"] == 2
    assert {"params_total", "flops_per_token", "units"} <= set(data["cost"])
    assert len(data["cost"]["units"]) == 2
    needs = memory_needs(load_spec(SPECS / "ultramem-tiny.yaml"))
    assert data["memory"] == {**needs.__dict__, "weight_bytes": needs.weight_bytes}
    assert data["memory"]["kv_cache_bytes"] == 2 * 4 * 2 * 256 * 16 * 4  # K and V, 4 blocks, 2 kv heads, 256 x 16, f32


def test_cli_check_prints_the_memory_a_run_needs():
    result = CliRunner().invoke(main, ["check", str(SPECS / "ultramem-1.6b-x12.yaml")])
    assert result.exit_code == 0, result.output
    assert "43.5 GB  weights (dense 3.5 GB, value tables 39.4 GB, shuffle indices 615.2 MB)" in result.stdout
    assert "553.6 MB  KV cache at max_seq_len 2048, batch 1" in result.stdout
    assert "working set of a 2048-token prefill (" in result.stdout


SHIPPED = sorted(SPECS.rglob("*.yaml"))


def test_there_are_shipped_specs():
    assert len(SHIPPED) >= 15 and any(p.parent.name == "ablation" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(SPECS)))
def test_every_shipped_spec_loads(path):
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.source == str(path)
    assert spec_from_dict(spec.to_dict(), source=str(path)) == spec
