"""IR records, printer, verifier, JSON form and networkx view, on small hand-built graphs."""

import dataclasses

import networkx as nx
import pytest

from umc.ir import GraphBuilder, IRError, TensorType, format_graph, graph_from_json, graph_to_json, to_dot, to_networkx, verify
from umc.ir.core import Value


def small_graph():
    b = GraphBuilder("tiny")
    x = b.input("x", TensorType("f32", ("B", "T", 8)))
    w = b.param("w", "f32", (4, 8))
    b.scope = "demo"
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
        "  %2 = umc.linear(%0, %1) : f32[B,T,4]  # demo\n"
        "  %3, %4 = umc.topm(%2) {k=2} : f32[B,T,2], i64[B,T,2]  # demo\n"
        "  return values=%3, indices=%4\n"
        "}\n"
    )


def test_verifier_accepts_and_json_roundtrips():
    graph = verify(small_graph())
    again = graph_from_json(graph_to_json(graph))
    assert again == graph
    assert format_graph(again) == format_graph(graph)


def test_verifier_rejects_a_wrong_declared_type():
    graph = small_graph()
    node = graph.nodes[0]
    bad_out = Value(node.outputs[0].id, TensorType("f32", ("B", "T", 5)))
    with pytest.raises(IRError, match="type rule gives"):
        verify(graph.evolve(nodes=(dataclasses.replace(node, outputs=(bad_out,)), *graph.nodes[1:])))


def test_verifier_rejects_use_before_definition():
    graph = small_graph()
    with pytest.raises(IRError, match="before it is defined"):
        verify(graph.evolve(nodes=tuple(reversed(graph.nodes))))


def test_verifier_rejects_double_definition():
    graph = small_graph()
    first = graph.nodes[0]
    with pytest.raises(IRError, match="defined twice"):
        verify(graph.evolve(nodes=(first, first, *graph.nodes[1:])))


def test_verifier_rejects_unknown_ops_and_bad_shapes():
    b = GraphBuilder("bad")
    x = b.input("x", TensorType("f32", ("B", 8)))
    w = b.param("w", "f32", (4, 7))
    with pytest.raises(IRError, match="linear"):
        b.emit("linear", x, w)
    with pytest.raises(IRError, match="unknown op"):
        b.emit("no_such_op", x)


def test_load_time_nodes_may_not_read_per_call_values():
    graph = small_graph()
    with pytest.raises(IRError, match="load-time"):
        verify(graph.evolve(init_nodes=graph.nodes[:1], nodes=graph.nodes[1:]))


def test_networkx_view_and_dot():
    graph = small_graph()
    view = to_networkx(graph)
    assert isinstance(view, nx.MultiDiGraph) and nx.is_directed_acyclic_graph(view)
    order = [n for n in nx.topological_sort(view) if n[0] == "node"]
    assert order == [("node", 0), ("node", 1)]
    dot = to_dot(graph)
    assert dot.startswith('digraph "tiny"') and "topm" in dot
