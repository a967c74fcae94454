"""The IR: frozen records, op registry, verifier, printer, networkx view, JSON form."""
from umc.ir.builder import GraphBuilder
from umc.ir.core import Graph, IRError, Node, TensorType, Value
from umc.ir.ops import OPS, infer_types
from umc.ir.printer import format_graph
from umc.ir.serialize import graph_from_json, graph_to_json
from umc.ir.verify import verify
from umc.ir.view import to_dot, to_networkx

__all__ = ["OPS", "Graph", "GraphBuilder", "IRError", "Node", "TensorType", "Value", "format_graph",
           "graph_from_json", "graph_to_json", "infer_types", "to_dot", "to_networkx", "verify"]
