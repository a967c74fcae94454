"""The one dtype table: each element type's spec name, IR name, size, safetensors, torch and ONNX names.

Neutral ground: the spec, the IR, the runtime and the eager reference all read it, and it
imports nothing of theirs (torch only when a torch dtype is asked for).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One element type. ``spec`` is None for types a spec cannot choose (indices, float64)."""

    ir: str
    spec: str | None
    itemsize: int
    safetensors: str
    torch_name: str
    floating: bool
    onnx: str  # the ``onnx.TensorProto`` element type name


TABLE = (
    DType("f32", "float32", 4, "F32", "float32", True, "FLOAT"),
    DType("f16", "float16", 2, "F16", "float16", True, "FLOAT16"),
    DType("bf16", "bfloat16", 2, "BF16", "bfloat16", True, "BFLOAT16"),
    DType("f64", None, 8, "F64", "float64", True, "DOUBLE"),
    DType("i64", None, 8, "I64", "int64", False, "INT64"),
    DType("i32", None, 4, "I32", "int32", False, "INT32"),
    DType("bool", None, 1, "BOOL", "bool", False, "BOOL"),
)
BY_IR = {d.ir: d for d in TABLE}
BY_SPEC = {d.spec: d for d in TABLE if d.spec}
SPEC_DTYPES = tuple(BY_SPEC)  # what a spec's ``dtype`` may be
IR_DTYPES = tuple(BY_IR)


def lookup(name: str) -> DType:
    """The entry for an IR name ("bf16") or a spec name ("bfloat16"); KeyError names the allowed ones."""
    found = BY_IR.get(name) or BY_SPEC.get(name)
    if found is None:
        raise KeyError(f"unknown dtype {name!r} (allowed: {', '.join(IR_DTYPES + SPEC_DTYPES)})")
    return found


def ir_name(spec_name: str) -> str:
    """The IR name of a spec dtype: "bfloat16" -> "bf16"."""
    return BY_SPEC[spec_name].ir


def torch_dtype(name: str):
    """The torch dtype for an IR or spec name."""
    import torch

    return getattr(torch, lookup(name).torch_name)

