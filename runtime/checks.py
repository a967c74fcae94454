"""Input and weight checks, in one place that every runtime entry point and every backend goes through.

A session checks its tokens (range, emptiness), its state (every slot present, the right
batch and length) and its feeds against the graph's declared types before any backend sees
them, and checks weights (names, shapes, dtypes, finiteness, the value constraints the ops
declare, e.g. a shuffle that must be a permutation) once when they are bound.
"""

from __future__ import annotations

from typing import Mapping

import torch

from umc.dtypes import torch_dtype
from umc.ir.core import Graph
from umc.ir.dims import bind
from umc.ir.ops import lookup
from umc.numerics import non_finite_count


class InputError(ValueError):
    """Tokens, state or feeds a graph cannot take: a user mistake, named precisely."""


class BindError(ValueError):
    """Weights that do not fit a graph: names the tensor."""


def check_tokens(tokens: torch.Tensor, vocab: int, what: str = "tokens") -> None:
    """Token ids: an int64 (B, T) tensor with B, T >= 1 and every id in [0, vocab); else InputError naming
    the first offending position and value."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
        shown = f"{tokens.dtype}{list(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise InputError(f"{what} must be an int64 tensor of shape (batch, length), got {shown}")
    if 0 in tokens.shape:
        raise InputError(f"{what} is empty (shape {list(tokens.shape)}); give at least one sequence of one token")
    bad = (tokens < 0) | (tokens >= vocab)
    if bad.any():
        b, t = (int(i) for i in bad.nonzero()[0])
        raise InputError(f"{what}[{b}, {t}] = {int(tokens[b, t])} is outside the vocabulary (allowed: 0..{vocab - 1}; "
                         f"{int(bad.sum())} id(s) out of range)")


def check_state(graph: Graph, state) -> dict[str, torch.Tensor]:
    """The graph's state inputs from a session state dict (keyed by slot name); InputError if it is not a
    dict or lacks a slot."""
    if not isinstance(state, Mapping):
        raise InputError(f"state must be the dict a previous prefill/decode returned, got {type(state).__name__}")
    feeds = {}
    for slot in graph.state:
        if slot.input is None:
            continue
        if slot.name not in state:
            raise InputError(f"state lacks {slot.name} (expected keys: {', '.join(s.name for s in graph.state)})")
        feeds[slot.input] = state[slot.name]
    return feeds


def check_feeds(graph: Graph, feeds: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Inputs against the graph's declared types: dtype, rank, fixed dims, one size per symbol (e.g. the
    same B everywhere). Returns the symbol sizes; InputError names the offending input."""
    sizes: dict[str, int] = {}
    for value in graph.inputs:
        if value.name not in feeds:
            raise InputError(f"graph {graph.name}: input {value.name} is missing")
        tensor, want = feeds[value.name], value.type
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch_dtype(want.dtype):
            shown = f"{tensor.dtype}{list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise InputError(f"graph {graph.name}: input {value.name} is {shown}, expected {want}")
        problem = bind(want.shape, tuple(tensor.shape), sizes)
        if problem:
            raise InputError(f"graph {graph.name}: input {value.name} has shape {list(tensor.shape)}, expected {want} "
                             f"({problem})")
    return sizes


def check_weights(graphs: Mapping[str, Graph], weights: Mapping[str, torch.Tensor],
                  shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Every parameter the graphs read: present, right shape and dtype, finite, and meeting the value
    constraints of the ops that read it (BindError naming the tensor). ``shapes``: parameters held in part
    (a rank's shard of a value table) and the shape of that part."""
    checked: set[str] = set()
    for graph in graphs.values():
        params = {p.id: p for p in graph.params}
        for p in graph.params:
            if p.name in checked:
                continue
            if p.name not in weights:
                raise BindError(f"no weight named {p.name} (the graph {graph.name} needs {p.type})")
            tensor = weights[p.name]
            wanted = tuple((shapes or {}).get(p.name, p.type.shape))
            if tuple(tensor.shape) != wanted or tensor.dtype != torch_dtype(p.type.dtype):
                part = "" if wanted == tuple(p.type.shape) else f" (this rank's shard {list(wanted)})"
                raise BindError(f"weight {p.name} is {tensor.dtype}{list(tensor.shape)}, the graph needs {p.type}{part}")
            bad = non_finite_count(tensor)
            if bad:
                raise BindError(f"weight {p.name} has {bad} non-finite values (NaN or Inf)")
            checked.add(p.name)
        for node in graph.all_nodes():
            for port, value in zip(lookup(node.op).inputs, node.inputs):
                if value.id in params and port.permutation:
                    _check_permutation(params[value.id].name, weights[params[value.id].name])


def _check_permutation(name: str, tensor: torch.Tensor) -> None:
    expected = torch.arange(tensor.numel(), dtype=tensor.dtype)
    if tensor.dim() != 1 or not torch.equal(tensor.sort().values, expected):
        raise BindError(f"weight {name} is not a permutation of 0..{tensor.numel() - 1} "
                        f"(each index must appear exactly once)")
