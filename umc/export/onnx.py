"""ONNX export: a build's optimized prefill and decode graphs as ONNX models (``umc export DIR --format onnx``).

Standard ONNX ops (opset 21) for the dense decoder; every memory-layer op is a node in domain ``umc``
with a model-local function holding its decomposition, written from the op's IR decomposition (so
ONNX Runtime runs the model as is, and TensorRT can bind a plugin to the node instead). Inputs and
outputs keep the IR graphs' names; batch, sequence and past length are symbolic (B, T, S_past).

Weights are initializers named as in ``weights.safetensors``. They are stored in the models unless
they exceed ``EMBED_LIMIT`` (or ``external_data`` is asked for): then both models reference one
shared ``weights.bin`` (ONNX external data). A build without weights (a big spec compiled from
shapes only) exports its structure: initializers reference ``weights.bin``, which is not written.
Load-time folds stay in the model as nodes on initializers (runtimes fold them once at load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from umc import __version__
from umc.export import ExportContext, ExportError, export_format
from umc.export.onnx_emit import DOMAIN, OPSET, FunctionTable, OnnxScope, numpy_dtype_of
from umc.export.polygraphy import data_loader_source
from umc.ir.core import Graph, TensorType
from umc.ir.dims import format_dim

EMBED_LIMIT = 1 << 30  # bytes of weights kept inside a model; above it, external data (protobuf's limit is 2 GiB)
WEIGHTS_FILE = "weights.bin"
ALIGN = 64  # bytes; external tensors start on this boundary (memory-mapping friendly)
LOW_PRECISION = ("f16", "bf16")


def value_info(name: str, type_: TensorType, scope: OnnxScope) -> onnx.ValueInfoProto:
    """An input/output declaration: element type and dims (symbolic dims as their text, e.g. S_past+1)."""
    dims = [d if isinstance(d, int) else format_dim(d) for d in type_.shape]
    return helper.make_tensor_value_info(name, scope.element_type(type_.dtype), dims)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array of the same element type, without a copy where the tensor is contiguous
    on the CPU (bfloat16 through ml_dtypes, by its bits)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(numpy_dtype_of("bf16"))
    return tensor.numpy()


def weight_array(tensor: torch.Tensor, type_: TensorType, scope: OnnxScope) -> np.ndarray:
    """A weight as a numpy array of the model's element type (upcast in a float32-compute model)."""
    return as_numpy(tensor).astype(scope.numpy_dtype(type_.dtype), copy=False)


def external_layout(params, scope: OnnxScope) -> dict[str, tuple[int, int]]:
    """Offset and length of each weight in ``weights.bin`` (in params order, aligned)."""
    layout, offset = {}, 0
    for v in params:
        length = int(np.prod(v.type.shape, dtype=np.int64)) * scope.numpy_dtype(v.type.dtype).itemsize
        layout[v.name] = (offset, length)
        offset += -(-length // ALIGN) * ALIGN
    return layout


def external_tensor(name: str, type_: TensorType, scope: OnnxScope, location: str, offset: int,
                    length: int) -> onnx.TensorProto:
    """An initializer whose data lives in file ``location`` (next to the model) at ``offset``."""
    tensor = onnx.TensorProto(name=name, data_type=scope.element_type(type_.dtype), dims=list(type_.shape))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def graph_model(graph: Graph, weights: Mapping[str, torch.Tensor] | None, compute: str | None = None,
                layout: Mapping[str, tuple[int, int]] | None = None, meta: Mapping[str, str] | None = None,
                location: str = WEIGHTS_FILE) -> onnx.ModelProto:
    """The ONNX model of one IR graph. ``compute`` = "f32" writes low-precision values as float32 (ONNX Runtime's
    CPU provider has no bfloat16 MatMul); ``layout`` places weights in ``weights.bin`` instead of the model
    (``weights`` None and no layout: weights become external references with a computed layout)."""
    functions = FunctionTable(compute)
    scope = OnnxScope(functions, first_id=graph.next_id())
    inputs = [value_info(v.name, v.type, scope) for v in graph.inputs]
    for v in graph.inputs:
        scope.input(v.name, v.type, v)
    if layout is None and weights is None:
        layout = external_layout(graph.params, scope)
    initializers = []
    for v in graph.params:
        scope.names[v.id] = v.name
        if layout is not None:
            initializers.append(external_tensor(v.name, v.type, scope, location, *layout[v.name]))
        else:
            initializers.append(numpy_helper.from_array(weight_array(weights[v.name], v.type, scope), v.name))
    for node in graph.all_nodes():
        scope.emit_as(node.op, node.inputs, dict(node.attrs), node.outputs)
    outputs = [value_info(scope.output_name(v, v.name), v.type, scope) for v in graph.outputs]
    body = helper.make_graph(scope.nodes, graph.name, inputs, outputs, initializer=initializers)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                              functions=list(functions.functions.values()), ir_version=10, producer_name="umc",
                              producer_version=__version__)
    helper.set_model_props(model, {"umc.graph": graph.name, "umc.compute_dtype": compute or "storage", **(meta or {})})
    return model


