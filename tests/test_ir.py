"""IR records, dims, printer, verifier, JSON form and networkx view, on small hand-built graphs."""

import dataclasses
import json

import networkx as nx
import pytest
import torch

from graph_inputs import run_graph
from umc.ir import GraphBuilder, IRError, Scope, TensorType, format_graph, graph_from_json, graph_to_json, to_dot, to_networkx, verify
from umc.ir.core import Value
from umc.ir.dims import DimError, Sym, bind, evaluate, parse_dim

B, T = Sym.of("B"), Sym.of("T")


def small_graph():
    b = GraphBuilder("tiny")
    x = b.input("x", TensorType("f32", (B, T, 8)))
    w = b.param("w", "f32", (4, 8))
    b.scope = Scope("ffn", block=0)
    y = b.one("linear", x, w)
    values, indices = b.emit("topm", y, k=2)
    return b.build({"values": values, "indices": indices})


def test_printer_one_node_per_line():
    text = format_graph(small_graph())
    assert text == (
        "graph tiny(\n"
        "    %0 x: f32[B,T,8],\n"
        ") {\n"
        "  param %1 w: f32[4,8]\n"
        "  %2 = umc.linear(%0, %1) : f32[B,T,4]  # block0.ffn\n"
        "  %3, %4 = umc.topm(%2) {k=2} : f32[B,T,2], i64[B,T,2]  # block0.ffn\n"
        "  return values=%3, indices=%4\n"
        "}\n"
    )


def test_dims_are_canonical_polynomials():
    assert parse_dim("S_past+1") == parse_dim("1 + S_past") and str(parse_dim("1+S_past")) == "S_past+1"
    assert parse_dim("B*T") == parse_dim("T*B") == B * T
    assert parse_dim("2*B+3") - 3 == 2 * B and (B - B) == 0 and isinstance(B - B, int)
    assert evaluate(parse_dim("B*T+S_past"), {"B": 2, "T": 3, "S_past": 1}) == 7
    for bad in ("", "B+", "2**B", "B/2", "1B"):
        with pytest.raises(DimError):
            parse_dim(bad)
    with pytest.raises(DimError, match="not bound"):
        evaluate(B, {})
    sizes = {}
    assert bind((B, parse_dim("B*2")), (3, 6), sizes) is None and sizes == {"B": 3}
    assert "B = 4 here but 3 elsewhere" in bind((B,), (4,), sizes)


def test_reshape_binds_symbols_by_name():
    """[T, B, 4] of a (B, T, 4) tensor with B=2, T=3 is T rows of B: shape (3, 2, 4), as declared."""
    b = GraphBuilder("r")
    x = b.input("x", TensorType("f32", (B, T, 4)))
    graph = b.build({"y": b.one("reshape", x, shape=(T, B, 4))})
    data = torch.arange(24.0).view(2, 3, 4)
    assert run_graph(graph, {}, {"x": data})["y"].shape == (3, 2, 4)
    with pytest.raises(IRError, match="cannot become"):
        b.one("reshape", x, shape=(B, 4, 4))


def test_cast_changes_the_dtype_and_ops_refuse_mixed_dtypes():
    b = GraphBuilder("c")
    x = b.input("x", TensorType("bf16", (B, 4)))
    wide = b.one("cast", x, to="f32")
    assert wide.type == TensorType("f32", (B, 4))
    with pytest.raises(IRError, match="dtypes differ"):
        b.one("add", x, wide)
    with pytest.raises(IRError, match="attribute to"):
        b.one("cast", x, to="f128")


def test_verifier_accepts_and_json_roundtrips():
    graph = verify(small_graph())
    again = graph_from_json(json.loads(json.dumps(graph_to_json(graph))))
    assert again == graph
    assert format_graph(again) == format_graph(graph)


def test_verifier_rejects_a_wrong_declared_type():
    graph = small_graph()
    node = graph.nodes[0]
    bad_out = Value(node.outputs[0].id, TensorType("f32", (B, T, 5)))
    with pytest.raises(IRError, match="type rule gives"):
        verify(graph.evolve(nodes=(dataclasses.replace(node, outputs=(bad_out,)), *graph.nodes[1:])))


def test_verifier_rejects_use_before_definition_and_double_definition():
    graph = small_graph()
    with pytest.raises(IRError, match="before it is defined"):
        verify(graph.evolve(nodes=tuple(reversed(graph.nodes))))
    first = graph.nodes[0]
    with pytest.raises(IRError, match="defined twice"):
        verify(graph.evolve(nodes=(first, first, *graph.nodes[1:])))


