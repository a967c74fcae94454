"""Slices of a build's own graphs: one memory unit, or one block, cut out as a graph of its own.

A model too big to run whole on one machine is verified a slice at a time on the artifacts the
build holds, not on a recompile. Slices are found by the nodes' typed scopes. A unit slice reads
the residual stream entering its read block's FFN (its FFN norm is in the slice, either as a node
or fused into the unit's query op) and yields the unit's output and its selection taps; a block
slice reads the residual stream entering the block (and the past KV in decode graphs) and yields
the stream after it and the present KV.
"""

from __future__ import annotations

from dataclasses import replace

from umc.ir.core import Graph, IRError, Node, StateSlot, Tap, Value
from umc.ir.verify import verify

NORMS = ("rms_norm", "layer_norm")


def _cut(graph: Graph, name: str, nodes: list[Node], inputs: dict[str, Value], outputs: dict[str, Value],
         taps: tuple[Tap, ...] = (), state: tuple[StateSlot, ...] = ()) -> Graph:
    """A graph of ``nodes`` (all on the main stream, forks dropped) with the load-time nodes and parameters they
    need; IRError if they read a per-call value that is neither an input of the slice nor made inside it."""
    forked = {n.outputs[0].id: n.inputs[0] for n in nodes if n.op == "fork"}
    nodes = [replace(n, stream=0, inputs=tuple(forked.get(v.id, v) for v in n.inputs)) for n in nodes if n.op != "fork"]
    params = {v.id: v for v in graph.params}
    init_by_output = {v.id: n for n in graph.init_nodes for v in n.outputs}
    needed_init: set[int] = set()
    pending = [v for n in nodes for v in n.inputs]
    while pending:
        value = pending.pop()
        node = init_by_output.get(value.id)
        if node is not None and id(node) not in needed_init:
            needed_init.add(id(node))
            pending.extend(node.inputs)
    init_nodes = tuple(n for n in graph.init_nodes if id(n) in needed_init)
    read = {v.id for n in (*init_nodes, *nodes) for v in n.inputs}
    sliced = graph.evolve(
        name=name, inputs=tuple(Value(v.id, v.type, key) for key, v in inputs.items()),
        params=tuple(v for i, v in params.items() if i in read), init_nodes=init_nodes,
        nodes=tuple(nodes),
        outputs=tuple(Value(v.id, v.type, key) for key, v in outputs.items()), state=state, taps=taps, meta=())
    try:
        return verify(sliced)
    except IRError as exc:
        raise IRError(f"cannot cut {name} out of graph {graph.name}: {exc}") from None


def unit_slice(graph: Graph, unit: int) -> tuple[Graph, int]:
    """Memory unit ``unit`` of a prefill graph as a graph ``x`` (the residual stream entering its read block's
    FFN) -> ``out`` (what the unit adds to the residual) and its taps; also the read block's index."""
    nodes = [n for n in graph.nodes if n.scope.unit == unit and n.scope.part != "residual"]
    joins = [n for n in graph.nodes if n.scope.unit == unit and n.scope.part == "residual"]
    if not nodes or len(joins) != 1:
        raise IRError(f"graph {graph.name} has no memory unit {unit} to cut out")
    made = {v.id for n in nodes for v in n.outputs}
    weights = {v.id for v in graph.params} | {v.id for n in graph.init_nodes for v in n.outputs}
    external = {v.id: v for n in nodes for v in n.inputs if v.id not in made and v.id not in weights}
    producers, readers = graph.producers(), graph.users()
    if len(external) != 1:
        raise IRError(f"memory unit {unit} reads {len(external)} per-call values from outside, not 1")
    (entry,) = external.values()
    norm = producers.get(entry.id)
    if norm is not None and norm.op in NORMS and norm.scope.part == "ffn":  # the unit reads the normed input
        nodes, entry = [norm, *nodes], norm.inputs[0]
    else:
        norm = next((r for r in readers.get(entry.id, []) if r.op in NORMS and r.scope.part == "ffn"), None)
        if norm is None:
            raise IRError(f"memory unit {unit} reads a value that is neither an FFN norm's input nor its output")
    (out,) = [v for v in joins[0].inputs if v.id in made]
    taps = tuple(t for t in graph.taps if t.unit == unit)
    outputs = {"out": out, **{t.output: graph.output(t.output) for t in taps}}
    return _cut(graph, f"mem{unit}", nodes, {"x": entry}, outputs, taps), norm.scope.block


def block_slice(graph: Graph, block: int) -> Graph:
    """Block ``block`` as a graph ``x`` (the residual stream entering it; plus ``past_k``/``past_v`` in decode
    graphs) -> ``x`` after it, ``present_k``, ``present_v``."""
    nodes = [n for n in graph.nodes if n.scope.block == block]
    attention = [n for n in nodes if n.op == "attention"]
    if not nodes or len(attention) != 1:
        raise IRError(f"graph {graph.name} has no block {block} to cut out")
    slots = {s.kind: s for s in graph.state if s.kind in ("kv_k", "kv_v") and s.index == block}
    entry = nodes[0].inputs[0]
    inputs = {"x": entry}
    state = []
    for side, kind in (("k", "kv_k"), ("v", "kv_v")):
        slot = slots[kind]
        if slot.input is not None:
            inputs[f"past_{side}"] = graph.input(slot.input)
        state.append(StateSlot(kind, block, f"present_{side}", f"past_{side}" if slot.input else None))
    outputs = {"x": nodes[-1].outputs[0], "present_k": attention[0].outputs[1], "present_v": attention[0].outputs[2]}
    return _cut(graph, f"block{block}", nodes, inputs, outputs, state=tuple(state))
