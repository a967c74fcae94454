"""IR records (DESIGN.md §3): typed values, nodes, graphs. Frozen; a graph never holds weights.

A graph has per-call ``nodes`` and load-time ``init_nodes``: the latter depend only on
parameters (e.g. keys normalized by their LayerNorm) and are evaluated once when a
runtime binds weights, which is how weight-dependent folding works without weights
at compile time.

What a graph's inputs and outputs mean is declared, not guessed from names: ``state``
lists the carried state (KV cache, query-conv state) with the input that reads it and the
output that writes it, and ``taps`` lists the outputs that expose each memory unit's
selections (rows, columns, grid addresses, per-core scores) for verification. Every node
carries a typed ``Scope`` saying which block or memory unit it came from and what part
of it, which is what passes and reports use to find structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from umc.dtypes import BY_IR
from umc.ir.dims import Dim, format_dim


class IRError(ValueError):
    """A malformed graph: a compiler bug, or a forged graph file, never a user's spec mistake."""


@dataclass(frozen=True)
class TensorType:
    """Element type (an IR dtype name, ``umc.dtypes``) and shape; dims are ints or ``Sym``s."""

    dtype: str
    shape: tuple[Dim, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(format_dim(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        """Number of dims."""
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return BY_IR[self.dtype].itemsize

    def with_shape(self, *shape: Dim) -> "TensorType":
        """Same dtype, other shape."""
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: str) -> "TensorType":
        """Same shape, other dtype."""
        return TensorType(dtype, self.shape)


@dataclass(frozen=True)
class Value:
    """An SSA value: graph-unique id, type, and an optional name (graph inputs, outputs, parameters)."""

    id: int
    type: TensorType
    name: str = ""


SCOPE_PARTS = {
    "embed": "the token embedding",
    "attn": "a block's attention (with its norm)",
    "ffn": "a block's feed-forward network (with its norm)",
    "head": "the final norm and LM head",
    "fork": "the start of a memory unit's concurrent branch",
    "query": "a memory layer's query (conv, projection, query norm)",
    "score": "a memory layer's key scoring and top-m selection",
    "pool": "a memory layer's value lookup and pooling",
    "project": "a memory layer's output projection",
    "residual": "the residual add of a memory unit's output",
}


@dataclass(frozen=True)
class Scope:
    """Where a node came from: ``part`` of block ``block`` or of memory unit ``unit``.

    Passes and reports read these fields; ``str`` gives the display form ("block3.attn", "mem1.pool").
    """

    part: str
    block: int | None = None
    unit: int | None = None

    def __post_init__(self):
        if self.part not in SCOPE_PARTS:
            raise IRError(f"unknown scope part {self.part!r} (allowed: {', '.join(SCOPE_PARTS)})")

    def __str__(self) -> str:
        if self.unit is not None:
            return f"mem{self.unit}.{self.part}"
        if self.block is not None:
            return f"block{self.block}.{self.part}"
        return self.part


NO_SCOPE = Scope("embed")


@dataclass(frozen=True)
class Node:
    """One op application. ``stream`` is 0 on the main stream, k for the k-th concurrent branch."""

    op: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    scope: Scope = NO_SCOPE
    stream: int = 0

    def attr(self, key: str, default: Any = None) -> Any:
        """An attribute's value."""
        return dict(self.attrs).get(key, default)


STATE_KINDS = {"kv_k": "a block's attention keys", "kv_v": "a block's attention values",
               "conv": "a memory unit's query-conv inputs"}
TAP_STAGES = {"query": "the query projection the selection scores come from (B,T,Hq*2*kd), before the query norm",
              "rows": "the row indices kept by the row top-m (B,T,H,m)",
              "cols": "the column indices kept by the column top-m (B,T,H,m)",
              "grid": "the grid addresses selected (B,T,H,m), before the shuffle",
              "scores": "the per-core scores of the selected addresses (B,T,H,m,h), before the activation"}


@dataclass(frozen=True)
class StateSlot:
    """Carried state: the graph output ``output`` is the state after the call; ``input`` (decode graphs)
    is the state before it. ``kind`` and ``index`` say what it is (``STATE_KINDS``; block or unit index)."""

    kind: str
    index: int
    output: str
    input: str | None = None

    @property
    def name(self) -> str:
        """The key of this state in a session's state dict."""
        return f"{self.kind}.{self.index}"


@dataclass(frozen=True)
class Tap:
    """A graph output exposing one stage (``TAP_STAGES``) of memory unit ``unit``'s selection."""

    unit: int
    stage: str
    output: str


@dataclass(frozen=True)
class Graph:
    """Inputs, parameters (by name and type), load-time nodes, per-call nodes (topological), named outputs,
    and what the outputs mean (carried ``state``, selection ``taps``)."""

    name: str
    inputs: tuple[Value, ...]
    params: tuple[Value, ...]
    init_nodes: tuple[Node, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]
    meta: tuple[tuple[str, Any], ...] = field(default=())
    state: tuple[StateSlot, ...] = ()
    taps: tuple[Tap, ...] = ()

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

    def output(self, name: str) -> Value:
        """The output called ``name`` (IRError if there is none)."""
        for v in self.outputs:
            if v.name == name:
                return v
        raise IRError(f"{self.name}: no output named {name!r}")

    def input(self, name: str) -> Value:
        """The input called ``name`` (IRError if there is none)."""
        for v in self.inputs:
            if v.name == name:
                return v
        raise IRError(f"{self.name}: no input named {name!r}")

    def next_id(self) -> int:
        """An id no value of the graph uses."""
        ids = [v.id for v in (*self.inputs, *self.params)] + [v.id for n in self.all_nodes() for v in n.outputs]
        return max(ids, default=-1) + 1

    def evolve(self, **changes: Any) -> "Graph":
        """A copy with some fields replaced."""
        return replace(self, **changes)
