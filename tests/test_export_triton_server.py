"""The Triton Inference Server repository writer (umc.export.triton_server).

Every generated config.pbtxt is parsed with Triton's own model-config protobuf schema (tritonclient) and
compared with the build's IR graphs; the decode model is run the way Triton's sequence batcher feeds it
(config-driven: implicit state initialized as Triton does, START on the first request) with ONNX Runtime.
The ONNX export is either the real exporter (umc.export.onnx, when importable) or stand-in models with the
same names, dtypes and dims, so these tests run either way. No Triton server is started.
"""

import dataclasses
import importlib
import importlib.util
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from umc.compiler import compile as compile_spec
from umc.export import FORMATS, ExportContext, ExportError
from umc.export.triton_server import model_name, quote
from umc.ir.dims import format_dim
from umc.manifest import file_sha256
from umc.reference import build_model, save_weights
from umc.runtime.session import load_weights_file, read_build
from umc.spec import load_spec

from conftest import SPECS

REAL_EXPORTER = importlib.util.find_spec("umc.export.onnx") is not None
EXPORTS = ["stand-in", pytest.param("onnx-exporter", marks=pytest.mark.skipif(
    not REAL_EXPORTER, reason="umc.export.onnx does not exist yet (the stand-in export runs instead)"))]
TRITON_TYPES = {"f32": mc.TYPE_FP32, "f16": mc.TYPE_FP16, "bf16": mc.TYPE_BF16, "i64": mc.TYPE_INT64}
ONNX_TYPES = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
              "i64": TensorProto.INT64}
NUMPY_TYPES = {"f32": np.float32, "i64": np.int64}


# --- builds and ONNX exports -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """The tiny spec compiled with weights (float32)."""
    root = tmp_path_factory.mktemp("triton")
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    save_weights(build_model(spec, seed=0), root / "weights.safetensors")
    compile_spec(spec, root / "build", weights=root / "weights.safetensors")
    return root / "build"


@pytest.fixture(scope="module")
def bf16_build(tmp_path_factory):
    """The tiny spec in bfloat16, compiled from shapes only."""
    root = tmp_path_factory.mktemp("triton-bf16")
    text = (SPECS / "ultramem-tiny.yaml").read_text().replace("dtype: float32", "dtype: bfloat16")
    assert "dtype: bfloat16" in text
    (root / "spec.yaml").write_text(text)
    compile_spec(root / "spec.yaml", root / "build")
    return root / "build"


def list_in_manifest(build_dir, names):
    """Add files of the build to its manifest (what ``umc export`` does for the files it writes)."""
    manifest = json.loads((build_dir / "manifest.json").read_text())
    for name in names:
        manifest["artifacts"][name] = file_sha256(build_dir / name)
    (build_dir / "manifest.json").write_text(json.dumps(manifest))


def growing_axis(graph, slot):
    before, after = graph.input(slot.input).type.shape, graph.output(slot.output).type.shape
    return next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), None)