def structure_check(model: onnx.ModelProto) -> None:
    """``onnx.checker`` (full check: types and shape inference) on a model whose weights are external references
    to a file that is not there: the same model with those weights as graph inputs instead."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]:
        copy.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        copy.graph.initializer.remove(tensor)
    onnx.checker.check_model(copy, full_check=True)


def check_umc_functions(model: onnx.ModelProto, where: str) -> None:
    """ExportError unless every ``umc`` node (in the graph and inside functions) has its local function: without
    one no runtime can run the node, and ONNX Runtime would fail with an opaque message."""
    defined = {(f.domain, f.name, f.overload) for f in model.functions}
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        if node.domain == DOMAIN and (node.domain, node.op_type, node.overload) not in defined:
            raise ExportError(f"{where}: node {node.name} ({DOMAIN}::{node.op_type}, overload {node.overload!r}) has no "
                              "local function; re-export the build with umc export --format onnx")


def _write_weights(path: Path, params, weights, scope: OnnxScope, layout) -> None:
    """``weights.bin``: each weight at its layout offset."""
    with open(path, "wb") as f:
        for v in params:
            offset, _ = layout[v.name]
            f.seek(offset)
            f.write(weight_array(weights[v.name], v.type, scope).tobytes())


def _shared_params(graphs: Mapping[str, Graph]):
    """The weights of all graphs, each once, in first-use order."""
    seen = {}
    for graph in graphs.values():
        for v in graph.params:
            seen.setdefault(v.name, v)
    return list(seen.values())


def export_models(graphs: Mapping[str, Graph], weights: Mapping[str, torch.Tensor] | None, out: Path, *,
                  compute: str | None = None, suffix: str = "", external: bool = False,
                  meta: Mapping[str, str] | None = None) -> list[str]:
    """Write ``<kind><suffix>.onnx`` for each graph into ``out`` (and the shared weights file when weights go
    outside); every model passes the full checker. Returns the file names written."""
    params = _shared_params(graphs)
    probe = OnnxScope(FunctionTable(compute))
    total = sum(int(np.prod(v.type.shape, dtype=np.int64)) * probe.numpy_dtype(v.type.dtype).itemsize for v in params)
    layout = external_layout(params, probe) if weights is None or external or total > EMBED_LIMIT else None
    written = []
    location = f"weights{suffix}.bin"
    if layout is not None and weights is not None:
        _write_weights(out / location, params, weights, probe, layout)
        written.append(location)
    for kind, graph in graphs.items():
        model = graph_model(graph, weights, compute, layout, meta, location)
        name = f"{kind}{suffix}.onnx"
        onnx.save_model(model, out / name)
        if weights is None:
            structure_check(model)
        else:
            onnx.checker.check_model(str(out / name), full_check=True)
        written.append(name)
    return written


@export_format("onnx", "onnx")
def write_onnx(ctx: ExportContext) -> None:
    """prefill.onnx and decode.onnx in the spec's dtype; for float16/bfloat16 builds also the float32-compute
    variant (prefill.float32.onnx, decode.float32.onnx) that ONNX Runtime's CPU provider can run."""
    build = ctx.build
    dtype = build.graphs["decode"].output("logits").type.dtype
    meta = {"umc.spec": json.dumps(build.spec.name), "umc.dtype": dtype,
            "umc.weights": "embedded or weights.bin" if ctx.weights is not None else "none: structure only"}
    external = bool(ctx.options.get("external_data"))
    written = export_models(build.graphs, ctx.weights, ctx.out, external=external, meta=meta)
    files = {f"{kind}.onnx": (kind, None) for kind in build.graphs}
    if dtype in LOW_PRECISION:
        written += export_models(build.graphs, ctx.weights, ctx.out, compute="f32", suffix=".float32",
                                 external=external, meta=meta)
        files.update({f"{kind}.float32.onnx": (kind, "f32") for kind in build.graphs})
        ctx.say(f"{dtype} build: *.float32.onnx compute in float32 (ONNX Runtime's CPU provider has no {dtype} MatMul); "
                "the onnxruntime backend runs them on the CPU")
    if ctx.weights is None:
        ctx.say(f"no weights in the build: the models reference {WEIGHTS_FILE}, which was not written "
                "(structure only; export again from a build with weights)")
    (ctx.out / "data_loader.py").write_text(data_loader_source(build.graphs, build.spec.model.vocab_size, files))
    (ctx.out / "README.md").write_text(readme(build.graphs, dtype, ctx.weights is not None))
    ctx.say(f"wrote {', '.join(written)}, data_loader.py (polygraphy inputs), README.md")


