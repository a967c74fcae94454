"""The IR: frozen records, symbolic dims, op registry, verifier, printer, networkx view, JSON form."""
from umc.ir.builder import GraphBuilder
from umc.ir.core import Graph, IRError, Node, Scope, StateSlot, Tap, TensorType, Value
from umc.ir.dims import Sym, format_dim, parse_dim
from umc.ir.ops import OPS, infer_types
from umc.ir.printer import format_graph
from umc.ir.serialize import graph_from_json, graph_to_json
from umc.ir.verify import verify
from umc.ir.view import to_dot, to_networkx

__all__ = ["OPS", "Graph", "GraphBuilder", "IRError", "Node", "Scope", "StateSlot", "Sym", "Tap", "TensorType", "Value",
           "format_dim", "format_graph", "graph_from_json", "graph_to_json", "infer_types", "parse_dim", "to_dot",
           "to_networkx", "verify"]