def stand_in_model(graph, float32=False, weights=None):
    """An ONNX model with the graph's inputs and outputs (names, element types, symbolic dims as text). Decode
    state it can run: a growing state gets the token appended along its growing axis (so the state is the
    token history), a fixed-size state gets the token added; every other output is the token broadcast."""
    def elem(v):
        ir = "f32" if float32 and v.type.dtype in ("f16", "bf16") else v.type.dtype
        return ONNX_TYPES[ir]

    def decl(v):
        return helper.make_tensor_value_info(v.name, elem(v), [d if isinstance(d, int) else format_dim(d)
                                                              for d in v.type.shape])

    nodes, inits = [], []
    carried = {slot.output: slot for slot in graph.state if slot.input}
    for k, v in enumerate(graph.outputs):
        rank = len(v.type.shape)
        shape = helper.make_tensor(f"shape{k}", TensorProto.INT64, [rank], [-1] + [1] * (rank - 1))
        inits.append(shape)
        nodes += [helper.make_node("Reshape", ["tokens", shape.name], [f"tok{k}"]),
                  helper.make_node("Cast", [f"tok{k}"], [f"val{k}"], to=elem(v))]
        slot = carried.get(v.name)
        axis = growing_axis(graph, slot) if slot else None
        if slot and axis is None:
            nodes.append(helper.make_node("Add", [slot.input, f"val{k}"], [v.name]))
            continue
        dims = [1] + [1 if not isinstance(d, int) or i + 1 == axis else d for i, d in enumerate(v.type.shape[1:])]
        inits.append(helper.make_tensor(f"expand{k}", TensorProto.INT64, [rank], dims))
        out = f"new{k}" if slot else v.name
        nodes.append(helper.make_node("Expand", [f"val{k}", f"expand{k}"], [out]))
        if slot:
            nodes.append(helper.make_node("Concat", [slot.input, out], [v.name], axis=axis))
    if weights:
        tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", weights), ("offset", "0"), ("length", "16")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        inits.append(tensor)
    body = helper.make_graph(nodes, graph.name, [decl(v) for v in graph.inputs], [decl(v) for v in graph.outputs],
                             initializer=inits)
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def with_export(build_dir, target, kind="stand-in", weights_file="weights.bin", float32_variant=False, edit=None):
    """A copy of the build at ``target`` with an ONNX export in onnx/ listed in its manifest: the real exporter's
    (kind "onnx-exporter", weights in weights.bin) or stand-ins (``edit(kind, model)`` may break them)."""
    shutil.copytree(build_dir, target)
    (target / "onnx").mkdir()
    build = read_build(target)
    if kind == "onnx-exporter":
        importlib.import_module("umc.export.onnx")  # registers the format
        weights = load_weights_file(target / "weights.safetensors")
        FORMATS["onnx"].write(ExportContext(build, target / "onnx", weights, {"external_data": True}))
    else:
        for suffix, float32 in [("", False)] + [(".float32", True)] * float32_variant:
            for graph_kind, graph in build.graphs.items():
                model = stand_in_model(graph, float32, weights_file)
                if edit:
                    edit(graph_kind, model)
                onnx.save_model(model, target / "onnx" / f"{graph_kind}{suffix}.onnx")
        if weights_file:
            (target / "onnx" / weights_file).write_bytes(np.arange(4, dtype=np.float32).tobytes())
    list_in_manifest(target, sorted(f"onnx/{f.name}" for f in (target / "onnx").iterdir()))
    return target


def write_repository(build_dir, **options):
    """Run the registered triton-server writer into <build>/triton-server; returns (out dir, messages)."""
    out = build_dir / "triton-server"
    out.mkdir()
    ctx = ExportContext(read_build(build_dir), out, None, options)
    FORMATS["triton-server"].write(ctx)
    return out, ctx.messages


