"""Symbolic dimensions: small integer polynomials over named sizes (``B``, ``T``, ``S_past``).

A shape is a tuple of dims; a dim is a plain ``int`` or a ``Sym``. ``Sym`` keeps a canonical
form (sorted monomials with integer coefficients), so ``S_past+1 == 1+S_past`` and
``B*T == T*B``, and a sym with no symbols left is returned as an ``int``. Symbols are bound by
name when a graph runs (``evaluate``), never by position. ``parse_dim``/``format_dim`` are the
package's one text form (IR text, graph JSON, reshape attributes).
"""

from __future__ import annotations

import re
from typing import Mapping, Union

Monomial = tuple[str, ...]  # sorted symbol names; () is the constant term

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TERM = re.compile(r"\s*([+-]?)\s*([^+-]+)")


class DimError(ValueError):
    """A dim expression that cannot be parsed or evaluated."""


class Sym:
    """A polynomial dim, e.g. ``S_past+1`` or ``B*T``. Immutable and hashable."""

    __slots__ = ("terms",)

    def __init__(self, terms: Mapping[Monomial, int]):
        object.__setattr__(self, "terms", tuple(sorted((m, c) for m, c in terms.items() if c)))

    def __setattr__(self, key, value):
        raise AttributeError("Sym is immutable")

    @staticmethod
    def of(name: str) -> "Sym":
        """The dim of one named size."""
        if not _NAME.fullmatch(name):
            raise DimError(f"{name!r} is not a dim name (allowed: letters, digits, _; not starting with a digit)")
        return Sym({(name,): 1})

    @property
    def symbols(self) -> frozenset[str]:
        """Names this dim depends on."""
        return frozenset(s for m, _ in self.terms for s in m)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sym) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(self.terms)

    def __add__(self, other: "Dim") -> "Dim":
        return _make(_add(_terms(self), _terms(other)))

    __radd__ = __add__

    def __sub__(self, other: "Dim") -> "Dim":
        return _make(_add(_terms(self), {m: -c for m, c in _terms(other).items()}))

    def __rsub__(self, other: "Dim") -> "Dim":
        return _make(_add(_terms(other), {m: -c for m, c in _terms(self).items()}))

    def __mul__(self, other: "Dim") -> "Dim":
        return dim_mul(self, other)

    __rmul__ = __mul__

    def __str__(self) -> str:
        return format_dim(self)

    def __repr__(self) -> str:
        return f"Sym({format_dim(self)!r})"


Dim = Union[int, Sym]


def _terms(d: Dim) -> dict[Monomial, int]:
    if isinstance(d, Sym):
        return dict(d.terms)
    if isinstance(d, bool) or not isinstance(d, int):
        raise DimError(f"{d!r} is not a dim (allowed: an int or a Sym)")
    return {(): d} if d else {}


def _add(a: dict[Monomial, int], b: dict[Monomial, int]) -> dict[Monomial, int]:
    out = dict(a)
    for m, c in b.items():
        out[m] = out.get(m, 0) + c
    return out


def _make(terms: dict[Monomial, int]) -> Dim:
    terms = {m: c for m, c in terms.items() if c}
    if not terms:
        return 0
    if set(terms) == {()}:
        return terms[()]
    return Sym(terms)


def dim_add(a: Dim, b: Dim) -> Dim:
    """a + b."""
    return _make(_add(_terms(a), _terms(b)))


def dim_mul(a: Dim, b: Dim) -> Dim:
    """a * b."""
    out: dict[Monomial, int] = {}
    for ma, ca in _terms(a).items():
        for mb, cb in _terms(b).items():
            m = tuple(sorted(ma + mb))
            out[m] = out.get(m, 0) + ca * cb
    return _make(out)


def dim_prod(dims) -> Dim:
    """The product of dims (1 for none)."""
    total: Dim = 1
    for d in dims:
        total = dim_mul(total, d)
    return total


def is_dim(value) -> bool:
    """True for an int (not a bool) or a Sym."""
    return isinstance(value, Sym) or (isinstance(value, int) and not isinstance(value, bool))


def format_dim(d: Dim) -> str:
    """Canonical text: ``S_past+1``, ``B*T``, ``2*B+3``."""
    if not isinstance(d, Sym):
        return str(d)
    parts = []
    for monomial, coeff in sorted(d.terms, key=lambda t: (-len(t[0]), t[0])):
        body, size = "*".join(monomial), abs(coeff)
        text = str(size) if not body else body if size == 1 else f"{size}*{body}"
        parts.append(f"-{text}" if coeff < 0 else f"+{text}" if parts else text)
    return "".join(parts)


def parse_dim(text: str | int) -> Dim:
    """The dim written as ``text`` (an int passes through). DimError names what is wrong."""
    if is_dim(text):
        return text
    if not isinstance(text, str) or not text.strip():
        raise DimError(f"{text!r} is not a dim (allowed: an int, a name, or a sum of products such as S_past+1, B*T)")
    total: Dim = 0
    pos, text = 0, text.strip()
    while pos < len(text):
        match = _TERM.match(text, pos)
        if match is None or (pos and not match.group(1)):
            raise DimError(f"cannot read dim {text!r} at {text[pos:]!r}")
        term: Dim = -1 if match.group(1) == "-" else 1
        for factor in match.group(2).split("*"):
            factor = factor.strip()
            if factor.isdigit():
                term = dim_mul(term, int(factor))
            elif _NAME.fullmatch(factor):
                term = dim_mul(term, Sym.of(factor))
            else:
                raise DimError(f"cannot read dim {text!r}: {factor!r} is neither a number nor a name")
        total = dim_add(total, term)
        pos = match.end()
    return total


def evaluate(d: Dim, sizes: Mapping[str, int]) -> int:
    """The value of a dim with its symbols bound by name (DimError names an unbound one)."""
    if not isinstance(d, Sym):
        return d
    total = 0
    for monomial, coeff in d.terms:
        value = coeff
        for name in monomial:
            if name not in sizes:
                raise DimError(f"dim {format_dim(d)}: size {name} is not bound (bound: {', '.join(sorted(sizes)) or 'none'})")
            value *= sizes[name]
        total += value
    return total


def evaluate_shape(shape, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """A shape of concrete ints."""
    return tuple(evaluate(d, sizes) for d in shape)


def bind(declared, actual, sizes: dict[str, int]) -> str | None:
    """Bind the symbols of a declared shape to an actual one, extending ``sizes``; a problem, or None.

    A dim that is a single symbol binds it (first binding wins); every other dim must
    evaluate to the actual size once its symbols are bound.
    """
    if len(declared) != len(actual):
        return f"rank {len(actual)}, expected {len(declared)}"
    pending = []
    for want, got in zip(declared, actual):
        if isinstance(want, Sym) and len(want.terms) == 1 and want.terms[0][1] == 1 and len(want.terms[0][0]) == 1:
            name = want.terms[0][0][0]
            if sizes.setdefault(name, got) != got:
                return f"{name} = {got} here but {sizes[name]} elsewhere"
        else:
            pending.append((want, got))
    for want, got in pending:
        try:
            value = evaluate(want, sizes)
        except DimError as exc:
            return str(exc)
        if value != got:
            return f"dim {format_dim(want)} = {value}, got {got}"
    return None
