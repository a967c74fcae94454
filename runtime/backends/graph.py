"""The "graph" backend: runs any IR graph node by node with the registered torch implementations.

A graph is prepared once into a ``Program``: implementations resolved, which attributes hold
symbolic sizes, and when each intermediate can be freed. Weights are bound once per backend:
load-time nodes run at bind time, and prefill and decode share their results (the same fold of
the same weights is computed once). Nodes on a concurrent stream (skip-layer branches) run on a
worker thread when ``threads`` is on, joined where the main stream first reads their results.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping

import torch

from umc.ir.core import Graph, Node
from umc.ir.dims import Sym, evaluate
from umc.ir.ops import lookup
from umc.runtime.backends import Backend, BackendError, register_backend
from umc.runtime.distributed import sharded_lookup
from umc.runtime.torch_ops import FORCED_IMPLS, TORCH_IMPLS

Observer = Callable[[Node], None]


def _symbolic_attrs(node: Node) -> tuple[str, ...]:
    kinds = {a.name: a.kind for a in lookup(node.op).attrs}
    return tuple(k for k, v in node.attrs if kinds[k] in ("dim", "dims")
                 and any(isinstance(d, Sym) for d in (v if isinstance(v, tuple) else (v,))))


def _concrete(value: Any, sizes: Mapping[str, int]) -> Any:
    return tuple(evaluate(d, sizes) for d in value) if isinstance(value, tuple) else evaluate(value, sizes)


class Program:
    """One graph prepared for repeated execution; ``overrides`` runs given per-call nodes (by index) with
    another implementation than the op's torch one (e.g. a generated kernel)."""

    def __init__(self, graph: Graph, overrides: Mapping[int, Callable] | None = None):
        self.graph = graph
        missing = sorted({n.op for n in graph.all_nodes()} - set(TORCH_IMPLS))
        if missing:
            raise BackendError(f"graph {graph.name}: ops without a torch implementation: {', '.join(missing)}")
        self.impls = [(overrides or {}).get(i, TORCH_IMPLS[n.op]) for i, n in enumerate(graph.nodes)]
        self.attrs = [dict(n.attrs) for n in graph.nodes]
        self.symbolic = [_symbolic_attrs(n) for n in graph.nodes]
        self.free_after = self._free_plan()
        self.producer = {v.id: (i, k) for i, n in enumerate(graph.nodes) for k, v in enumerate(n.outputs)}

    def _free_plan(self) -> list[tuple[int, ...]]:
        """Per node, the values no later node reads: freed after it (kept: outputs, weights, values read on another
        stream than the one that made them, which a branch may still need)."""
        graph = self.graph
        kept = {v.id for v in graph.outputs} | {v.id for v in graph.params} | {v.id for n in graph.init_nodes for v in n.outputs}
        streams: dict[int, set[int]] = {}
        last: dict[int, int] = {}
        for i, node in enumerate(graph.nodes):
            for v in node.inputs:
                streams.setdefault(v.id, set()).add(node.stream)
                last[v.id] = i
        for i, node in enumerate(graph.nodes):
            for v in node.outputs:
                streams.setdefault(v.id, set()).add(node.stream)
                last.setdefault(v.id, i)  # an output nothing reads goes right after its node
        plan: list[list[int]] = [[] for _ in graph.nodes]
        for value_id, i in last.items():
            if value_id not in kept and len(streams[value_id]) == 1:
                plan[i].append(value_id)
        return [tuple(p) for p in plan]

    def _call(self, i: int, env: dict[int, torch.Tensor], sizes: Mapping[str, int],
              forced: Mapping[int, dict[int, torch.Tensor]], observer: Observer | None) -> None:
        node = self.graph.nodes[i]
        if observer is not None:
            observer(node)
        attrs = self.attrs[i]
        if self.symbolic[i]:
            attrs = {**attrs, **{k: _concrete(attrs[k], sizes) for k in self.symbolic[i]}}
        inputs = [env[v.id] for v in node.inputs]
        if i in forced:
            if node.op not in FORCED_IMPLS:
                raise BackendError(f"op {node.op} cannot be forced to a selection")
            outs = FORCED_IMPLS[node.op](attrs, inputs, forced[i])
        else:
            outs = self.impls[i](attrs, *inputs)
        for value, tensor in zip(node.outputs, outs, strict=True):  # an implementation must return every output
            env[value.id] = tensor
        for value_id in self.free_after[i]:
            env.pop(value_id, None)

    def run(self, env: dict[int, torch.Tensor], sizes: Mapping[str, int], threads: bool = False,
            force: Mapping[str, torch.Tensor] | None = None, observer: Observer | None = None) -> dict[str, torch.Tensor]:
        """Run the per-call nodes on ``env`` (weights and inputs by value id); the named outputs."""
        forced: dict[int, dict[int, torch.Tensor]] = {}
        for name, tensor in (force or {}).items():
            node_index, output_index = self.producer[self.graph.output(name).id]
            forced.setdefault(node_index, {})[output_index] = tensor
        with torch.no_grad():
            if threads and any(n.stream for n in self.graph.nodes):
                self._run_streams(env, sizes, forced, observer)
            else:
                for i in range(len(self.graph.nodes)):
                    self._call(i, env, sizes, forced, observer)
        return {v.name: env[v.id] for v in self.graph.outputs}

    def _run_streams(self, env, sizes, forced, observer) -> None:
        """Main-stream nodes run here; each branch runs on a worker once its fork is reached."""
        nodes = self.graph.nodes
        branches: dict[int, list[int]] = {}
        for i, node in enumerate(nodes):
            if node.stream:
                branches.setdefault(node.stream, []).append(i)
        pending: dict[int, Future] = {}

        def run_branch(indices: list[int]) -> None:
            for i in indices:
                self._call(i, env, sizes, forced, observer)

        with ThreadPoolExecutor(max_workers=len(branches)) as pool:
            futures = []
            for i, node in enumerate(nodes):
                if node.stream:
                    if node.op == "fork":  # verified: the first node of its stream
                        future = pool.submit(run_branch, branches[node.stream])
                        futures.append(future)
                        pending.update({v.id: future for j in branches[node.stream] for v in nodes[j].outputs})
                    continue
                for v in node.inputs:
                    if v.id in pending:
                        pending.pop(v.id).result()
                self._call(i, env, sizes, forced, observer)
            for future in futures:
                future.result()


