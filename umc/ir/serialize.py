"""Graphs to and from JSON (the build directory's machine-readable IR)."""

from __future__ import annotations

from typing import Any

from umc.ir.core import Graph, Node, TensorType, Value


def _value(v: Value) -> dict[str, Any]:
    return {"id": v.id, "dtype": v.type.dtype, "shape": list(v.type.shape), "name": v.name}


def graph_to_json(graph: Graph) -> dict[str, Any]:
    """Plain data for json.dumps."""
    node = lambda n: {"op": n.op, "inputs": [v.id for v in n.inputs], "outputs": [_value(v) for v in n.outputs],
                      "attrs": [[k, v] for k, v in n.attrs], "scope": n.scope, "stream": n.stream}
    return {
        "name": graph.name,
        "inputs": [_value(v) for v in graph.inputs],
        "params": [_value(v) for v in graph.params],
        "init_nodes": [node(n) for n in graph.init_nodes],
        "nodes": [node(n) for n in graph.nodes],
        "outputs": [{"id": v.id, "name": v.name} for v in graph.outputs],
        "meta": [[k, v] for k, v in graph.meta],
    }


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def graph_from_json(data: dict[str, Any]) -> Graph:
    """Inverse of graph_to_json."""
    values: dict[int, Value] = {}

    def make(d: dict[str, Any]) -> Value:
        v = Value(d["id"], TensorType(d["dtype"], tuple(d["shape"])), d["name"])
        values[v.id] = v
        return v

    inputs = tuple(make(d) for d in data["inputs"])
    params = tuple(make(d) for d in data["params"])

    def node(d: dict[str, Any]) -> Node:
        ins = tuple(values[i] for i in d["inputs"])
        outs = tuple(make(o) for o in d["outputs"])
        return Node(d["op"], ins, outs, tuple((k, _freeze(v)) for k, v in d["attrs"]), d["scope"], d["stream"])

    init_nodes = tuple(node(d) for d in data["init_nodes"])
    nodes = tuple(node(d) for d in data["nodes"])
    outputs = tuple(Value(values[o["id"]].id, values[o["id"]].type, o["name"]) for o in data["outputs"])
    return Graph(data["name"], inputs, params, init_nodes, nodes, outputs, tuple((k, _freeze(v)) for k, v in data["meta"]))
