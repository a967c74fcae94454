"""ONNX export and the onnxruntime backend.

Every op, lowered alone to ONNX and run in ONNX Runtime, against its torch implementation (primitives) or its
decomposition (composites, tie-aware), float32; whole tiny builds exported and verified through ONNX Runtime
against the eager model (float32 and bfloat16) and the golden layers; the model with its functions inlined
computes the same; shape inference recovers every output shape; bad models and interrupted exports fail
cleanly; the external-data, structure-only and polygraphy paths run.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import SPECS, golden_files
from graph_inputs import random_inputs, run_graph
from op_samples import SIZES, assert_close, cast_floats, check_instance, run_impl, sample_inputs
from test_decompositions import EXAMPLES, example_specs
from umc.cli import main
from umc.compiler import compile as compile_spec
from umc.export import ExportError
from umc.export.install import export
from umc.export.onnx import check_umc_functions, graph_model
from umc.ir.builder import GraphBuilder
from umc.ir.core import TensorType
from umc.ir.dims import Sym
from umc.ir.expand import expand
from umc.ir.ops import OPS
from umc.lower import lower
from umc.manifest import file_sha256, read_manifest
from umc.passes import run_pipeline
from umc.reference import build_model
from umc.runtime import load
from umc.runtime.backends import BackendError
from umc.spec import load_spec
from umc.verify import verify_build, verify_golden

INSTANCES_PER_OP = 3
POSITIVE_OPERANDS = {"rsqrt"}  # defined on positive reals (the graphs feed it mean squares plus eps)


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def one_op_model(op, types, attrs):
    """A graph holding one node of ``op`` (inputs in0.., plus an input whose shape names every symbolic size),
    as an ONNX model."""
    b = GraphBuilder(f"{op}.alone")
    inputs = [b.input(f"in{i}", t) for i, t in enumerate(types)]
    symbols = sorted({s for t in types for d in t.shape if isinstance(d, Sym) for s in d.symbols}
                     | {s for _, v in attrs for d in (v if isinstance(v, tuple) else (v,)) if isinstance(d, Sym)
                        for s in d.symbols})
    if symbols:
        b.input("sizes", TensorType("f32", tuple(Sym.of(s) for s in symbols)))
    outs = b.emit(op, *inputs, **dict(attrs))
    graph = b.build({f"out{i}": v for i, v in enumerate(outs)})
    return graph_model(graph, {}), symbols


def run_alone(op, types, attrs, inputs):
    model, symbols = one_op_model(op, types, attrs)
    feeds = {f"in{i}": x.numpy() for i, x in enumerate(inputs)}
    if symbols:
        feeds["sizes"] = np.zeros([SIZES[s] for s in symbols], dtype=np.float32)
    return [torch.from_numpy(a) for a in ort_session(model).run(None, feeds)]


def check_primitive(op, types, attrs, seed):
    """ONNX Runtime against the torch implementation, both against the torch implementation in float64."""
    inputs = sample_inputs(op, types, dict(attrs), seed=seed)
    if op in POSITIVE_OPERANDS:
        inputs = [x.abs() + 0.1 for x in inputs]
    got = run_alone(op, types, attrs, inputs)
    want = list(run_impl(op, dict(attrs), inputs))
    exact = list(run_impl(op, dict(attrs), cast_floats(inputs, torch.float64)))
    assert_close(op, got, want, exact, 1e-5)


def float32_instances():
    """op -> up to INSTANCES_PER_OP float32 instances: those of the example graphs, then those of the same graphs
    expanded to primitives (the tensor ops that appear only inside decompositions)."""
    found = {op: list(examples) for op, examples in EXAMPLES.items()}
    for spec in example_specs():
        for graph in lower(spec).values():
            for node in expand(run_pipeline(graph)[-1].graph).all_nodes():
                found.setdefault(node.op, []).append((tuple(v.type for v in node.inputs), node.attrs))
    batch, steps = Sym.of("B"), Sym.of("T")
    found.setdefault("iota", []).extend([((), (("axis", 1), ("shape", (batch, steps, 5)))),
                                        ((), (("axis", -1), ("shape", (batch, 4))))])
    found.setdefault("relu", []).append(((TensorType("f32", (batch, 6)),), ()))
    found.setdefault("cast", []).extend([((TensorType("i64", (batch, 3)),), (("to", "f32"),)),
                                        ((TensorType("f32", (batch, 3)),), (("to", "i64"),))])
    chosen = {}
    for op, examples in found.items():
        wide = [e for e in dict.fromkeys(examples) if all(t.dtype in ("f32", "i64") for t in e[0])]
        if wide:
            chosen[op] = wide[:INSTANCES_PER_OP]
    return chosen


INSTANCES = float32_instances()
ONNX_OPS = sorted(INSTANCES)


@pytest.mark.parametrize("op", ONNX_OPS)
def test_each_op_in_onnxruntime_equals_its_definition(op):
    for n, (types, attrs) in enumerate(INSTANCES[op]):
        if OPS[op].primitive:
            check_primitive(op, types, attrs, n)
        else:
            check_instance(op, types, attrs, lambda inputs: run_alone(op, types, attrs, inputs), n, "f32")


def test_every_op_of_the_examples_is_covered():
    assert {"attention", "topm", "layer_norm", "lookup_pool", "grid_topm", "coarse_topm", "gather_pool",
            "norm_conv_query_proj"} <= set(ONNX_OPS)
    assert set(ONNX_OPS) == set(OPS), sorted(set(OPS) - set(ONNX_OPS))


def test_floor_division_and_remainder_follow_torch_on_negative_integers(monkeypatch):
    """ONNX's integer Div truncates toward zero; the lowering must floor like torch (and Mod take the divisor's
    sign). The same check fails when floordiv_scalar is lowered as a plain Div."""
    from umc.export import onnx_ops

    types = (TensorType("i64", (7,)),)
    x = torch.tensor([-7, -6, -1, 0, 1, 5, 9])
    for op, want in (("floordiv_scalar", torch.div(x, 3, rounding_mode="floor")), ("mod_scalar", torch.remainder(x, 3))):
        assert torch.equal(run_alone(op, types, (("value", 3),), [x])[0], want)
    monkeypatch.setitem(onnx_ops.ONNX_LOWERINGS, "floordiv_scalar",
                        lambda s, xs, attrs, ins, outs: s.node("Div", [xs[0], s.scalar(attrs["value"], ins[0].dtype)]))
    assert not torch.equal(run_alone("floordiv_scalar", types, (("value", 3),), [x])[0],
                           torch.div(x, 3, rounding_mode="floor"))


def test_a_wrong_lowering_is_caught(monkeypatch):
    """The per-op check can fail: a TopK that keeps the smallest, a RoPE rotating the wrong way."""
    from umc.export import onnx_ops

    monkeypatch.setitem(onnx_ops.ONNX_LOWERINGS, "topm", lambda s, xs, attrs, ins, outs: s.node(
        "TopK", [xs[0], s.ints([attrs["k"]])], 2, axis=-1, largest=0, sorted=1))
    with pytest.raises(AssertionError):
        check_primitive("topm", *INSTANCES["topm"][0], 0)
    honest_rope = onnx_ops._rope
    monkeypatch.setattr(onnx_ops, "_rope", lambda s, x, cos, sin, half: honest_rope(s, x, cos, s.op("Neg", sin), half))
    with pytest.raises(AssertionError):
        check_primitive("attention", *INSTANCES["attention"][0], 0)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """The tiny spec compiled with its seeded weights and exported to ONNX."""
    root = tmp_path_factory.mktemp("onnx")
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    weights = root / "tiny.safetensors"
    save_file(build_model(spec, seed=spec.seed).state_dict(), str(weights))
    out = root / "build"
    compile_spec(SPECS / "ultramem-tiny.yaml", out, weights=weights)
    export(out, "onnx")
    return out


def test_export_lists_files_and_every_model_passes_the_checker(tiny_build):
    manifest = read_manifest(tiny_build)
    listed = [name for name in manifest["artifacts"] if name.startswith("onnx/")]
    assert set(listed) == {"onnx/prefill.onnx", "onnx/decode.onnx", "onnx/decode_ragged.onnx", "onnx/data_loader.py",
                           "onnx/README.md"}
    for kind in ("prefill", "decode", "decode_ragged"):
        path = tiny_build / "onnx" / f"{kind}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        umc_nodes = {n.op_type for n in model.graph.node if n.domain == "umc"}
        assert {"coarse_topm", "grid_topm", "lookup_pool"} <= umc_nodes
        nested = {n.op_type for f in model.functions for n in f.node if n.domain == "umc"}
        assert "gather_pool" in nested and any(f.name == "gather_pool" for f in model.functions)
        assert [i.name for i in model.graph.input] == [v.name for v in load(tiny_build).graphs[kind].inputs]


def test_onnxruntime_verifies_against_eager(tiny_build):
    """Prefill and 8 decode steps through ONNX Runtime: logits, KV cache, conv state and selections against the eager
    model (1e-4 float32)."""
    checks = verify_build(tiny_build, backend="onnxruntime", steps=8)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert sum(c.output == "logits" for c in checks) == 9


def test_onnxruntime_equals_graph_backend_with_and_without_parallel_branches(tiny_build, monkeypatch):
    import umc.runtime.backends.onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "PARALLEL_MIN_CORES", 1)  # the parallel executor even on a 2-core machine
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    tokens = torch.randint(0, spec.model.vocab_size, (3, 6), generator=torch.Generator().manual_seed(4))
    runs = [load(tiny_build, backend=name, threads=threads)
            for name, threads in (("graph", False), ("onnxruntime", False), ("onnxruntime", True))]
    results = []
    for session in runs:
        logits, state = session.prefill(tokens[:, :5])
        step, _ = session.decode(tokens[:, 5:], state)
        results.append((logits, step))
    for logits, step in results[1:]:
        torch.testing.assert_close(logits, results[0][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(step, results[0][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_golden_layers_through_onnxruntime(path):
    checks = verify_golden(path, backend="onnxruntime")
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_inlined_functions_compute_the_same(tiny_build):
    """The umc functions are the ops' definitions: the model with every function inlined gives the same outputs."""
    from onnx import inliner

    graph = load(tiny_build).graphs["decode"]
    feeds = {k: v.numpy() for k, v in random_inputs(graph, 512, seed=3, sizes={"B": 2, "S_past": 4}).items()}
    model = onnx.load(str(tiny_build / "onnx" / "decode.onnx"))
    inlined = inliner.inline_local_functions(model)
    assert not inlined.functions and not any(n.domain == "umc" for n in inlined.graph.node)
    for a, b in zip(ort_session(model).run(None, feeds), ort_session(inlined).run(None, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_shape_inference_recovers_every_output_shape(tiny_build):
    for kind in ("prefill", "decode"):
        model = onnx.load(str(tiny_build / "onnx" / f"{kind}.onnx"))
        declared = {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
                    for o in model.graph.output}
        for o in model.graph.output:
            o.type.tensor_type.ClearField("shape")
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        for o in inferred.graph.output:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
            assert o.type.tensor_type.HasField("shape") and len(dims) == len(declared[o.name]), o.name
            assert all(want is None or got == want for got, want in zip(dims, declared[o.name])), (kind, o.name, dims)


def _tampered_copy(tiny_build, tmp_path, edit):
    """A copy of the build whose decode.onnx was changed by ``edit`` and re-listed with its new hash."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build, copy)
    path = copy / "onnx" / "decode.onnx"
    model = onnx.load(str(path))
    edit(model)
    onnx.save_model(model, str(path))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"]["onnx/decode.onnx"] = file_sha256(path)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_model_without_its_functions_is_a_clear_error(tiny_build, tmp_path):
    copy = _tampered_copy(tiny_build, tmp_path, lambda m: m.ClearField("functions"))
    with pytest.raises(ExportError, match="has no local function"):
        load(copy, backend="onnxruntime")
    result = CliRunner().invoke(main, ["verify", str(copy), "--backend", "onnxruntime", "--steps", "1"])
    assert result.exit_code == 2 and "has no local function" in result.output and "Traceback" not in result.output
    with pytest.raises(ExportError, match=r"\(umc::\w+, overload"):
        check_umc_functions(onnx.load(str(copy / "onnx" / "decode.onnx")), "decode.onnx")


def test_a_build_not_exported_asks_for_the_export(tmp_path):
    out = tmp_path / "build"
    compile_spec(SPECS / "ultramem-tiny.yaml", out)
    with pytest.raises(BackendError, match="umc export .* --format onnx"):
        verify_build(out, backend="onnxruntime", steps=1)


def test_an_interrupted_export_leaves_the_build_as_it_was(tiny_build, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build, copy)
    before = (copy / "manifest.json").read_text()
    from umc.export import FORMATS

    def half_written(ctx):
        (ctx.out / "prefill.onnx").write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setitem(FORMATS, "onnx", dataclasses.replace(FORMATS["onnx"], write=half_written))
    with pytest.raises(KeyboardInterrupt):
        export(copy, "onnx")
    assert (copy / "manifest.json").read_text() == before
    assert (copy / "onnx" / "prefill.onnx").read_bytes() == (tiny_build / "onnx" / "prefill.onnx").read_bytes()
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]


def test_export_refuses_foreign_files_and_unknown_formats(tiny_build, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build, copy)
    (copy / "onnx" / "mine.txt").write_text("a user's notes")
    with pytest.raises(ExportError, match="mine.txt"):
        export(copy, "onnx")
    assert (copy / "onnx" / "mine.txt").exists()
    export(copy, "onnx", force=True)
    read_manifest(copy)
    assert not (copy / "onnx" / "mine.txt").exists()
    result = CliRunner().invoke(main, ["export", str(copy), "--format", "tflite"])
    assert result.exit_code == 2 and "allowed: onnx" in result.output


def test_external_data_is_shared_and_runs_without_umc(tiny_build, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build, copy)
    result = CliRunner().invoke(main, ["export", str(copy), "--format", "onnx", "--external-data"])
    assert result.exit_code == 0, result.output
    onnx_dir = copy / "onnx"
    assert (onnx_dir / "weights.bin").stat().st_size > 800_000
    assert (onnx_dir / "decode.onnx").stat().st_size < 200_000
    graph = load(copy).graphs["decode"]
    feeds = random_inputs(graph, 512, seed=5, sizes={"B": 2, "S_past": 3})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    plain = ort.InferenceSession(str(onnx_dir / "decode.onnx"), options, providers=["CPUExecutionProvider"])
    outputs = plain.run(["logits"], {k: v.numpy() for k, v in feeds.items()})
    want = run_graph(graph, load_file(str(copy / "weights.safetensors")), feeds)["logits"]
    np.testing.assert_allclose(outputs[0], want.numpy(), rtol=1e-4, atol=1e-5)


def test_bfloat16_build_keeps_its_dtype_and_runs_in_float32_on_the_cpu(tmp_path):
    text = (SPECS / "ultramem-tiny.yaml").read_text().replace("dtype: float32", "dtype: bfloat16")
    spec_path = tmp_path / "tiny-bf16.yaml"
    spec_path.write_text(text)
    out = tmp_path / "build"
    compile_spec(spec_path, out)
    messages = export(out, "onnx")
    assert any("float32" in m for m in messages)
    storage = onnx.load(str(out / "onnx" / "decode.onnx"), load_external_data=False)
    wide = onnx.load(str(out / "onnx" / "decode.float32.onnx"), load_external_data=False)
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    assert {o.type.tensor_type.elem_type for o in storage.graph.output if o.name == "logits"} == {bf16}
    assert {t.data_type for t in storage.graph.initializer} <= {bf16, onnx.TensorProto.INT64}
    assert {o.type.tensor_type.elem_type for o in wide.graph.output if o.name == "logits"} == {f32}
    checks = verify_build(out, backend="onnxruntime", steps=4)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_big_spec_exports_its_structure_without_weights(tmp_path):
    out = tmp_path / "build"
    compile_spec(SPECS / "ultramem-1.6b-x12.yaml", out)
    messages = export(out, "onnx")
    assert any("structure only" in m for m in messages)
    onnx_dir = out / "onnx"
    assert not (onnx_dir / "weights.bin").exists()
    model = onnx.load(str(onnx_dir / "decode.onnx"), load_external_data=False)
    assert model.graph.initializer and all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert total > 1e9 and (onnx_dir / "decode.onnx").stat().st_size < 5_000_000
    assert dict((p.key, p.value) for p in model.metadata_props)["umc.weights"].startswith("none")


def test_polygraphy_recipe_runs_onnxruntime_half(tiny_build):
    onnx_dir = tiny_build / "onnx"
    polygraphy = Path(sys.executable).parent / "polygraphy"
    done = subprocess.run([str(polygraphy), "run", "decode.onnx", "--onnxrt", "--data-loader-script",
                           "data_loader.py:load_decode"], cwd=onnx_dir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "PASSED" in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
