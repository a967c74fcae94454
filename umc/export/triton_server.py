"""Triton Inference Server model repository (``umc export DIR --format triton-server``).

Made from the build's ONNX export (``umc export DIR --format onnx`` first), for Triton's onnxruntime backend:

* ``<name>_prefill``: the prefill graph, stateless: ``tokens`` [T] in, ``logits`` [T, vocab] out, with
  dynamic batching (Triton batches only requests of equal T: ``tokens`` has a variable dim and is not ragged).
* ``<name>_decode``: the decode graph with its state (KV cache, query-conv state) kept inside Triton by the
  sequence batcher's implicit state: each ``past_*`` input is fed the ``present_*`` output of the sequence's
  previous request, so a request is one token of one sequence (its correlation id), ``logits`` [1, vocab] out.

Two limits of implicit state shape the decode model (sources: triton-inference-server/core,
``sequence_state.cc``, ``sequence_batch_scheduler.cc``, ``backend_model.cc``):

* A sequence's first request gets its state with every variable dim set to 1, even with an ``initial_state``,
  so the KV cache cannot start empty (S_past = 0). The decode model is therefore the exported one plus a
  ``START`` input (the CONTROL_SEQUENCE_START control): on a sequence's first request it slices that one
  placeholder position off every growing state before the graph reads it. Fixed-shape state (conv) starts
  from ``initial_state`` zeros, which is what the decode graph reads after an empty prefix.
* Triton checks that batched requests have equal shapes only for the configured ``input`` tensors, not
  for implicit state, while the decode graph takes one S_past for its whole batch. So the decode model runs
  one sequence per execution (``max_batch_size: 1``); the oldest-first strategy keeps ``sequences``
  sequences per instance in flight and interleaves their steps.

Options (``ctx.options``; a missing or None value takes the default; other keys, the options of other formats
in the one dict ``umc export`` passes, are ignored):

* ``instances`` (int >= 1, default 1): instances of each model (``instance_group`` count, per GPU on GPUs).
* ``max_batch_size`` (int >= 1, default 8): the prefill model's largest dynamic batch.
* ``sequences`` (int >= 1, default 16): decode sequences in flight per instance (``max_candidate_sequences``).
* ``gpu`` (bool, default False): ``KIND_GPU`` instances instead of ``KIND_CPU``. CPU instances serve a
  float16/bfloat16 build's float32-compute models (``*.float32.onnx``) when the export has them.
"""

from __future__ import annotations

import re
import shutil

import onnx
from onnx import helper

from umc.dtypes import BY_IR
from umc.export import ExportContext, ExportError, export_format
from umc.ir.core import Graph, StateSlot
from umc.ir.dims import Sym, format_dim

TRITON_TYPES = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "bf16": "TYPE_BF16", "f64": "TYPE_FP64",
                "i64": "TYPE_INT64", "i32": "TYPE_INT32", "bool": "TYPE_BOOL"}
DEFAULTS = {"instances": 1, "max_batch_size": 8, "sequences": 16, "gpu": False}
START = "START"  # the decode model's sequence-start control input (int32 [B, 1]: 1 on a sequence's first request)
IDLE_MICROSECONDS = 60_000_000  # a sequence with no request for this long is ended and its state freed
NAME_MAX = 64  # characters of a model name (a directory name and part of every request URL)
PREFIX = "umc.triton/"  # names of the tensors the START slicing adds to the decode model


class Bare(str):
    """A protobuf text-format value written without quotes (an enum constant such as TYPE_FP32)."""


