"""IR records (DESIGN.md §3): typed values, nodes, graphs. Frozen; a graph never holds weights.

A graph has per-call ``nodes`` and load-time ``init_nodes``: the latter depend only on
parameters (e.g. keys normalized by their LayerNorm) and are evaluated once when a
runtime binds weights, which is how weight-dependent folding works without weights
at compile time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator

Dim = int | str  # a size, or a symbolic name / sum such as "S_past+1"

DTYPES = ("f32", "f16", "bf16", "f64", "i64", "bool")
SPEC_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "bool": 1}


class IRError(ValueError):
    """A malformed graph: a compiler bug, never a user mistake."""


@dataclass(frozen=True)
class TensorType:
    """Element type and shape; dims are ints or symbols."""

    dtype: str
    shape: tuple[Dim, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        """Number of dims."""
        return len(self.shape)

    def with_shape(self, *shape: Dim) -> "TensorType":
        """Same dtype, other shape."""
        return TensorType(self.dtype, tuple(shape))


@dataclass(frozen=True)
class Value:
    """An SSA value: graph-unique id, type, and an optional name (graph inputs, outputs, parameters)."""

    id: int
    type: TensorType
    name: str = ""


@dataclass(frozen=True)
class Node:
    """One op application. ``scope`` says which part of the model it came from (e.g. "block3.ffn",
    "mem1.pool"); ``stream`` is 0 on the main stream, k for the k-th concurrent branch."""

    op: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    scope: str = ""
    stream: int = 0

    def attr(self, key: str, default: Any = None) -> Any:
        """An attribute's value."""
        return dict(self.attrs).get(key, default)


@dataclass(frozen=True)
class Graph:
    """Inputs, parameters (by name and type), load-time nodes, per-call nodes (topological), named outputs."""

    name: str
    inputs: tuple[Value, ...]
    params: tuple[Value, ...]
    init_nodes: tuple[Node, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]
    meta: tuple[tuple[str, Any], ...] = field(default=())

    def all_nodes(self) -> Iterator[Node]:
        """Load-time nodes, then per-call nodes."""
        yield from self.init_nodes
        yield from self.nodes

    def producers(self) -> dict[int, Node]:
        """Value id -> the node that defines it."""
        return {v.id: n for n in self.all_nodes() for v in n.outputs}

    def users(self) -> dict[int, list[Node]]:
        """Value id -> nodes that read it (in order)."""
        out: dict[int, list[Node]] = {}
        for n in self.all_nodes():
            for v in n.inputs:
                out.setdefault(v.id, []).append(n)
        return out

    def next_id(self) -> int:
        """An id no value of the graph uses."""
        ids = [v.id for v in (*self.inputs, *self.params)] + [v.id for n in self.all_nodes() for v in n.outputs]
        return max(ids, default=-1) + 1

    def evolve(self, **changes: Any) -> "Graph":
        """A copy with some fields replaced."""
        return replace(self, **changes)


def dim_add(a: Dim, b: Dim) -> Dim:
    """a + b for dims; symbolic sums are kept as text."""
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if a == 0:
        return b
    if b == 0:
        return a
    return f"{a}+{b}"

