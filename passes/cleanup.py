"""Cleanup: load-time constant folding (weight-only nodes move to the load-time section), CSE, DCE,
and load-time folds in float32.

In float16/bfloat16 builds the load-time section (key LayerNorm, K_u, folded scales) is
recomputed in float32 from the stored weights and each result that per-call nodes read is cast
once to the build's dtype (DESIGN.md §5: accumulate in fp32), so folding adds one rounding, not
one per folded step.
"""

from __future__ import annotations

from umc.ir.core import Graph, Node, Value
from umc.ir.ops import check_attrs, infer_types
from umc.ir.verify import verify
from umc.passes.editor import Editor, eliminate_dead_code

LOW_PRECISION = ("f16", "bf16")


def cleanup(graph: Graph) -> tuple[Graph, list[str]]:
    """Hoist weight-only nodes to load time, merge identical nodes, fold in float32, drop dead ones."""
    editor = Editor(graph)
    seen: dict[tuple, tuple] = {}
    hoisted = merged = 0
    for node in graph.nodes:
        inputs = tuple(editor.resolve(v) for v in node.inputs)
        key = (node.op, tuple(v.id for v in inputs), node.attrs, node.stream)
        if key in seen:
            for old, new in zip(node.outputs, seen[key]):
                editor.replace(old, new)
            merged += 1
            continue
        if editor.is_weight_only(node):
            seen[key] = editor.copy(node)
            hoisted += 1
            continue
        seen[key] = editor.keep(node).outputs
    result = editor.finish()
    removed = len(graph.nodes) + len(graph.init_nodes) - len(result.nodes) - len(result.init_nodes) - merged
    widened = 0
    if any(v.type.dtype in LOW_PRECISION for n in result.init_nodes for v in n.outputs):
        result, widened = fold_in_float32(result)
    notes = []
    if hoisted:
        notes.append(f"moved {hoisted} weight-only nodes to load time")
    if merged:
        notes.append(f"merged {merged} duplicate nodes")
    if widened:
        notes.append(f"{widened} load-time folds computed in float32, each result cast once")
    if removed > 0:
        notes.append(f"removed {removed} dead nodes")
    return result, notes


def fold_in_float32(graph: Graph) -> tuple[Graph, int]:
    """The graph with its low-precision load-time nodes recomputed in float32 (casts in, one cast out each)."""
    next_id = graph.next_id()
    wide: dict[int, Value] = {}  # low-precision value id -> its float32 version
    nodes: list[Node] = []

    def emit(op: str, inputs: tuple[Value, ...], attrs: dict, like: Node) -> tuple[Value, ...]:
        nonlocal next_id
        types = infer_types(op, tuple(v.type for v in inputs), attrs)
        outs = tuple(Value(next_id + i, t) for i, t in enumerate(types))
        next_id += len(outs)
        nodes.append(Node(op, inputs, outs, tuple(sorted(check_attrs(op, attrs).items())), like.scope))
        return outs

    def widen(v: Value, like: Node) -> Value:
        if v.type.dtype not in LOW_PRECISION:
            return v
        if v.id not in wide:
            (wide[v.id],) = emit("cast", (v,), {"to": "f32"}, like)
        return wide[v.id]

    widened = 0
    for node in graph.init_nodes:
        if node.op == "cast" or not any(v.type.dtype in LOW_PRECISION for v in (*node.inputs, *node.outputs)):
            nodes.append(node)  # already float32 (or a cast placed by an earlier run): nothing to widen
            continue
        outs = emit(node.op, tuple(widen(v, node) for v in node.inputs), dict(node.attrs), node)
        wide.update({old.id: new for old, new in zip(node.outputs, outs)})
        widened += 1
    narrowed: dict[int, Value] = {}
    init_outputs = {v.id: (v, n) for n in graph.init_nodes for v in n.outputs}
    read = {v.id for n in graph.nodes for v in n.inputs} | {v.id for v in graph.outputs}
    for v_id in sorted(read & set(init_outputs)):
        value, producer = init_outputs[v_id]
        if value.id in wide and wide[value.id].type.dtype != value.type.dtype:
            (narrowed[v_id],) = emit("cast", (wide[value.id],), {"to": value.type.dtype}, producer)
    swap = lambda v: narrowed.get(v.id, v)
    main = tuple(Node(n.op, tuple(map(swap, n.inputs)), n.outputs, n.attrs, n.scope, n.stream) for n in graph.nodes)
    outputs = tuple(Value(swap(v).id, v.type, v.name) for v in graph.outputs)
    return verify(eliminate_dead_code(graph.evolve(init_nodes=tuple(nodes), nodes=main, outputs=outputs))), widened
