"""The "onnxruntime" backend: a build's exported ONNX models (``umc export DIR --format onnx``) in ONNX Runtime.

For a build, it runs the files the export wrote and the manifest lists (their hashes were checked
when the build was loaded); a build without them is an error telling the user to export first.
Graphs without a build (a golden layer, a slice of a build) are exported in memory by the same
exporter. Weights are always the session's: each initializer is handed to ONNX Runtime as an
external initializer, so structure-only exports run too and nothing is read twice.

ONNX Runtime's CPU provider has no bfloat16 MatMul, so float16/bfloat16 builds run their
float32-compute models (``*.float32.onnx``) on the CPU: inputs are widened and outputs rounded
back to the build's dtype, so the session sees the same types as with any other backend. Where
the CUDA provider is available the storage-dtype models run on it. Skip-layer branches may
overlap: ORT's parallel executor is used when ``threads`` is on, the graph has branches and the machine has
``PARALLEL_MIN_CORES`` cores (it did not pay on 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from umc.dtypes import torch_dtype
from umc.ir.core import Graph
from umc.manifest import parse_manifest
from umc.runtime.backends import Backend, BackendError, register_backend

# ORT's parallel executor (skip-layer branches alongside the main stream) measured slower on 2 cores (tiny decode,
# batch 1: 2.79 ms against 2.50 ms sequential, medians of 40 interleaved steps), so it is used from 4 cores up
PARALLEL_MIN_CORES = 4


def _providers(ort) -> list[str]:
    """CUDA first when this ONNX Runtime has it, then the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@register_backend
class OnnxRuntimeBackend(Backend):
    """Runs exported ONNX models through ``onnxruntime.InferenceSession``."""

    name = "onnxruntime"

    @classmethod
    def unavailable(cls) -> str | None:
        """Why not here: onnxruntime or onnx not installed."""
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"{exc.name} is not installed (pip install onnxruntime onnx)"
        return None

    def __init__(self, graphs: Mapping[str, Graph], weights: Mapping[str, torch.Tensor], threads: bool = True,
                 artifacts: Path | None = None):
        super().__init__(graphs, weights, threads, artifacts)
        import onnxruntime as ort

        self.ort = ort
        self.providers = _providers(ort)
        self.on_cpu = self.providers[0] == "CPUExecutionProvider"
        listed = parse_manifest(artifacts)["artifacts"] if artifacts is not None else {}
        self.sessions = {}
        self.keep_alive = []
        for kind, graph in graphs.items():
            model, compute = self._model(kind, graph, listed, weights)
            self.sessions[kind] = (self._session(model, graph, weights, compute), compute)

    def _model(self, kind: str, graph: Graph, listed: Mapping[str, str], weights):
        """(ModelProto without weight data, compute dtype) of graph ``kind``: the build's export, or an in-memory one."""
        import onnx

        from umc.export.onnx import LOW_PRECISION, check_umc_functions, graph_model

        low = any(v.type.dtype in LOW_PRECISION for v in (*graph.inputs, *graph.outputs))
        compute = "f32" if low and self.on_cpu else None
        name = f"onnx/{kind}{'.float32' if compute else ''}.onnx"
        if self.artifacts is not None and kind in ("prefill", "decode"):
            if name not in listed:
                raise BackendError(f"{self.artifacts}: no {name} in the build; run `umc export {self.artifacts} --format onnx` first")
            path = self.artifacts / name
            model = onnx.load(str(path), load_external_data=False)
            check_umc_functions(model, str(path))
            return model, compute
        return graph_model(graph, None, compute), compute

    def _session(self, model, graph: Graph, weights: Mapping[str, torch.Tensor], compute: str | None):
        """An InferenceSession of ``model`` with every weight supplied from memory (as external initializers)."""
        import onnx

        from umc.export.onnx import WEIGHTS_FILE

        ort = self.ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        if self.threads and any(n.stream for n in graph.nodes) and (os.cpu_count() or 1) >= PARALLEL_MIN_CORES:
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            options.inter_op_num_threads = 2
        names, values = [], []
        for tensor in model.graph.initializer:
            if tensor.name not in weights:
                continue
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "external_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", WEIGHTS_FILE), ("offset", "0"), ("length", "0")):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            array = self._array(weights[tensor.name], compute)
            self.keep_alive.append(array)
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
        options.add_external_initializers(names, values)
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for a model it cannot load
            raise BackendError(f"ONNX Runtime cannot load the {graph.name} model: {str(exc).splitlines()[0][:300]}") from None

    @staticmethod
    def _array(tensor: torch.Tensor, compute: str | None):
        """A weight or input as a contiguous numpy array of the model's type (low precision widened in f32 models)."""
        from umc.export.onnx import as_numpy

        if tensor.dtype in (torch.float16, torch.bfloat16) and compute == "f32":
            tensor = tensor.float()
        return as_numpy(tensor)

    def run(self, kind: str, feeds: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
            force: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every named output of graph ``kind`` (ONNX Runtime cannot force selections: BackendError if asked)."""
        if force:
            raise BackendError("the onnxruntime backend cannot force selections (only the graph backend can)")
        session, compute = self.sessions[kind]
        arrays = {name: self._array(value, compute) for name, value in feeds.items()}
        outputs = session.run(None, arrays)
        result = {}
        for value, array in zip(self.graphs[kind].outputs, outputs):
            tensor = torch.from_numpy(array) if array.dtype.kind != "V" else torch.from_numpy(array.view("int16")).view(torch.bfloat16)
            result[value.name] = tensor.to(torch_dtype(value.type.dtype))
        return result
