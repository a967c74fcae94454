"""The fused memory ops as ``torch.library`` custom ops (``torch.ops.umc.<op>``), so ``torch.export`` and
Torch-TensorRT see each one as a single node a plugin can replace, instead of the chain of aten ops it runs.

Each op's schema is read from its IR definition (operand names in order, ``Tensor?`` for an optional operand,
then its attributes), so the custom op and the IR op cannot drift apart. The real implementation is the op's
entry in ``umc.runtime.torch_ops.TORCH_IMPLS`` (the math is written once); the fake implementation gives the
output shapes and dtypes from the inputs alone, which is what tracing with symbolic sizes needs — the tests
hold it to the op's IR type rule. Importing this module registers the ops (once per process).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.library import custom_op, register_fake

from umc.ir.ops import lookup
from umc.runtime.torch_ops import TORCH_IMPLS

NAMESPACE = "umc"
SCHEMA_TYPES = {"int": "int", "float": "float", "bool": "bool"}  # IR attribute kind -> torch schema type


def _coarse_topm_fake(q, keys, k):
    return q.new_empty((*q.shape[:-1], k)), q.new_empty((*q.shape[:-1], k), dtype=torch.int64)


def _grid_topm_fake(q_row, q_col, keys_row, keys_col, i_row, i_col, cores, n):
    return torch.empty_like(i_row), q_row.new_empty((*i_row.shape, cores.shape[1]))


def _lookup_pool_fake(table, address, scores, perm, N, E):
    return table.new_empty((address.shape[0], address.shape[1], E * table.shape[1]))


def _gather_pool_fake(table, row, block, scores, E):
    return table.new_empty((row.shape[0], row.shape[1], E * table.shape[1]))


# op -> fake implementation (arguments as in the op's schema): the ops registered as custom ops
FAKES: dict[str, Callable] = {"coarse_topm": _coarse_topm_fake, "grid_topm": _grid_topm_fake,
                              "lookup_pool": _lookup_pool_fake, "gather_pool": _gather_pool_fake}


def schema(op: str) -> str:
    """The torch schema of IR op ``op``: its operands (``Tensor?`` when optional) then its attributes, returning
    one tensor per output, e.g. ``(Tensor q, Tensor keys, int k) -> (Tensor, Tensor)``."""
    definition = lookup(op)
    args = [f"Tensor{'?' if port.optional else ''} {port.name}" for port in definition.inputs]
    for attr in definition.attrs:
        if attr.kind not in SCHEMA_TYPES:
            raise ValueError(f"{op}: attribute {attr.name} of kind {attr.kind} has no torch schema type here "
                             f"(allowed: {', '.join(SCHEMA_TYPES)})")
        args.append(f"{SCHEMA_TYPES[attr.kind]} {attr.name}")
    returns = ", ".join("Tensor" for _ in definition.outputs)
    return f"({', '.join(args)}) -> ({returns})" if len(definition.outputs) > 1 else f"({', '.join(args)}) -> Tensor"


def _real(op: str) -> Callable:
    """The custom op's implementation: the op's torch implementation on the given operands (an absent optional
    operand is None) with the trailing arguments as its attributes."""
    definition = lookup(op)
    operands, names = len(definition.inputs), [a.name for a in definition.attrs]
    implementation = TORCH_IMPLS[op]

    def run(*args):
        tensors = [x for x in args[:operands] if x is not None]
        outputs = implementation(dict(zip(names, args[operands:])), *tensors)
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    run.__name__ = op
    return run


def _register_all() -> None:
    """Register every op of ``FAKES`` as ``umc::<op>`` with its real and fake implementations."""
    for op, fake in FAKES.items():
        custom_op(f"{NAMESPACE}::{op}", _real(op), mutates_args=(), schema=schema(op))
        register_fake(f"{NAMESPACE}::{op}", fake)


_register_all()


def custom_impl(op: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A ``TORCH_IMPLS``-shaped callable ``(attrs, *inputs) -> outputs`` that calls ``torch.ops.umc.<op>``: what
    a graph runner uses in place of the op's torch implementation so tracing records one custom-op node."""
    definition = lookup(op)
    target = getattr(getattr(torch.ops, NAMESPACE), op)
    names = [a.name for a in definition.attrs]

    def call(attrs, *inputs):
        operands = (*inputs, *[None] * (len(definition.inputs) - len(inputs)))
        outputs = target(*operands, *[attrs[name] for name in names])
        return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

    return call