def _init_key(node: Node, keys: dict[int, Any]) -> tuple:
    return (node.op, node.attrs, tuple(keys[v.id] for v in node.inputs))


def bind_shared(graphs: Mapping[str, Graph], weights: Mapping[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """Per graph, the weights and load-time values by value id; a load-time node identical across graphs
    (same op, attributes and inputs) runs once. Values only load-time nodes read are not kept."""
    cache: dict[tuple, torch.Tensor] = {}
    bound = {}
    with torch.no_grad():
        for kind, graph in graphs.items():
            env = {p.id: weights[p.name] for p in graph.params}
            keys: dict[int, Any] = {p.id: ("param", p.name) for p in graph.params}
            for node in graph.init_nodes:
                key = _init_key(node, keys)
                if (key, 0) not in cache:
                    outs = TORCH_IMPLS[node.op](dict(node.attrs), *[env[v.id] for v in node.inputs])
                    cache.update({(key, k): t for k, t in enumerate(outs)})
                for k, v in enumerate(node.outputs):
                    keys[v.id] = (key, k)
                    env[v.id] = cache[(key, k)]
            used = {v.id for n in graph.nodes for v in n.inputs} | {v.id for v in graph.outputs}
            bound[kind] = {i: t for i, t in env.items() if i in used}
    return bound


@register_backend
class GraphBackend(Backend):
    """Runs the optimized IR with the torch implementation of each op (the reference runtime)."""

    name = "graph"
    shardable = True

    def __init__(self, graphs: Mapping[str, Graph], weights: Mapping[str, torch.Tensor], threads: bool = True,
                 artifacts=None, world=None):
        # every rank must reach the lookups' collectives in one order: skip-layer branches run in sequence
        super().__init__(graphs, weights, threads and world is None, artifacts, world)
        self.programs = {kind: Program(graph, self.overrides(graph)) for kind, graph in self.graphs.items()}
        self.bound = bind_shared(self.graphs, weights)

    def overrides(self, graph: Graph) -> dict[int, Callable]:
        """Per-call nodes (by index) run by something else than their op's torch implementation: in a distributed
        world, the sharded lookups."""
        if self.world is None:
            return {}
        return {i: sharded_lookup(self.world, n) for i, n in enumerate(graph.nodes) if n.op == "sharded_lookup_pool"}

    def run(self, kind, feeds, sizes, force=None, observer: Observer | None = None):
        """See ``Backend.run``; ``observer`` is called with each node as it starts (on the thread running it)."""
        program = self.programs[kind]
        env = dict(self.bound[kind])
        env.update({v.id: feeds[v.name] for v in program.graph.inputs})
        return program.run(env, sizes, self.threads, force, observer)