def parse(path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def config_dims(shape):
    """Triton dims of an IR shape: batch dropped, symbolic dims -1 (written out here, not imported)."""
    assert format_dim(shape[0]) == "B"
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


# --- the repository against the build ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", EXPORTS)
def test_configs_parse_and_match_the_graphs(tiny_build, tmp_path, kind):
    build_dir = with_export(tiny_build, tmp_path / "b", kind)
    out, messages = write_repository(build_dir)
    build = read_build(build_dir)
    assert FORMATS["triton-server"].subdir == "triton-server"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "ultramem-tiny_decode", "ultramem-tiny_prefill"]
    assert any("not run" in m for m in messages)

    prefill = parse(out / "ultramem-tiny_prefill" / "config.pbtxt")
    decode = parse(out / "ultramem-tiny_decode" / "config.pbtxt")
    for config in (prefill, decode):
        assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
        assert [(g.count, g.kind) for g in config.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]
        graph = build.graphs[config.name.rsplit("_", 1)[1]]
        for entry, value in [(e, graph.input(e.name)) for e in config.input] + \
                            [(e, graph.output(e.name)) for e in config.output]:
            assert entry.data_type == TRITON_TYPES[value.type.dtype], entry.name
            assert list(entry.dims) == config_dims(value.type.shape), entry.name

    assert prefill.max_batch_size == 8 and prefill.HasField("dynamic_batching")
    assert not prefill.HasField("sequence_batching")
    assert [e.name for e in prefill.input] == ["tokens"] and list(prefill.input[0].dims) == [-1]
    assert [e.name for e in prefill.output] == ["logits"] and list(prefill.output[0].dims) == [-1, 512]

    # decode: one sequence per execution, oldest-first, START control, every state slot as implicit state
    assert decode.max_batch_size == 1 and not decode.HasField("dynamic_batching")
    batching = decode.sequence_batching
    assert batching.HasField("oldest") and batching.oldest.max_candidate_sequences == 16
    assert batching.max_sequence_idle_microseconds == 60_000_000
    [control] = batching.control_input
    assert control.name == "START"
    assert [(c.kind, list(c.int32_false_true)) for c in control.control] == \
        [(mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START, [0, 1])]
    graph = build.graphs["decode"]
    pairs = {s.input_name: s.output_name for s in batching.state}
    assert pairs == {slot.input: slot.output for slot in graph.state} and len(pairs) == 10
    assert all(out_name == "present_" + in_name.removeprefix("past_") for in_name, out_name in pairs.items())
    for state in batching.state:
        value = graph.input(state.input_name)
        assert state.data_type == TRITON_TYPES[value.type.dtype]
        assert list(state.dims) == config_dims(value.type.shape)
        assert list(state.dims) == ([2, -1, 16] if "_k." in state.input_name or "_v." in state.input_name
                                    else [2, 64])
        assert not state.use_same_buffer_for_input_output and not state.use_growable_memory
        [initial] = state.initial_state
        assert initial.zero_data and initial.name and initial.data_type == state.data_type
        assert list(initial.dims) == [1 if d == -1 else d for d in state.dims]

    # what Triton's onnxruntime backend checks when it loads each model
    for config in (prefill, decode):
        version = out / config.name / "1"
        model = onnx.load(version / "model.onnx", load_external_data=False)
        declared = {v.name: v for v in [*model.graph.input, *model.graph.output]}
        for entry in [*config.input, *config.output]:
            tensor = declared[entry.name].type.tensor_type
            assert [-1 if d.dim_param else d.dim_value for d in tensor.shape.dim] == [-1, *entry.dims]
            assert tensor.elem_type == {mc.TYPE_FP32: TensorProto.FLOAT, mc.TYPE_INT64: TensorProto.INT64}[
                entry.data_type], entry.name
        expected = {e.name for e in config.input} | {s.input_name for s in config.sequence_batching.state}
        expected |= {c.name for c in config.sequence_batching.control_input}
        assert {v.name for v in model.graph.input} == expected
        assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "weights.bin"]
        assert (version / "weights.bin").read_bytes() == (build_dir / "onnx" / "weights.bin").read_bytes()
    start = {v.name: v for v in onnx.load(out / "ultramem-tiny_decode" / "1" / "model.onnx",
                                          load_external_data=False).graph.input}["START"].type.tensor_type
    assert start.elem_type == TensorProto.INT32 and [d.dim_param or d.dim_value for d in start.shape.dim] == ["B", 1]

    readme = (out / "README.md").read_text()
    for needle in ("tritonserver --model-repository", "ultramem-tiny_decode", "implicit state", "START",
                   "max_batch_size: 1", "Not run here", "max_seq_len"):
        assert needle in readme, needle