def model_name(spec_name: str) -> str:
    """A Triton model name from a spec name: letters, digits, ``_`` and ``-`` only (runs of anything else become
    one ``_``), not starting with ``-`` or ``_``, at most NAME_MAX characters, "model" if nothing is left.
    Triton rejects "..", "/" and blank names, and the name is a directory and a URL path segment."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", spec_name).lstrip("_-")[:NAME_MAX].rstrip("_-")
    return name or "model"


def quote(text: str) -> str:
    """A protobuf text-format string literal: printable ASCII as is, everything else (quotes, backslashes,
    newlines, non-ASCII) escaped byte by byte, so no text can end the string or add config fields."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        out.append("\\" + char if char in "\"\\" else char if 0x20 <= byte < 0x7F else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def pbtxt(message: dict, indent: str = "") -> str:
    """Protobuf text format of a message given as a dict: nested dicts are messages, lists of dicts repeated
    messages, lists of ints repeated scalars, ``Bare`` enum constants, str quoted, bool true/false."""
    lines = []
    for key, value in message.items():
        if isinstance(value, dict) and not value:
            lines.append(f"{indent}{key} {{ }}")
        elif isinstance(value, dict):
            lines += [f"{indent}{key} {{", pbtxt(value, indent + "  "), f"{indent}}}"]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            items = [f"{indent}  {{\n{pbtxt(item, indent + '    ')}\n{indent}  }}" for item in value]
            lines += [f"{indent}{key} [", ",\n".join(items), f"{indent}]"]
        elif isinstance(value, list):
            lines.append(f"{indent}{key}: [ {', '.join(str(int(v)) for v in value)} ]")
        elif isinstance(value, Bare):
            lines.append(f"{indent}{key}: {value}")
        elif isinstance(value, bool):
            lines.append(f"{indent}{key}: {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f"{indent}{key}: {quote(value)}")
        else:
            lines.append(f"{indent}{key}: {int(value)}")
    return "\n".join(lines)


def export_options(raw: dict) -> dict:
    """This format's options with defaults filled in; ExportError names a bad value."""
    options = {key: default if raw.get(key) is None else raw[key] for key, default in DEFAULTS.items()}
    for key in ("instances", "max_batch_size", "sequences"):
        if type(options[key]) is not int or options[key] < 1:
            raise ExportError(f"triton-server option {key} must be an integer >= 1, got {options[key]!r}")
    if type(options["gpu"]) is not bool:
        raise ExportError(f"triton-server option gpu must be true or false, got {options['gpu']!r}")
    return options


def served_dtype(ir: str, float32_compute: bool) -> str:
    """The IR dtype a value has in the served ONNX model: float16/bfloat16 are float32 in a float32-compute model."""
    return "f32" if float32_compute and BY_IR[ir].floating and ir != "f64" else ir


def triton_dims(shape: tuple, where: str) -> list[int]:
    """Config dims of an IR shape: the batch dim B dropped (max_batch_size > 0), every other symbolic dim -1."""
    if not shape or format_dim(shape[0]) != "B":
        raise ExportError(f"{where}: the first dim is not the batch size B, so Triton cannot batch it")
    return [-1 if isinstance(d, Sym) else d for d in shape[1:]]


def growing_axis(graph: Graph, slot: StateSlot) -> int | None:
    """The axis along which a decode state grows by one position per step (S_past -> S_past+1), if any."""
    before, after = graph.input(slot.input).type.shape, graph.output(slot.output).type.shape
    return next((axis for axis, (a, b) in enumerate(zip(before, after)) if a != b), None)


def io_entry(graph: Graph, name: str, output: bool, float32_compute: bool) -> dict:
    """A config ``input``/``output`` entry for the graph value ``name``."""
    value = graph.output(name) if output else graph.input(name)
    dtype = served_dtype(value.type.dtype, float32_compute)
    return {"name": name, "data_type": Bare(TRITON_TYPES[dtype]),
            "dims": triton_dims(value.type.shape, f"{graph.name} {name}")}


def instance_kind(options: dict) -> str:
    """The instances' kind: KIND_GPU or KIND_CPU."""
    return "KIND_GPU" if options["gpu"] else "KIND_CPU"


def instance_group(options: dict) -> list[dict]:
    """The ``instance_group`` of both models."""
    return [{"count": options["instances"], "kind": Bare(instance_kind(options))}]


def prefill_config(name: str, graph: Graph, options: dict, float32_compute: bool) -> dict:
    """The prefill model's config: stateless, dynamic batching, ``logits`` the only output served."""
    return {"name": name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "max_batch_size": options["max_batch_size"],
            "input": [io_entry(graph, "tokens", False, float32_compute)],
            "output": [io_entry(graph, "logits", True, float32_compute)],
            "dynamic_batching": {}, "instance_group": instance_group(options)}


def decode_config(name: str, graph: Graph, options: dict, float32_compute: bool) -> dict:
    """The decode model's config: one sequence per execution, the START control, and every state slot as
    implicit state starting from zeros (variable dims as the 1 Triton gives a sequence's first request)."""
    states = []
    for slot in graph.state:
        value = graph.input(slot.input)
        dtype = Bare(TRITON_TYPES[served_dtype(value.type.dtype, float32_compute)])
        dims = triton_dims(value.type.shape, f"{graph.name} {slot.input}")
        initial = {"data_type": dtype, "dims": [1 if d == -1 else d for d in dims], "zero_data": True,
                   "name": f"{slot.name} zeros"}
        states.append({"input_name": slot.input, "output_name": slot.output, "data_type": dtype, "dims": dims,
                       "initial_state": [initial]})
    start = {"kind": Bare("CONTROL_SEQUENCE_START"), "int32_false_true": [0, 1]}
    return {"name": name, "platform": "onnxruntime_onnx", "backend": "onnxruntime", "max_batch_size": 1,
            "input": [io_entry(graph, "tokens", False, float32_compute)],
            "output": [io_entry(graph, "logits", True, float32_compute)],
            "sequence_batching": {"max_sequence_idle_microseconds": IDLE_MICROSECONDS,
                                  "oldest": {"max_candidate_sequences": options["sequences"]},
                                  "control_input": [{"name": START, "control": [start]}], "state": states},
            "instance_group": instance_group(options)}


def add_start_input(model: onnx.ModelProto, graph: Graph) -> None:
    """Give the decode model the START input: where it is 1 (a sequence's first request, batch of one), every
    growing state input loses its first position along the growing axis before any node reads it."""
    slices = {slot.input: axis for slot in graph.state if (axis := growing_axis(graph, slot)) is not None}
    nodes = [helper.make_node("Cast", [START], [PREFIX + "start"], to=onnx.TensorProto.INT64),
             helper.make_node("Reshape", [PREFIX + "start", PREFIX + "one"], [PREFIX + "starts"])]
    constants = [helper.make_tensor(PREFIX + "one", onnx.TensorProto.INT64, [1], [1]),
                 helper.make_tensor(PREFIX + "ends", onnx.TensorProto.INT64, [1], [2**63 - 1])]
    for axis in sorted(set(slices.values())):
        constants.append(helper.make_tensor(f"{PREFIX}axis{axis}", onnx.TensorProto.INT64, [1], [axis]))
    for name, axis in slices.items():
        nodes.append(helper.make_node("Slice", [name, PREFIX + "starts", PREFIX + "ends", f"{PREFIX}axis{axis}"],
                                      [PREFIX + name]))
    _rename_uses(model.graph, {name: PREFIX + name for name in slices})
    body = nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(body)
    model.graph.initializer.extend(constants)
    batch = format_dim(graph.input("tokens").type.shape[0])
    model.graph.input.append(helper.make_tensor_value_info(START, onnx.TensorProto.INT32, [batch, 1]))


def _rename_uses(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Point every node input (subgraphs included) named in ``renames`` at its new name."""
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename_uses(sub, renames)


def check_model_io(model: onnx.ModelProto, config: dict, graph: Graph, float32_compute: bool, where: str) -> None:
    """ExportError unless the ONNX model has exactly the inputs the config implies (served inputs, controls,
    state inputs: Triton's onnxruntime backend counts them) and every tensor the config names with the
    graph's element type and dims."""
    batching = config.get("sequence_batching", {})
    wanted = {entry["name"]: graph.input(entry["name"]) for entry in config["input"]}
    wanted |= {entry["name"]: graph.output(entry["name"]) for entry in config["output"]}
    for state in batching.get("state", []):
        wanted |= {state["input_name"]: graph.input(state["input_name"]),
                   state["output_name"]: graph.output(state["output_name"])}
    declared = {v.name: v.type.tensor_type for v in [*model.graph.input, *model.graph.output]}
    for name, value in wanted.items():
        dtype = served_dtype(value.type.dtype, float32_compute)
        element = getattr(onnx.TensorProto, BY_IR[dtype].onnx)
        dims = [-1 if isinstance(d, Sym) else d for d in value.type.shape]
        found = declared.get(name)
        if found is None or found.elem_type != element or \
                [d.dim_value if d.HasField("dim_value") else -1 for d in found.shape.dim] != dims:
            raise ExportError(f"{where}: the model does not declare {name} as {dtype}{dims}; "
                              "run `umc export DIR --format onnx` again")
    expected = {entry["name"] for entry in config["input"]} | {s["input_name"] for s in batching.get("state", [])}
    expected |= {control["name"] for control in batching.get("control_input", [])}
    inputs = {v.name for v in model.graph.input} - {t.name for t in model.graph.initializer}
    if inputs != expected:
        raise ExportError(f"{where}: the model's inputs {sorted(inputs)} are not the ones served {sorted(expected)}")


def external_files(model: onnx.ModelProto, build, where: str) -> list[str]:
    """The files (in ``<build>/onnx/``) holding the model's external weights; ExportError unless each is a plain
    file name the build's manifest lists (an export without weights references a file it never wrote)."""
    names = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.add(next(entry.value for entry in tensor.external_data if entry.key == "location"))
    for name in sorted(names):
        if "/" in name or "\\" in name or name.startswith("."):
            raise ExportError(f"{where}: external weights file {name!r} is not a file next to the model")
        if f"onnx/{name}" not in build.manifest["artifacts"]:
            raise ExportError(f"{where} keeps its weights in {name}, which the build does not have (an export "
                              "of a build without weights); compile with --weights and export to onnx again")
    return sorted(names)


@export_format("triton-server", "triton-server")
def write(ctx: ExportContext) -> None:
    """A Triton Inference Server model repository: ``<name>_prefill`` (stateless, dynamic batching) and
    ``<name>_decode`` (sequence batcher with the KV and conv state as implicit state), each
    ``config.pbtxt`` plus ``1/model.onnx`` from the ONNX export, and a README (see the module docstring)."""
    build = ctx.build
    options = export_options(ctx.options)
    artifacts = build.manifest["artifacts"]
    if not all(f"onnx/{kind}.onnx" in artifacts for kind in ("prefill", "decode")):
        raise ExportError(f"{build.path} has no ONNX export (onnx/prefill.onnx, onnx/decode.onnx); "
                          "run `umc export DIR --format onnx` first")
    float32_compute = not options["gpu"] and "onnx/prefill.float32.onnx" in artifacts
    suffix = ".float32" if float32_compute else ""
    name = model_name(build.spec.name)
    for kind, make in {"prefill": prefill_config, "decode": decode_config}.items():
        graph = build.graphs[kind]
        source = build.path / "onnx" / f"{kind}{suffix}.onnx"
        where = f"onnx/{source.name}"
        if where not in artifacts:
            raise ExportError(f"{build.path} has no {where}; run `umc export DIR --format onnx` again")
        model = onnx.load(source, load_external_data=False)
        config = make(f"{name}_{kind}", graph, options, float32_compute)
        if kind == "decode":
            add_start_input(model, graph)
        check_model_io(model, config, graph, float32_compute, where)
        version = ctx.out / config["name"] / "1"
        version.mkdir(parents=True)
        for file in external_files(model, build, where):
            shutil.copyfile(build.path / "onnx" / file, version / file)
        if kind == "decode":
            onnx.save_model(model, version / "model.onnx")
            onnx.checker.check_model(str(version / "model.onnx"))
        else:
            shutil.copyfile(source, version / "model.onnx")
        (version.parent / "config.pbtxt").write_text(pbtxt(config) + "\n")
    (ctx.out / "README.md").write_text(readme(name, build, options, suffix))
    ctx.say(f"wrote Triton models {name}_prefill and {name}_decode (onnxruntime backend, "
            f"{options['instances']} {instance_kind(options)} instance(s) each)")
    ctx.say("not run: no Triton server was started here; the configs follow Triton's model-config schema")


def readme(name: str, build, options: dict, suffix: str) -> str:
    """The repository's README: what it holds, the batching and state design and its limits, how to serve it."""
    decode = build.graphs["decode"]
    growing = [s.input for s in decode.state if growing_axis(decode, s) is not None]
    fixed = [s.input for s in decode.state if growing_axis(decode, s) is None]
    variant = f": float32-compute models of a {build.spec.dtype} build, for CPU instances" if suffix else ""
    vocab = decode.output("logits").type.shape[-1]
    max_len = build.spec.model.max_seq_len
    return f"""# Triton Inference Server model repository: {name}

Written by `umc export DIR --format triton-server` from the build's ONNX export (`onnx/prefill{suffix}.onnx`,
`onnx/decode{suffix}.onnx`{variant}) for Triton's onnxruntime backend, {options['instances']}
`{instance_kind(options)}` instance(s) per model (on each GPU, for GPU instances).

```
{name}_prefill/config.pbtxt
{name}_prefill/1/model.onnx      the prefill graph, as exported (plus its external weights file, if any)
{name}_decode/config.pbtxt
{name}_decode/1/model.onnx       the decode graph plus a START input (see below)
```

A model with external weights has its own copy of the weights file next to its `model.onnx` (the
onnxruntime backend loads the model by path and resolves external data from its directory).

## {name}_prefill: stateless, dynamic batching

`tokens` (int64, [T]) in, `logits` ([T, {vocab}]) out, up to {options['max_batch_size']} requests per execution.
Triton batches only requests of equal length T (`tokens` has a variable dim and is not ragged). Scoring a
whole text in one request is what it is for: its KV cache cannot seed a decode sequence (Triton's implicit
state is filled only by the model that owns it).

## {name}_decode: sequence batcher, implicit state

One request is one token (`tokens` int64 [1]) of one sequence, named by its correlation id (`sequence_id`);
the first request of a sequence sets `sequence_start`, the last `sequence_end` (that frees its state).
`logits` ([1, {vocab}]) out; with the batch dim a request's `tokens` has shape [1, 1]. Triton keeps the
state between requests: {len(growing)} KV tensors that grow one position per step (`{growing[0]}` to
`{growing[-1]}`) and {len(fixed)} fixed-size state tensors; each `past_*` input is fed the `present_*` output
of the previous request. A prompt is therefore sent one token per request (the logits of the last one
predict the next token).

Why this shape:

- **The KV cache cannot start empty.** Triton gives a sequence's first request its state with every
  variable dim set to 1, whatever `initial_state` says (core `sequence_state.cc`). The decode model here
  is the exported one plus a `START` input (control `CONTROL_SEQUENCE_START`, int32): on a first request it
  slices that placeholder position off every growing state, so the graph sees an empty cache. Fixed-size
  state starts from `initial_state` zeros, which is the state after an empty prefix.
- **One sequence per execution** (`max_batch_size: 1`). The decode graph has one past length for its whole
  batch, and Triton checks equal shapes only for configured inputs, not implicit state, so batching
  sequences of different lengths would be wrong. The oldest-first strategy keeps
  {options['sequences']} sequences per instance in flight and interleaves their steps.
- **Separate input and output state buffers** (no `use_same_buffer_for_input_output`, no
  `use_growable_memory`): the growable option works only with `KIND_GPU` and a shared buffer, and the
  onnxruntime backend copies each output into the state buffer anyway. Every step copies the whole KV cache.

Limits: Triton does not enforce the spec's `max_seq_len` ({max_len} tokens); end a sequence before it.
A sequence idle for {IDLE_MICROSECONDS // 1_000_000} s is ended by Triton. Selection taps and state outputs
are not served. No TensorRT `model.plan` is written (it must be built on the serving GPU).

## Serving

```
tritonserver --model-repository /path/to/build/triton-server
```

(for example in the `nvcr.io/nvidia/tritonserver:<yy.mm>-py3` container, with this directory mounted).
Triton loads the model directories and ignores this README.

Not run here: no Triton server was started when this repository was written. umc's tests parse configs
written this way with Triton's model-config protobuf schema and feed the decode model the way the sequence
batcher does, with ONNX Runtime.
"""
