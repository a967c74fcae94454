"""The IR verifier: SSA, definition before use, per-node op/attribute/type checks, streams, declared state and taps.

Run after lowering, after every pass, and on every graph read from a build directory, so a
malformed or forged graph is one clear IRError, never a KeyError at run time.
"""

from __future__ import annotations

from umc.ir.core import STATE_KINDS, TAP_STAGES, Graph, IRError, Node, Scope, TensorType
from umc.ir.ops import check_attrs, infer_types
from umc.dtypes import BY_IR


def _check_type(graph: Graph, t: TensorType, where: str) -> None:
    if not isinstance(t, TensorType) or t.dtype not in BY_IR or not isinstance(t.shape, tuple) \
            or any(isinstance(d, int) and d < 0 for d in t.shape):
        raise IRError(f"{graph.name}: {where} has a malformed type {t!r}")


class _Streams:
    """Stream discipline: stream k > 0 starts with its one ``fork`` (branch=k); its nodes read only weights,
    graph inputs, their own stream's values and main-stream values defined before that fork."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.main_before_fork: dict[int, set[int]] = {}
        self.stream_of: dict[int, int] = {}
        self.main_defined: set[int] = set()

    def check(self, node: Node, where: str, outside: set[int]) -> None:
        """Check one per-call node in order, then record its outputs."""
        stream = node.stream
        if node.op == "fork":
            if node.attr("branch") != stream:
                raise IRError(f"{self.graph.name}: {where} forks branch {node.attr('branch')} but is on stream {stream}")
            if stream in self.main_before_fork:
                raise IRError(f"{self.graph.name}: {where} is a second fork of stream {stream}")
            self.main_before_fork[stream] = set(self.main_defined)
        elif stream and stream not in self.main_before_fork:
            raise IRError(f"{self.graph.name}: {where} starts stream {stream} but is not its fork (branch={stream})")
        for v in node.inputs:
            if v.id in outside:
                continue
            source = self.stream_of[v.id]
            if stream and source != stream and not (source == 0 and v.id in self.main_before_fork[stream]):
                what = f"stream {source}" if source else "the main stream after the fork"
                raise IRError(f"{self.graph.name}: {where} on stream {stream} reads %{v.id}, defined on {what}")
        for v in node.outputs:
            self.stream_of[v.id] = stream
            if not stream:
                self.main_defined.add(v.id)


def verify(graph: Graph) -> Graph:
    """Return the graph unchanged if it is well formed; raise IRError naming the first problem."""
    defined: set[int] = set()

    def define(value, where: str) -> None:
        _check_type(graph, value.type, where)
        if value.id in defined:
            raise IRError(f"{graph.name}: value %{value.id} defined twice ({where})")
        defined.add(value.id)

    for v in graph.inputs:
        define(v, f"input {v.name}")
    if len({v.name for v in graph.inputs}) != len(graph.inputs):
        raise IRError(f"{graph.name}: two inputs share a name")
    names = set()
    for v in graph.params:
        define(v, f"param {v.name}")
        if not v.name or v.name in names:
            raise IRError(f"{graph.name}: parameter {v.name!r} is unnamed or listed twice")
        names.add(v.name)
    weights_only = {v.id for v in graph.params}
    outside = {v.id for v in graph.inputs} | weights_only
    streams = _Streams(graph)
    for section, nodes in (("init", graph.init_nodes), ("main", graph.nodes)):
        for i, node in enumerate(nodes):
            where = f"{section} node {i} ({node.op}, {node.scope})"
            if not isinstance(node.scope, Scope):
                raise IRError(f"{graph.name}: {where} has no typed scope")
            for v in node.inputs:
                if v.id not in defined:
                    raise IRError(f"{graph.name}: {where} reads %{v.id} before it is defined")
                if section == "init" and v.id not in weights_only:
                    raise IRError(f"{graph.name}: {where} is load-time but reads a per-call value %{v.id}")
            try:
                if dict(node.attrs) != check_attrs(node.op, dict(node.attrs)):
                    raise IRError(f"{node.op}: attributes are not in normal form")
                expected = infer_types(node.op, tuple(v.type for v in node.inputs), dict(node.attrs))
            except IRError as exc:
                raise IRError(f"{graph.name}: {where}: {exc}") from None
            actual = tuple(v.type for v in node.outputs)
            if expected != actual:
                shown = lambda types: ", ".join(map(str, types))
                raise IRError(f"{graph.name}: {where} declares {shown(actual)}, its type rule gives {shown(expected)}")
            if section == "init" and node.stream:
                raise IRError(f"{graph.name}: {where} is load-time but on stream {node.stream}")
            if section == "main":
                streams.check(node, where, outside | weights_only)
            for v in node.outputs:
                define(v, where)
                if section == "init":
                    weights_only.add(v.id)
    _check_ports(graph, defined)
    return graph


def _check_ports(graph: Graph, defined: set[int]) -> None:
    """Outputs defined and uniquely named; state slots and taps refer to real inputs/outputs."""
    outputs = {}
    for v in graph.outputs:
        if v.id not in defined:
            raise IRError(f"{graph.name}: output {v.name} is never defined")
        if not v.name or v.name in outputs:
            raise IRError(f"{graph.name}: output {v.name!r} is unnamed or listed twice")
        outputs[v.name] = v
    inputs = {v.name: v for v in graph.inputs}
    for slot in graph.state:
        if slot.kind not in STATE_KINDS:
            raise IRError(f"{graph.name}: state {slot.name}: unknown kind (allowed: {', '.join(STATE_KINDS)})")
        if slot.output not in outputs:
            raise IRError(f"{graph.name}: state {slot.name} names output {slot.output!r}, which does not exist")
        if slot.input is not None:
            if slot.input not in inputs:
                raise IRError(f"{graph.name}: state {slot.name} names input {slot.input!r}, which does not exist")
            before, after = inputs[slot.input].type, outputs[slot.output].type
            if before.dtype != after.dtype or before.rank != after.rank:
                raise IRError(f"{graph.name}: state {slot.name} is {before} in and {after} out")
    if len({s.name for s in graph.state}) != len(graph.state):
        raise IRError(f"{graph.name}: two state slots share a name")
    for tap in graph.taps:
        if tap.stage not in TAP_STAGES:
            raise IRError(f"{graph.name}: tap {tap}: unknown stage (allowed: {', '.join(TAP_STAGES)})")
        if tap.output not in outputs:
            raise IRError(f"{graph.name}: tap of unit {tap.unit} names output {tap.output!r}, which does not exist")
    if len({(t.unit, t.stage) for t in graph.taps}) != len(graph.taps):
        raise IRError(f"{graph.name}: two taps for the same unit and stage")
