"""Declarative model specs: YAML in, frozen typed records out, every user mistake a SpecError.

A spec describes one UltraMem (or PKM) decoder language model (DESIGN.md §2). The
loader reads YAML safely, twice: ``yaml.compose`` with the SafeLoader gives the node
tree (line numbers, duplicate keys), ``yaml.safe_load`` builds the values (tags such
as ``!!python/...`` are refused, never run). Validation is table-driven:
each section lists its fields with a parser; cross-field rules follow, the last one a
size rule (weights and per-step tensors must fit int64 and 1 PB). Files are read only if
regular and small, so a FIFO, a device or a huge file is one error line, never a hang.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import reprlib
import stat
import unicodedata
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from umc import cost
from umc.dtypes import SPEC_DTYPES

DTYPES = SPEC_DTYPES  # the name tests and older callers import
INT_MAX = 2**63 - 1  # every size and the seed must fit an int64 (torch shapes, generator seeds)
BYTE_LIMIT = 10**15  # 1 PB: no weights or tensor of a runnable model is larger
MAX_SPEC_BYTES = 2**20  # a spec is a few hundred bytes; a file past 1 MiB is the wrong file
NAME_MAX = 200  # characters of a spec name (it lands in terminals, file headers, Markdown tables)


class SpecError(ValueError):
    """A user mistake in a spec: names the file, line, key path, the problem and what is allowed."""

    def __init__(self, source: str, line: int | None, key: str, problem: str):
        self.source, self.line, self.key, self.problem = source, line, key, problem
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


@dataclass(frozen=True)
class MemoryUnit:
    """A memory unit reads the normed FFN input of block ``read`` and adds to the residual after block ``write``."""

    read: int
    write: int

    def __str__(self) -> str:
        return f"{self.read}:{self.write}"


@dataclass(frozen=True)
class ModelSpec:
    """The dense decoder around the memory layers."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: str
    ffn_hidden: int
    norm: str
    norm_eps: float
    rope_theta: float
    max_seq_len: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class MemorySpec:
    """One memory-layer configuration shared by all units (DESIGN.md §2.1 for ultramem, §2.2 for pkm)."""

    kind: str
    units: tuple[MemoryUnit, ...]
    knum: int
    kdim: int
    vdim: int
    topm: int
    heads: int
    share_query: bool
    tucker_rank: int
    cores: int
    value_expansion: int
    query_conv: int | None
    score_activation: str
    query_norm: str
    key_norm: str
    output_projection: bool
    norm_eps: float
    init: str

    @property
    def keys_per_side(self) -> int:
        """n = sqrt(E) * knum keys on each side of the product grid."""
        return math.isqrt(self.value_expansion) * self.knum

    @property
    def physical_values(self) -> int:
        """N = knum^2 rows in the physical value table."""
        return self.knum * self.knum

    @property
    def virtual_values(self) -> int:
        """E * N addressable (virtual) values after implicit value expansion."""
        return self.value_expansion * self.physical_values

    @property
    def side_dim(self) -> int:
        """Query/key width on one side: kdim for ultramem, kdim/2 for pkm (DESIGN.md §2.2)."""
        return self.kdim // 2 if self.kind == "pkm" else self.kdim

    @property
    def query_heads(self) -> int:
        """Number of distinct queries: 1 when heads share one query."""
        return 1 if self.share_query else self.heads

    @property
    def has_shuffle(self) -> bool:
        """The authors' layer always carries a shuffle permutation; pkm only needs one for IVE."""
        return self.kind == "ultramem" or self.value_expansion > 1


@dataclass(frozen=True)
class Spec:
    """A whole validated model spec."""

    name: str
    dtype: str
    seed: int
    model: ModelSpec
    memory: MemorySpec
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (units as "read:write" strings), without the source path."""
        data = asdict(self)
        data.pop("source")
        data["memory"]["units"] = [str(u) for u in self.memory.units]
        return data


# ---------------------------------------------------------------- YAML with line numbers


class _Document:
    """Parsed data plus where each key path sits in the file and, for YAML, the scalar node it was read from.

    ``names`` renames path elements in messages: a memory layer given as the authors' config
    (umc.official) is checked by the spec's own rules, and its errors name the authors' keys.
    """

    def __init__(self, source: str, data: Any, lines: dict[tuple, int],
                 scalars: dict[tuple, yaml.ScalarNode] | None = None, names: Mapping[str, str] | None = None):
        self.source, self.data, self.lines = source, data, lines
        self.scalars, self.names = scalars or {}, names or {}

    def name(self, key: Any) -> str:
        """How messages call a key (a field name, a section, a list index)."""
        return str(self.names.get(key, key)) if isinstance(key, str) else str(key)

    def line_of(self, path: tuple) -> int | None:
        """Line of the deepest known prefix of ``path`` (1-based)."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None

    def error(self, path: tuple, problem: str) -> SpecError:
        """A SpecError located at ``path``."""
        return SpecError(self.source, self.line_of(path), ".".join(self.name(p) for p in path), problem)