def run_like_triton(model_path, config, tokens, first_start=1, placeholder=0.0):
    """Feed ``tokens`` (one per request) through the decode model as Triton's sequence batcher does, driven by
    the parsed config: first-request state of the initial_state dims (batch 1) and zeros, the START control
    1 on the first request only, each next past_* the previous present_*. ``placeholder`` fills the growing
    states' first-request position (Triton's zero_data, or garbage to show it is never read)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    states = config.sequence_batching.state
    past = {}
    for state in states:
        past[state.input_name] = np.zeros([1, *state.initial_state[0].dims], np.float32)
        if -1 in state.dims:
            past[state.input_name][:] = placeholder
    logits, history = [], []
    for step, token in enumerate(tokens):
        start = np.array([[first_start if step == 0 else 0]], np.int32)
        outputs = session.run(["logits"] + [s.output_name for s in states],
                              {"tokens": np.array([[token]], np.int64), "START": start, **past})
        logits.append(outputs[0][:, 0])
        past = {s.input_name: value for s, value in zip(states, outputs[1:])}
        history.append(past)
    return np.stack(logits, axis=1), history


def test_stand_in_decode_starts_from_an_empty_cache(tiny_build, tmp_path):
    """The START slicing: Triton's 1-long first-request KV state never reaches the graph (the stand-in appends
    each token to its growing states, so after n requests they must hold exactly the n tokens)."""
    out, _ = write_repository(with_export(tiny_build, tmp_path / "b"))
    model = out / "ultramem-tiny_decode" / "1" / "model.onnx"
    config = parse(out / "ultramem-tiny_decode" / "config.pbtxt")
    tokens = [5, 9, 13]
    _, history = run_like_triton(model, config, tokens, placeholder=7.0)
    for n, past in enumerate(history, start=1):
        assert past["past_k.0"].shape == (1, 2, n, 16)
        assert (past["past_k.3"][0, 1, :, 0] == tokens[:n]).all()
        assert (past["past_conv.1"] == sum(tokens[:n])).all()  # fixed-size state from initial_state zeros
    _, broken = run_like_triton(model, config, tokens, first_start=0, placeholder=7.0)  # injected: no START
    assert broken[-1]["past_k.0"].shape == (1, 2, 4, 16) and broken[-1]["past_k.0"][0, 0, 0, 0] == 7.0


@pytest.mark.skipif(not REAL_EXPORTER, reason="umc.export.onnx does not exist yet")
def test_exported_decode_served_like_triton_matches_prefill(tiny_build, tmp_path):
    """Real models: token-by-token decode through implicit state gives the prefill model's logits."""
    out, _ = write_repository(with_export(tiny_build, tmp_path / "b", "onnx-exporter"))
    config = parse(out / "ultramem-tiny_decode" / "config.pbtxt")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    prefill = ort.InferenceSession(str(out / "ultramem-tiny_prefill" / "1" / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    tokens = [5, 9, 13, 2, 77]
    full = prefill.run(["logits"], {"tokens": np.array([tokens], np.int64)})[0]
    model = out / "ultramem-tiny_decode" / "1" / "model.onnx"
    for placeholder in (0.0, 7.0):
        stepped, _ = run_like_triton(model, config, tokens, placeholder=placeholder)
        np.testing.assert_allclose(stepped, full, rtol=0, atol=1e-5)
    stepped, _ = run_like_triton(model, config, tokens, first_start=0, placeholder=7.0)  # injected: no START
    assert np.abs(stepped - full).max() > 1e-3


# --- options, names, missing or mismatched exports ---------------------------------------------------------

def test_options_reach_the_configs(tiny_build, tmp_path):
    out, _ = write_repository(with_export(tiny_build, tmp_path / "b"), instances=3, max_batch_size=4,
                              sequences=5, gpu=True, external_data=True, build_engine=False)
    prefill = parse(out / "ultramem-tiny_prefill" / "config.pbtxt")
    decode = parse(out / "ultramem-tiny_decode" / "config.pbtxt")
    assert prefill.max_batch_size == 4 and decode.max_batch_size == 1
    assert decode.sequence_batching.oldest.max_candidate_sequences == 5
    for config in (prefill, decode):
        assert [(g.count, g.kind) for g in config.instance_group] == [(3, mc.ModelInstanceGroup.KIND_GPU)]


@pytest.mark.parametrize("options, message", [
    ({"instances": 0}, "instances must be an integer >= 1"),
    ({"max_batch_size": True}, "max_batch_size must be an integer >= 1"),
    ({"sequences": "4"}, "sequences must be an integer >= 1"),
    ({"gpu": "yes"}, "gpu must be true or false"),
])
def test_bad_options_are_refused(tiny_build, tmp_path, options, message):
    build_dir = with_export(tiny_build, tmp_path / "b")
    with pytest.raises(ExportError, match=message):
        write_repository(build_dir, **options)


def test_low_precision_build_serves_float32_models_on_cpu(bf16_build, tmp_path):
    build_dir = with_export(bf16_build, tmp_path / "b", float32_variant=True)
    out, _ = write_repository(build_dir)
    config = parse(out / "ultramem-tiny_decode" / "config.pbtxt")
    assert config.output[0].data_type == mc.TYPE_FP32
    assert "float32-compute models of a bfloat16 build" in (out / "README.md").read_text()
    assert {s.data_type for s in config.sequence_batching.state} == {mc.TYPE_FP32}
    assert (out / "ultramem-tiny_prefill" / "1" / "model.onnx").read_bytes() == \
        (build_dir / "onnx" / "prefill.float32.onnx").read_bytes()
    shutil.rmtree(out)
    out, _ = write_repository(build_dir, gpu=True)
    config = parse(out / "ultramem-tiny_decode" / "config.pbtxt")
    assert config.output[0].data_type == mc.TYPE_BF16 and config.input[0].data_type == mc.TYPE_INT64
    assert {s.data_type for s in config.sequence_batching.state} == {mc.TYPE_BF16}
    assert (out / "ultramem-tiny_prefill" / "1" / "model.onnx").read_bytes() == \
        (build_dir / "onnx" / "prefill.onnx").read_bytes()


@pytest.mark.parametrize("spec_name, expected", [
    ('evil"\n}\ninstance_group [ { kind: KIND_GPU } ]', "evil_instance_group_kind_KIND_GPU"),
    ("../../etc/passwd", "etc_passwd"),
    ("  ", "model"),
    ("-rf model", "rf_model"),
    ("modèle.v2", "mod_le_v2"),
    ("x" * 300, "x" * 64),
])
def test_spec_names_are_sanitized(tiny_build, tmp_path, spec_name, expected):
    """Nothing of a spec's name reaches a config or a path unsanitized (a name the spec parser would refuse,
    e.g. with a newline, is injected past it)."""
    assert model_name(spec_name) == expected
    build_dir = with_export(tiny_build, tmp_path / "b")
    build = read_build(build_dir)
    build = dataclasses.replace(build, spec=dataclasses.replace(build.spec, name=spec_name))
    out = tmp_path / "repo"
    out.mkdir()
    FORMATS["triton-server"].write(ExportContext(build, out, None, {}))
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", f"{expected}_decode", f"{expected}_prefill"])
    for kind in ("prefill", "decode"):
        config = parse(out / f"{expected}_{kind}" / "config.pbtxt")
        assert config.name == f"{expected}_{kind}"
        assert [(g.count, g.kind) for g in config.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]
    if spec_name.strip():
        assert spec_name not in (out / "README.md").read_text()


@pytest.mark.parametrize("text", ['a"b', "back\\slash", "new\nline", "é ü 模型", "\x00\x7f", "} name: \"x"])
def test_quoted_strings_parse_back_exactly(text):
    assert text_format.Parse(f"name: {quote(text)}", mc.ModelConfig()).name == text


def test_build_without_onnx_export_is_refused(tiny_build, tmp_path):
    build_dir = tmp_path / "b"
    shutil.copytree(tiny_build, build_dir)
    with pytest.raises(ExportError, match="run `umc export DIR --format onnx` first"):
        write_repository(build_dir)
    # ONNX files on disk that the manifest does not list are not an export either
    other = tmp_path / "c"
    with_export(tiny_build, other)
    shutil.copy(tiny_build / "manifest.json", other / "manifest.json")
    with pytest.raises(ExportError, match="run `umc export DIR --format onnx` first"):
        write_repository(other)


def test_export_without_its_weights_file_is_refused(tiny_build, tmp_path):
    """A structure-only export references weights.bin without writing it."""
    build_dir = with_export(tiny_build, tmp_path / "b")
    manifest = json.loads((build_dir / "manifest.json").read_text())
    del manifest["artifacts"]["onnx/weights.bin"]
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="keeps its weights in weights.bin, which the build does not have"):
        write_repository(build_dir)


def test_models_without_weights_file_have_none_copied(tiny_build, tmp_path):
    out, _ = write_repository(with_export(tiny_build, tmp_path / "b", weights_file=None))
    assert sorted(p.name for p in (out / "ultramem-tiny_prefill" / "1").iterdir()) == ["model.onnx"]


def rename_output(kind, model):
    if kind == "decode":
        model.graph.output[1].name = "present_k.0_renamed"


def retype_logits(kind, model):
    if kind == "prefill":
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE


def fix_past_length(kind, model):
    if kind == "decode":
        model.graph.input[1].type.tensor_type.shape.dim[2].dim_value = 8


def extra_input(kind, model):
    if kind == "prefill":
        model.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "T"]))


@pytest.mark.parametrize("edit, message", [
    (rename_output, "onnx/decode.onnx: the model does not declare present_k.0 as f32"),
    (retype_logits, "onnx/prefill.onnx: the model does not declare logits as f32"),
    (fix_past_length, r"onnx/decode.onnx: the model does not declare past_k.0 as f32\[-1, 2, -1, 16\]"),
    (extra_input, r"onnx/prefill.onnx: the model's inputs \['mask', 'tokens'\] are not the ones served"),
])
def test_onnx_models_that_do_not_match_the_graphs_are_refused(tiny_build, tmp_path, edit, message):
    build_dir = with_export(tiny_build, tmp_path / "b", edit=edit)
    with pytest.raises(ExportError, match=message):
        write_repository(build_dir)