def _signature(graph: Graph) -> list[str]:
    """Markdown table rows of a graph's inputs and outputs."""
    rows = [f"| in | `{v.name}` | {v.type} |" for v in graph.inputs]
    rows += [f"| out | `{v.name}` | {v.type} |" for v in graph.outputs]
    return rows


def readme(graphs: Mapping[str, Graph], dtype: str, with_weights: bool) -> str:
    """README.md of the export: the models' inputs and outputs, where weights are, the polygraphy recipe."""
    lines = ["# ONNX export (written by umc export --format onnx)", "",
             f"Opset {OPSET}; memory-layer ops are nodes in domain `{DOMAIN}` with model-local functions (their "
             "decompositions into standard ops), so any ONNX runtime runs the models unchanged and TensorRT can bind "
             "a plugin to a node instead. Dims: B batch, T new tokens, S_past tokens already in the KV cache.", "",
             "Weights: " + ("inside each model, or in the shared weights.bin when large." if with_weights else
                            "not exported (structure only): initializers reference weights.bin, which is absent."), ""]
    if dtype in LOW_PRECISION:
        lines += [f"The build is {dtype}: `*.onnx` keep it (for TensorRT); `*.float32.onnx` compute in float32 "
                  "(ONNX Runtime's CPU provider has no bfloat16 MatMul).", ""]
    for kind, graph in graphs.items():
        lines += [f"## {kind}.onnx", "", "| | name | type |", "|---|---|---|", *_signature(graph), ""]
    lines += ["## Comparing runtimes with polygraphy", "",
              "    polygraphy run decode.onnx --onnxrt --data-loader-script data_loader.py:load_decode",
              "    polygraphy run decode.onnx --onnxrt --trt --data-loader-script data_loader.py:load_decode "
              "--atol 1e-3 --rtol 1e-3", "",
              "The first line runs here (umc's tests run it on the CPU); the second needs TensorRT and a GPU.", ""]
    return "\n".join(lines)