def _index_lines(source: str, root: yaml.Node) -> tuple[dict[tuple, int], dict[tuple, yaml.ScalarNode]]:
    """Map key paths to 1-based lines and to their scalar nodes (the text as written); reject duplicate
    and non-scalar keys."""
    lines: dict[tuple, int] = {(): root.start_mark.line + 1}
    scalars: dict[tuple, yaml.ScalarNode] = {}
    seen: set[int] = set()
    stack: list[tuple[tuple, yaml.Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            scalars[path] = node
        if id(node) in seen:  # an alias: already indexed where it was defined
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys_here: dict[Any, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    raise SpecError(source, line, ".".join(map(str, path)), "a key must be a plain name, not a mapping or list")
                key = key_node.value
                if key in keys_here:
                    raise SpecError(
                        source, line, ".".join(map(str, path + (key,))),
                        f"duplicate key (first given on line {keys_here[key]}; each key may appear once)",
                    )
                keys_here[key] = line
                lines[path + (key,)] = line
                stack.append((path + (key,), value_node))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                stack.append((path + (i,), item))
    return lines, scalars


_BUILD_ERRORS = (ValueError, TypeError, LookupError, AttributeError, ArithmeticError)  # LookupError: empty !!int


def _unbuildable_value(root: yaml.Node) -> tuple[yaml.Node, Exception] | None:
    """The first scalar (in document order) that yaml.safe_load cannot build, e.g. 2001-02-30, ``!!int abc``,
    an empty ``!!int``, a 5000-digit integer; each is re-read alone with yaml.safe_load."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                yaml.safe_load(yaml.serialize(node))
            except _BUILD_ERRORS as exc:
                return node, exc
        elif isinstance(node, yaml.MappingNode):
            stack.extend(reversed([n for pair in node.value for n in pair]))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    return None


def _clip(text: str | None, limit: int = 200) -> str:
    """PyYAML quotes the offending text (an alias name, a tag) in full: keep messages one short line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _yaml_error(source: str, text: str, exc: yaml.YAMLError) -> SpecError:
    """The SpecError for a YAML error, at the line PyYAML points to."""
    if isinstance(exc, yaml.constructor.ConstructorError):
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        return SpecError(source, line, "", f"unsupported YAML value: {_clip(exc.problem)} "
                         "(allowed: plain strings, numbers, booleans, null, lists and mappings; no tags)")
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        return SpecError(source, line, "", f"YAML syntax error: {_clip(exc.problem or exc.context)}")
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: position is an offset into the text
        line = text.count("\n", 0, exc.position) + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        return SpecError(source, line, "", f"control character {char} is not allowed in YAML (allowed: printable text, tabs, newlines)")
    return SpecError(source, None, "", f"YAML error: {_clip(str(exc))}")


def _load(source: str, text: str) -> tuple[yaml.Node | None, tuple[dict, dict], Any]:
    """Compose the node tree with SafeLoader (line and scalar index, duplicate keys), then build the values
    with yaml.safe_load."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)  # raises ReaderError on a control character
    if root is None:
        return None, ({}, {}), None
    index = _index_lines(source, root)
    try:
        return root, index, yaml.safe_load(text)
    except _BUILD_ERRORS as exc:
        node, cause = _unbuildable_value(root) or (root, exc)
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        problem = f"cannot read {tag} value {_show(node.value)}: {cause}"
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _parse_yaml(source: str, text: str) -> _Document:
    """Safely parse YAML text into data and a line index, or raise SpecError."""
    if not text.strip():
        raise SpecError(source, 1, "", "the file is empty (expected a mapping with keys model and memory)")
    try:
        root, (lines, scalars), data = _load(source, text)
    except yaml.YAMLError as exc:
        raise _yaml_error(source, text, exc) from None
    except RecursionError:
        raise SpecError(source, None, "", "YAML nesting is too deep") from None
    if root is None or data is None:
        raise SpecError(source, lines.get((), 1), "", "the file holds no document (expected a mapping with keys model and memory)")
    if not isinstance(data, dict):
        raise SpecError(source, lines[()], "", f"the document is {_type_name(data)}, expected a mapping with keys model and memory")
    return _Document(source, data, lines, scalars)


# ---------------------------------------------------------------- field parsers

Parser = Callable[[_Document, tuple, Any], Any]
REQUIRED = object()


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxset, _SHORT.maxtuple = 2, 4, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def _show(value: Any) -> str:
    """A bounded repr for messages: a billion-laughs alias bomb or a huge number stays one short line."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int beyond Python's str() digit limit
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else f"<{_type_name(value)}>"


_YAML_INT = "tag:yaml.org,2002:int"
_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_NOTATIONS = (  # integers YAML 1.1 reads that are not plain decimal: what each is called, first match wins
    (re.compile(r".*:"), "a YAML 1.1 base-60 number"),
    (re.compile(r"[-+]?0[xX]"), "a hexadecimal number"),
    (re.compile(r"[-+]?0[bB]"), "a binary number"),
    (re.compile(r"[-+]?0[oO0-7_]"), "an octal number"),
    (re.compile(r".*_"), "a number with underscores"),
)
_YAML12_OCTAL = re.compile(r"[-+]?0[oO][0-7_]+")  # YAML 1.2 octal: a string to YAML 1.1


def _notation(text: str) -> str:
    """What a YAML integer written ``text`` is, e.g. 'a hexadecimal number' for 0x40."""
    return next((name for pattern, name in _NOTATIONS if pattern.match(text)), "not plain decimal")


def _non_decimal(doc: _Document, path: tuple, value: int) -> str | None:
    """The problem when the integer at ``path`` was not written in plain decimal (YAML 1.1 reads
    1:04, 0x40, 0100, 0b1000000 and 1_000 as integers too). Data not read from YAML has no text to check."""
    node = doc.scalars.get(path)
    if node is None or node.tag != _YAML_INT or _DECIMAL.fullmatch(node.value):
        return None
    return f"{_clip(node.value, 40)} is {_notation(node.value)} ({_show(value)}); write integers in plain decimal"


def _int(minimum: int = 1, maximum: int = INT_MAX) -> Parser:
    def parse(doc: _Document, path: tuple, value: Any) -> int:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        allowed += " below 2**63" if maximum == INT_MAX else f" and <= {maximum}"
        if isinstance(value, str) and _YAML12_OCTAL.fullmatch(value):
            raise doc.error(path, f"expected an integer, got the string {_show(value)} (YAML 1.1 has no 0o octal numbers); "
                                  f"write integers in plain decimal (allowed: {allowed})")
        if isinstance(value, bool) or not isinstance(value, int):
            raise doc.error(path, f"expected an integer, got {_type_name(value)} {_show(value)} (allowed: {allowed})")
        problem = _non_decimal(doc, path, value)
        if problem:
            raise doc.error(path, f"{problem} (allowed: {allowed})")
        if value < minimum:
            raise doc.error(path, f"{_show(value)} is too small (allowed: {allowed})")
        if value > maximum:
            raise doc.error(path, f"{_show(value)} is too large (allowed: {allowed})")
        return value
    return parse


def _positive_float(doc: _Document, path: tuple, value: Any) -> float:
    allowed = "a finite number > 0"
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise doc.error(path, f"expected a number, got the string {_show(value)} (allowed: {allowed})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise doc.error(path, f"expected a number, got {_type_name(value)} {_show(value)} (allowed: {allowed})")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number) or number <= 0:
        raise doc.error(path, f"{_show(value)} is not allowed (allowed: {allowed})")
    return number


def _bool(doc: _Document, path: tuple, value: Any) -> bool:
    if not isinstance(value, bool):
        raise doc.error(path, f"expected true or false, got {_type_name(value)} {_show(value)} (allowed: true, false)")
    return value


def _string(doc: _Document, path: tuple, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise doc.error(path, f"expected a non-empty string, got {_type_name(value)} {_show(value)} (allowed: a non-empty string)")
    return value


NAME_ALLOWED = f"printable text of at most {NAME_MAX} characters"
_UNPRINTABLE = {"Cc": "a control character", "Cf": "a format character", "Cs": "a lone surrogate",
                "Zl": "a line separator", "Zp": "a paragraph separator"}


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a model: it is printed in terminals and Markdown reports, where a newline,
    an escape sequence or an invisible format character would forge or hide output."""
    if len(name) > NAME_MAX:
        return f"a name of {len(name)} characters is too long"
    for position, char in enumerate(name):
        kind = _UNPRINTABLE.get(unicodedata.category(char))
        if kind:
            return f"{_show(name)} holds {kind} (U+{ord(char):04X} at position {position})"
    return None


def _name(doc: _Document, path: tuple, value: Any) -> str:
    """A spec's name: a non-empty string of printable text."""
    problem = _name_problem(_string(doc, path, value))
    if problem:
        raise doc.error(path, f"{problem} (allowed: {NAME_ALLOWED})")
    return value


def _choice(*choices: str) -> Parser:
    def parse(doc: _Document, path: tuple, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise doc.error(path, f"{_show(value)} is not allowed (allowed: {', '.join(choices)})")
        return value
    return parse


def _optional(inner: Parser) -> Parser:
    def parse(doc: _Document, path: tuple, value: Any) -> Any:
        return None if value is None else inner(doc, path, value)
    return parse


_UNIT = re.compile(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*")  # ASCII digits only: int() rejects some Unicode digits
_UNIT_ALLOWED = '(allowed: "read:write" with 0-based block indices, e.g. "2:5")'


def _unit_hint(value: Any) -> str:
    """YAML 1.1 reads an unquoted 2:5 as the base-60 integer 125: say so."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "; quote it: YAML reads an unquoted 2:5 as the base-60 number 125"
    return ""


def _units(doc: _Document, path: tuple, value: Any) -> tuple[MemoryUnit, ...]:
    """Units as "2:5/6:9" or as a list of "read:write" strings."""
    if isinstance(value, str):
        items = [(path, part.strip()) for part in value.split("/")]
    elif isinstance(value, list):
        items = [(path + (i,), item) for i, item in enumerate(value)]
    else:
        raise doc.error(path, f'expected "read:write" strings, e.g. "2:5/6:9" or ["2:5", "6:9"], '
                              f'got {_type_name(value)}{_unit_hint(value)}')
    if not items:
        raise doc.error(path, 'no memory units given (allowed: one or more "read:write" strings)')
    units = []
    for item_path, item in items:
        match = _UNIT.fullmatch(item) if isinstance(item, str) else None
        if match is None:
            raise doc.error(item_path, f"{_show(item)} is not a unit{_unit_hint(item)} {_UNIT_ALLOWED}")
        if any(len(index.lstrip("0")) > 18 for index in match.groups()):  # also keeps int() under its digit limit
            raise doc.error(item_path, f"{_show(item)}: block index too large (allowed: 0-based block indices below n_layers)")
        units.append(MemoryUnit(int(match[1]), int(match[2])))
    return tuple(units)


TOP_FIELDS: dict[str, tuple[Parser, Any]] = {
    "name": (_name, None),
    "dtype": (_choice(*DTYPES), "float32"),
    "seed": (_int(0), 0),
    "model": (None, REQUIRED),
    "memory": (None, REQUIRED),
}

MODEL_FIELDS: dict[str, tuple[Parser, Any]] = {
    "vocab_size": (_int(), REQUIRED),
    "d_model": (_int(), REQUIRED),
    "n_layers": (_int(), REQUIRED),
    "n_heads": (_int(), REQUIRED),
    "n_kv_heads": (_optional(_int()), None),
    "ffn": (_choice("swiglu", "gelu"), "swiglu"),
    "ffn_hidden": (_int(), REQUIRED),
    "norm": (_choice("rmsnorm", "layernorm"), "rmsnorm"),
    "norm_eps": (_positive_float, 1e-5),
    "rope_theta": (_positive_float, 10000.0),
    "max_seq_len": (_int(), 2048),
    "tie_embeddings": (_bool, True),
}

MEMORY_FIELDS: dict[str, tuple[Parser, Any]] = {
    "kind": (_choice("ultramem", "pkm"), REQUIRED),
    "units": (_units, REQUIRED),
    "knum": (_int(), REQUIRED),
    "kdim": (_int(), REQUIRED),
    "vdim": (_int(), REQUIRED),
    "topm": (_int(), REQUIRED),
    "heads": (_int(), 1),
    "share_query": (_bool, True),
    "tucker_rank": (_int(), 1),
    "cores": (_int(), 1),
    "value_expansion": (_int(), 1),
    "query_conv": (_optional(_int()), None),
    "score_activation": (_choice("none", "softmax", "relu"), "none"),
    "query_norm": (_choice("none", "layernorm", "layernorm_bias"), "layernorm"),
    "key_norm": (_choice("none", "layernorm"), "layernorm"),
    "output_projection": (_bool, True),
    "norm_eps": (_positive_float, 1e-5),
    "init": (_choice("official", "improved"), "official"),
}


def _fields(doc: _Document, path: tuple, section: Any, table: dict[str, tuple[Parser, Any]]) -> dict[str, Any]:
    """Parse one mapping against its field table: unknown keys, missing keys, per-field parsers."""
    if not isinstance(section, dict):
        raise doc.error(path, f"expected a mapping with keys {', '.join(table)}, got {_type_name(section)}")
    for key in section:
        if key not in table:
            close = difflib.get_close_matches(str(key), list(table), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise doc.error(path + (key,), f"unknown key ({hint}allowed: {', '.join(table)})")
    out = {}
    for key, (parser, default) in table.items():
        if key not in section:
            if default is REQUIRED:
                required = [k for k, (_, d) in table.items() if d is REQUIRED]
                raise doc.error(path, f"missing required key {key!r} (required: {', '.join(required)})")
            out[key] = default
        elif parser is None:
            out[key] = section[key]
        else:
            out[key] = parser(doc, path + (key,), section[key])
    return out


# ---------------------------------------------------------------- cross-field rules


def _check_model(doc: _Document, m: dict[str, Any]) -> ModelSpec:
    p = ("model",)
    if m["n_kv_heads"] is None:
        m["n_kv_heads"] = m["n_heads"]
    if m["d_model"] % m["n_heads"]:
        raise doc.error(p + ("n_heads",), f"{m['n_heads']} heads do not divide d_model {m['d_model']} (allowed: divisors of d_model)")
    if (m["d_model"] // m["n_heads"]) % 2:
        raise doc.error(p + ("n_heads",), f"head width d_model/n_heads = {m['d_model'] // m['n_heads']} is odd (allowed: even, RoPE rotates pairs)")
    if m["n_heads"] % m["n_kv_heads"]:
        raise doc.error(p + ("n_kv_heads",), f"{m['n_kv_heads']} does not divide n_heads {m['n_heads']} (allowed: divisors of n_heads)")
    return ModelSpec(**m)


def _check_memory(doc: _Document, mem: dict[str, Any], n_layers: int, d_model: int) -> MemorySpec:
    """Rules between memory fields, and against the model's block count and width."""
    p, name = ("memory",), doc.name
    for i, unit in enumerate(mem["units"]):
        if unit.read > unit.write:
            raise doc.error(p + ("units",), f"unit {i} ({unit}): read {unit.read} is after write {unit.write} (allowed: read <= write)")
        if unit.write >= n_layers:
            raise doc.error(p + ("units",), f"unit {i} ({unit}): block {unit.write} is out of range (allowed: 0..{n_layers - 1} for n_layers {n_layers})")
    expansion = mem["value_expansion"]
    if math.isqrt(expansion) ** 2 != expansion:
        raise doc.error(p + ("value_expansion",), f"{expansion} is not a perfect square (allowed: 1, 4, 9, 16, ...)")
    if mem["vdim"] % mem["cores"]:
        raise doc.error(p + ("vdim",), f"{mem['vdim']} is not divisible by {name('cores')} {mem['cores']} (allowed: multiples of {name('cores')})")
    if mem["kind"] == "pkm":
        if mem["kdim"] % 2:
            raise doc.error(p + ("kdim",), f"{mem['kdim']} is odd (allowed for pkm: even, the query splits into two halves of kdim/2)")
        for key in ("tucker_rank", "cores"):
            if mem[key] != 1:
                raise doc.error(p + (key,), f"{mem[key]} is not allowed for kind pkm (allowed: 1; use kind ultramem for Tucker keys and multi-core scoring)")
    keys_per_side = math.isqrt(expansion) * mem["knum"]
    if mem["topm"] > keys_per_side:
        raise doc.error(p + ("topm",), f"{mem['topm']} exceeds the keys per side sqrt({name('value_expansion')})*{name('knum')} = {keys_per_side} "
                                       f"(allowed: 1..{keys_per_side})")
    if not mem["output_projection"] and (expansion != 1 or mem["vdim"] != d_model):
        raise doc.error(p + ("output_projection",), f"false needs value_expansion 1 and vdim == d_model {d_model}, got value_expansion {expansion}, vdim {mem['vdim']} "
                                                    f"(allowed: true, or false with value_expansion 1 and vdim {d_model})")
    return MemorySpec(**mem)


# ---------------------------------------------------------------- the size rule

# fields that multiply into the sizes the rule bounds, in the order blame is given on a tie
SIZE_FIELDS = (("memory", "knum"), ("memory", "vdim"), ("memory", "value_expansion"), ("memory", "topm"),
               ("memory", "kdim"), ("memory", "heads"), ("memory", "tucker_rank"), ("memory", "cores"),
               ("memory", "query_conv"), ("memory", "units"), ("model", "vocab_size"), ("model", "max_seq_len"),
               ("model", "d_model"), ("model", "ffn_hidden"), ("model", "n_layers"), ("model", "n_heads"),
               ("model", "n_kv_heads"))


def _overflow(extent: cost.Extent) -> str | None:
    """Why ``extent`` cannot exist in a run: more than int64 counts (torch sizes, offsets) or more than 1 PB."""
    if extent.count > INT_MAX:
        return f"{_magnitude(extent.count)} {extent.unit}, more than int64 holds ({_magnitude(INT_MAX)})"
    if extent.nbytes > BYTE_LIMIT:
        return f"{_magnitude(extent.nbytes)} bytes, more than 1 PB (10**15 bytes)"
    return None


def _magnitude(count: int) -> str:
    """A huge count as 3 significant digits; sizes are products of int64 fields, so beyond float range is possible."""
    return f"{count:.3g}" if count < 10**300 else f"about 2**{count.bit_length()}"


def _one(record: Any, field: str) -> Any:
    """``record`` with ``field`` at its smallest size: 1, or only the first memory unit."""
    value = getattr(record, field)
    return replace(record, **{field: value[:1] if field == "units" else 1})


def _blame(extent: cost.Extent, without: dict[tuple, tuple[cost.Extent, ...]]) -> tuple:
    """The field most responsible for ``extent`` being too large: the one whose reset to 1 shrinks it most.

    ``without`` maps each candidate field's path to the extents recomputed with that field at 1."""
    measure = (lambda e: e.count) if extent.count > INT_MAX else (lambda e: e.nbytes)

    def shrink(path: tuple) -> Fraction:
        smaller = next(e for e in without[path] if e.what == extent.what)
        return Fraction(measure(extent), max(measure(smaller), 1))

    return max(without, key=shrink)


def _size_error(doc: _Document, path: tuple, value: Any, extent: cost.Extent, problem: str, allowed: str) -> SpecError:
    """The SpecError naming the blamed field, its value, what grows too large and the limit."""
    shown = f"{len(value)} units are too many" if path[-1] == "units" else f"{_show(value)} is too large"
    return doc.error(path, f"{shown}: {extent.what} would be {problem} (allowed: {allowed})")


def _check_size(doc: _Document, spec: Spec) -> None:
    """A spec that validates must be able to run: its weights (at most int64 parameters and 1 PB), KV cache
    and the large tensors of a batch-1 forward at max_seq_len (logits, attention scores, memory scores and
    grids, gathered value rows; each at most int64 elements and 1 PB). The error names the field most
    responsible."""
    for extent in cost.spec_extents(spec):
        problem = _overflow(extent)
        if problem:
            records = {"model": spec.model, "memory": spec.memory}
            without = {(section, field): cost.spec_extents(replace(spec, **{section: _one(records[section], field)}))
                       for section, field in SIZE_FIELDS if getattr(records[section], field) is not None}
            section, field = _blame(extent, without)
            raise _size_error(doc, (section, field), getattr(records[section], field), extent, problem,
                              "sizes whose weights, KV cache and batch-1 tensors at max_seq_len stay within int64 elements and 1 PB")


def _check_layer_size(doc: _Document, memory: MemorySpec, d_model: int, dtype: str) -> None:
    """``_check_size`` for one memory layer alone: its weights and one token's lookup tensors."""
    for extent in cost.layer_extents(memory, d_model, dtype):
        problem = _overflow(extent)
        if problem:
            without = {("memory", field): cost.layer_extents(_one(memory, field), d_model, dtype)
                       for section, field in SIZE_FIELDS if section == "memory" and getattr(memory, field) is not None}
            without[("model", "d_model")] = cost.layer_extents(memory, 1, dtype)
            path = _blame(extent, without)
            value = d_model if path[0] == "model" else getattr(memory, path[1])
            raise _size_error(doc, path, value, extent, problem,
                              "sizes whose weights and per-token lookup tensors stay within int64 elements and 1 PB")


# ---------------------------------------------------------------- entry points


def _build(doc: _Document, default_name: str) -> Spec:
    top = _fields(doc, (), doc.data, TOP_FIELDS)
    model = _check_model(doc, _fields(doc, ("model",), top["model"], MODEL_FIELDS))
    memory = _check_memory(doc, _fields(doc, ("memory",), top["memory"], MEMORY_FIELDS), model.n_layers, model.d_model)
    name = top["name"]
    if name is None:
        problem = _name_problem(default_name)
        if problem:
            raise doc.error(("name",), f"no name given, and the file name cannot stand in for one: {problem}; add a name key (allowed: {NAME_ALLOWED})")
        name = default_name
    spec = Spec(name=name, dtype=top["dtype"], seed=top["seed"], model=model, memory=memory, source=doc.source)
    _check_size(doc, spec)
    return spec


class _Refused(Exception):
    """A file that cannot be a spec (not a regular file, larger than the cap): the reason, for the SpecError."""


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _require_regular(info: os.stat_result) -> None:
    """Raise _Refused unless ``info`` is a regular file's."""
    if not stat.S_ISREG(info.st_mode):
        raise _Refused(next((f"it is {kind}" for test, kind in _FILE_KINDS if test(info.st_mode)), "it is not a regular file"))


def _read_capped(path: str | Path) -> bytes:
    """At most MAX_SPEC_BYTES + 1 bytes of a regular file. Stat before opening and open non-blocking,
    so a FIFO or a device is refused without waiting on it; check again on the open descriptor, in case
    the path changed in between."""
    _require_regular(os.stat(path))
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
        _require_regular(os.fstat(file.fileno()))
        return file.read(MAX_SPEC_BYTES + 1)


def _read_spec_text(source: str, path: str | Path) -> str:
    """The text of a spec file, newlines normalized as text mode would; SpecError if it cannot be one."""
    allowed = "a regular UTF-8 YAML file of at most 1 MiB"
    try:
        data = _read_capped(path)
        if len(data) > MAX_SPEC_BYTES:
            raise _Refused(f"it is larger than 1 MiB ({MAX_SPEC_BYTES} bytes)")
        text = data.decode("utf-8")
    except _Refused as exc:
        raise SpecError(source, None, "", f"cannot read the file: {exc} (allowed: {allowed})") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise SpecError(source, None, "", f"cannot read the file: {reason} (allowed: {allowed})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec file; raise SpecError (never anything else) on a bad file."""
    source = str(path)
    return parse_spec(_read_spec_text(source, path), source=source, default_name=Path(path).stem)


def parse_spec(text: str, source: str = "<string>", default_name: str = "model") -> Spec:
    """Validate YAML text as a spec; ``source`` names it in error messages."""
    return _build(_parse_yaml(source, text), default_name)


def spec_from_dict(data: dict[str, Any], source: str = "<dict>") -> Spec:
    """Validate already-parsed data (e.g. built in Python) as a spec; errors carry no line numbers."""
    return _build(_Document(source, data, {}), default_name="model")


def memory_layer_spec(fields: Mapping[str, Any], d_model: Any, source: str, names: Mapping[str, str],
                      dtype: str = "float32") -> tuple[MemorySpec, int]:
    """Validate one memory layer given outside a spec (e.g. the authors' config, umc.official) by the memory
    section's own parsers, cross-field rules and size rule, as a single unit 0:0 of width ``d_model``.

    ``fields`` are memory-section keys; ``names`` says how messages call each key (and the sections
    "memory" and "model", where d_model sits). Returns the MemorySpec and the validated width."""
    doc = _Document(source, {"model": {"d_model": d_model}, "memory": dict(fields)}, {}, names=names)
    width = MODEL_FIELDS["d_model"][0](doc, ("model", "d_model"), d_model)
    memory = _check_memory(doc, _fields(doc, ("memory",), doc.data["memory"], MEMORY_FIELDS), 1, width)
    _check_layer_size(doc, memory, width, dtype)
    return memory, width
