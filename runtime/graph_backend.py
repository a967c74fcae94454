"""The "graph" backend: runs any IR graph node by node with the registered torch implementations.

Weights are bound by parameter name; load-time nodes run once at bind time. Nodes on a
concurrent stream (skip-layer branches) run on a worker thread when ``threads`` is on,
joined where the main stream first reads their results.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Mapping

import torch

from umc.ir.core import Graph, Node
from umc.runtime.torch_ops import run_op

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64,
                "i64": torch.int64, "bool": torch.bool}


class BindError(ValueError):
    """Weights that do not fit a graph: names the parameter."""


def bind(graph: Graph, weights: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Check weights against the graph's parameters and evaluate the load-time nodes."""
    env: dict[int, torch.Tensor] = {}
    for p in graph.params:
        if p.name not in weights:
            raise BindError(f"graph {graph.name}: no weight named {p.name}")
        tensor = weights[p.name]
        if tuple(tensor.shape) != p.type.shape or tensor.dtype != TORCH_DTYPES[p.type.dtype]:
            raise BindError(f"graph {graph.name}: weight {p.name} is {tensor.dtype}{list(tensor.shape)}, "
                            f"the graph needs {p.type}")
        env[p.id] = tensor
    with torch.no_grad():
        for node in graph.init_nodes:
            _run(node, env)
    return env


def check_inputs(graph: Graph, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Inputs against the graph's input types: dtype, rank, fixed dims, and one size per symbol
    (e.g. the same B everywhere). Returns the symbol sizes; BindError names the offending input."""
    sizes: dict[str, int] = {}
    for value in graph.inputs:
        if value.name not in inputs:
            raise BindError(f"graph {graph.name}: input {value.name} is missing")
        tensor, want = inputs[value.name], value.type
        if tensor.dtype != TORCH_DTYPES[want.dtype] or tensor.dim() != want.rank:
            raise BindError(f"graph {graph.name}: input {value.name} is {tensor.dtype}{list(tensor.shape)}, expected {want}")
        for dim, size in zip(want.shape, tensor.shape):
            known = dim if isinstance(dim, int) else sizes.setdefault(dim, size)
            if known != size:
                raise BindError(f"graph {graph.name}: input {value.name} has shape {list(tensor.shape)}, expected {want}"
                                + ("" if isinstance(dim, int) else f" with {dim} = {known}"))
    return sizes


def _run(node: Node, env: dict[int, torch.Tensor]) -> None:
    outs = run_op(node.op, dict(node.attrs), [env[v.id] for v in node.inputs])
    for value, tensor in zip(node.outputs, outs, strict=True):  # an implementation must return every output
        env[value.id] = tensor


def execute(graph: Graph, bound: Mapping[int, torch.Tensor], inputs: Mapping[str, torch.Tensor],
            threads: bool = False, observe: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Run the per-call nodes on named inputs; returns the named outputs, plus the values
    whose ids ``observe`` names (intermediate results a verifier wants to see)."""
    check_inputs(graph, inputs)
    return execute_checked(graph, bound, inputs, threads, observe)


def execute_checked(graph: Graph, bound: Mapping[int, torch.Tensor], inputs: Mapping[str, torch.Tensor],
                    threads: bool = False, observe: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """``execute`` for inputs that already passed ``check_inputs``."""
    env = dict(bound)
    for value in graph.inputs:
        env[value.id] = inputs[value.name]
    with torch.no_grad():
        if threads and any(n.stream for n in graph.nodes):
            _execute_streams(graph, env)
        else:
            for node in graph.nodes:
                _run(node, env)
    outputs = {v.name: env[v.id] for v in graph.outputs}
    outputs.update({name: env[value_id] for name, value_id in (observe or {}).items()})
    return outputs


def _execute_streams(graph: Graph, env: dict[int, torch.Tensor]) -> None:
    """Main-stream nodes run here; each branch runs on a worker once its inputs exist."""
    branches: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if node.stream:
            branches.setdefault(node.stream, []).append(node)
    pending: dict[int, Future] = {}
    started: set[int] = set()

    def run_branch(nodes: list[Node]) -> None:
        for node in nodes:
            _run(node, env)

    with ThreadPoolExecutor(max_workers=max(1, len(branches))) as pool:
        for node in graph.nodes:
            if node.stream:
                if node.stream not in started:  # the fork: launch the whole branch
                    started.add(node.stream)
                    future = pool.submit(run_branch, branches[node.stream])
                    for branch_node in branches[node.stream]:
                        for v in branch_node.outputs:
                            pending[v.id] = future
                continue
            for v in node.inputs:
                if v.id in pending:
                    pending.pop(v.id).result()
            _run(node, env)
        for future in pending.values():
            future.result()
