"""The polygraphy comparison recipe that ships with an ONNX export: a data loader for the models' inputs.

NVIDIA's ``polygraphy run`` compares runtimes on one model (``--onnxrt --trt``); it needs inputs
a model accepts: token ids inside the vocabulary and a past state whose length agrees across every
KV input. umc writes ``onnx/data_loader.py`` with the concrete input shapes of each exported model
(batch 2, a prompt of 8 for prefill, 7 past tokens for decode) as data, not code: nothing from a
spec is pasted into the generated source except through ``json.dumps``.
"""

from __future__ import annotations

import json
from typing import Mapping

from umc.dtypes import BY_IR
from umc.ir.core import Graph
from umc.ir.dims import evaluate_shape

SIZES = {"prefill": {"B": 2, "T": 8, "S_past": 0}, "decode": {"B": 2, "T": 1, "S_past": 7},
         "decode_ragged": {"B": 2, "T": 1, "S_past": 7}}

TEMPLATE = '''"""polygraphy data loader for the ONNX models umc exported next to this file (generated; do not edit).

    polygraphy run decode.onnx --onnxrt --data-loader-script data_loader.py:load_decode
    polygraphy run decode.onnx --onnxrt --trt --data-loader-script data_loader.py:load_decode --atol 1e-3 --rtol 1e-3

Each load_* function yields feed dicts for one model: integers below their bound (token ids below the
vocabulary size, a ragged batch's past lengths up to the past), other inputs (past KV cache and query-conv
state) standard normal times 0.5, from a fixed seed.
"""

import numpy as np

MODELS = $models  # model file -> input name -> [numpy dtype name, concrete shape, bound of integers]


def _array(rng, dtype, shape, bound):
    if dtype == "int64":
        return rng.integers(0, bound, size=shape, dtype=np.int64)
    values = (rng.standard_normal(size=shape) * 0.5).astype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        return values.astype(ml_dtypes.bfloat16)
    return values.astype(dtype)


def load(model_file, iterations=2, seed=0):
    """Feed dicts for ``model_file`` (one of MODELS)."""
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        yield {name: _array(rng, *spec) for name, spec in MODELS[model_file].items()}
$loaders'''

LOADER = '''

def $function():
    """Feed dicts for $file."""
    return load($file_literal)
'''


def _numpy_name(ir: str, compute: str | None) -> str:
    """The numpy dtype name of an input of IR dtype ``ir`` in a model computing in ``compute``."""
    if compute and BY_IR[ir].floating:
        ir = compute
    return BY_IR[ir].torch_name


def data_loader_source(graphs: Mapping[str, Graph], vocab: int, files: Mapping[str, tuple[str, str | None]]) -> str:
    """The data loader module for exported ``files`` (file name -> (graph kind, compute dtype or None))."""
    models, loaders = {}, []
    for file, (kind, compute) in files.items():
        graph = graphs[kind]
        sizes = SIZES[kind]
        bound = lambda name: sizes["S_past"] + 1 if name == "past_len" else vocab
        models[file] = {v.name: [_numpy_name(v.type.dtype, compute), list(evaluate_shape(v.type.shape, sizes)),
                                 bound(v.name)] for v in graph.inputs}
        function = "load_" + file.removesuffix(".onnx").replace(".", "_")
        loaders.append(LOADER.replace("$function", function).replace("$file_literal", json.dumps(file))
                       .replace("$file", file))
    return (TEMPLATE.replace("$models", json.dumps(models, indent=4))
            .replace("$loaders", "".join(loaders)))