def test_attribute_schema_is_checked_when_building():
    b = GraphBuilder("bad")
    x = b.input("x", TensorType("f32", (B, 8)))
    with pytest.raises(IRError, match="unknown attribute kk"):
        b.emit("topm", x, kk=2)
    with pytest.raises(IRError, match="missing attribute k"):
        b.emit("topm", x)
    with pytest.raises(IRError, match=r"attribute k is 0 \(allowed: an integer >= 1\)"):
        b.emit("topm", x, k=0)
    with pytest.raises(IRError, match="attribute k is '2'"):
        b.emit("topm", x, k="2")
    with pytest.raises(IRError, match="unknown op 'no_such_op'"):
        b.emit("no_such_op", x)
    with pytest.raises(IRError, match="operands"):
        b.emit("linear", x)


def test_load_time_nodes_may_not_read_per_call_values():
    graph = small_graph()
    with pytest.raises(IRError, match="load-time"):
        verify(graph.evolve(init_nodes=graph.nodes[:1], nodes=graph.nodes[1:]))


def branch_graph(read_late: bool):
    """A branch forked from x adds to it a value of the main stream: x itself, or (``read_late``) y = x*x,
    which the main stream computes after the fork; joined at the end."""
    b = GraphBuilder("streams")
    x = b.input("x", TensorType("f32", (B, 4)))
    b.scope, b.stream = Scope("fork", unit=0), 1
    forked = b.one("fork", x, branch=1)
    b.scope, b.stream = Scope("ffn", block=0), 0
    y = b.one("mul", x, x)
    b.scope, b.stream = Scope("query", unit=0), 1
    z = b.one("add", forked, y if read_late else forked)
    b.scope, b.stream = Scope("residual", unit=0), 0
    return b.build({"out": b.one("join_add", y, z, branch=1)})


def test_streams_are_checked():
    graph = verify(branch_graph(read_late=False))
    with pytest.raises(IRError, match="defined on the main stream after the fork"):
        verify(branch_graph(read_late=True))
    misplaced = graph.evolve(nodes=tuple(dataclasses.replace(n, stream=0) if n.op == "fork" else n for n in graph.nodes))
    with pytest.raises(IRError, match="forks branch 1 but is on stream 0"):
        verify(misplaced)
    unforked = graph.evolve(nodes=tuple(n for n in graph.nodes if n.op != "fork"))
    with pytest.raises(IRError, match="starts stream 1 but is not its fork"):
        verify(unforked.evolve(nodes=tuple(dataclasses.replace(n, inputs=(graph.inputs[0],) * 2) if n.op == "add" else n
                                           for n in unforked.nodes)))


@pytest.mark.parametrize("forge, message", [
    (lambda d: d["nodes"][0].update(op="no_such_op"), "unknown op"),
    (lambda d: d["nodes"][0].pop("attrs"), "missing key 'attrs'"),
    (lambda d: d["nodes"][1].update(inputs=[999]), "%999 is read but never defined"),
    (lambda d: d["nodes"][1].update(attrs=[["k", "two"]]), "attribute k is 'two'"),
    (lambda d: d["nodes"][1].update(attrs=[["k", 2], ["x", 1]]), "unknown attribute x"),
    (lambda d: d["inputs"][0].update(shape=["B", "T+", 8]), "cannot read dim"),
    (lambda d: d["nodes"][0]["scope"].update(part="nowhere"), "unknown scope part"),
    (lambda d: d.update(nodes="junk"), "malformed graph JSON"),
    (lambda d: d["outputs"][0].update(name="indices"), "listed twice"),
])
def test_forged_graph_json_is_one_clear_error(forge, message):
    data = json.loads(json.dumps(graph_to_json(small_graph())))
    forge(data)
    with pytest.raises(IRError, match=message):
        graph_from_json(data)


def test_networkx_view_and_dot():
    graph = small_graph()
    view = to_networkx(graph)
    assert isinstance(view, nx.MultiDiGraph) and nx.is_directed_acyclic_graph(view)
    order = [n for n in nx.topological_sort(view) if n[0] == "node"]
    assert order == [("node", 0), ("node", 1)]
    dot = to_dot(graph)
    assert dot.startswith('digraph "tiny"') and "topm" in dot
