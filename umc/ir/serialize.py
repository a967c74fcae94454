"""Graphs to and from JSON (the build directory's machine-readable IR).

Reading is defensive: a build directory is input from disk, so a malformed or forged graph
(unknown op, missing key, dangling value id, bad attribute) is one IRError naming what is
wrong, and every graph read is verified before anyone runs it.
"""

from __future__ import annotations

from typing import Any

from umc.ir.core import Graph, IRError, Node, Scope, StateSlot, Tap, TensorType, Value
from umc.ir.dims import DimError, Sym, format_dim, parse_dim
from umc.ir.ops import check_attrs
from umc.ir.verify import verify


def _encode(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, Sym):
        return format_dim(value)
    return value


def _value(v: Value) -> dict[str, Any]:
    return {"id": v.id, "dtype": v.type.dtype, "shape": _encode(v.type.shape), "name": v.name}


def _scope(scope: Scope) -> dict[str, Any]:
    return {"part": scope.part, "block": scope.block, "unit": scope.unit}


def graph_to_json(graph: Graph) -> dict[str, Any]:
    """Plain data for json.dumps."""
    node = lambda n: {"op": n.op, "inputs": [v.id for v in n.inputs], "outputs": [_value(v) for v in n.outputs],
                      "attrs": [[k, _encode(v)] for k, v in n.attrs], "scope": _scope(n.scope), "stream": n.stream}
    return {
        "name": graph.name,
        "inputs": [_value(v) for v in graph.inputs],
        "params": [_value(v) for v in graph.params],
        "init_nodes": [node(n) for n in graph.init_nodes],
        "nodes": [node(n) for n in graph.nodes],
        "outputs": [{"id": v.id, "name": v.name} for v in graph.outputs],
        "state": [{"kind": s.kind, "index": s.index, "input": s.input, "output": s.output} for s in graph.state],
        "taps": [{"unit": t.unit, "stage": t.stage, "output": t.output} for t in graph.taps],
        "meta": [[k, _encode(v)] for k, v in graph.meta],
    }


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise IRError(f"{what} is {value!r}, expected an integer")
    return value


def _decode(data: dict[str, Any]) -> Graph:
    values: dict[int, Value] = {}

    def make(d: dict[str, Any]) -> Value:
        if not isinstance(d["shape"], list):
            raise IRError(f"value {d.get('id')!r} has shape {d['shape']!r}, expected a list of dims")
        shape = tuple(parse_dim(s) for s in d["shape"])
        v = Value(_int(d["id"], "a value id"), TensorType(str(d["dtype"]), shape), str(d["name"]))
        values[v.id] = v
        return v

    def read(value_id: Any) -> Value:
        if value_id not in values:
            raise IRError(f"value %{value_id} is read but never defined")
        return values[value_id]

    inputs = tuple(make(d) for d in data["inputs"])
    params = tuple(make(d) for d in data["params"])

    def node(d: dict[str, Any]) -> Node:
        op = str(d["op"])
        ins = tuple(read(i) for i in d["inputs"])
        outs = tuple(make(o) for o in d["outputs"])
        attrs = check_attrs(op, {str(k): _freeze(v) for k, v in d["attrs"]})
        scope = d["scope"]
        where = lambda key: None if scope[key] is None else _int(scope[key], f"a scope's {key}")
        return Node(op, ins, outs, tuple(sorted(attrs.items())), Scope(str(scope["part"]), where("block"), where("unit")),
                    _int(d["stream"], "a stream"))

    init_nodes = tuple(node(d) for d in data["init_nodes"])
    nodes = tuple(node(d) for d in data["nodes"])
    outputs = tuple(Value(read(o["id"]).id, read(o["id"]).type, str(o["name"])) for o in data["outputs"])
    state = tuple(StateSlot(str(s["kind"]), _int(s["index"], "a state index"), str(s["output"]),
                            None if s["input"] is None else str(s["input"])) for s in data["state"])
    taps = tuple(Tap(_int(t["unit"], "a tap unit"), str(t["stage"]), str(t["output"])) for t in data["taps"])
    meta = tuple((str(k), _freeze(v)) for k, v in data["meta"])
    return Graph(str(data["name"]), inputs, params, init_nodes, nodes, outputs, meta, state, taps)


def graph_from_json(data: Any) -> Graph:
    """Inverse of graph_to_json, verified; IRError (never KeyError/TypeError) on malformed data."""
    try:
        graph = _decode(data)
    except IRError:
        raise
    except DimError as exc:
        raise IRError(f"malformed graph JSON: {exc}") from None
    except KeyError as exc:
        raise IRError(f"malformed graph JSON: missing key {exc}") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as exc:
        raise IRError(f"malformed graph JSON: {exc}") from None
    return verify(graph)
