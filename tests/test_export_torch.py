"""The torch route: fused ops as ``torch.library`` custom ops, an IR graph as a torch module, the torch-tensorrt
export format.

- Each custom op's fake implementation gives the output types the op's IR type rule gives, on several shapes;
  a deliberately wrong fake is caught by the same check.
- Each custom op computes what the op's decomposition computes (run through the graph backend: the independent
  reference), tie-aware for selections, in float32 and bfloat16; a custom op that scales its output is caught.
- The tiny decode graph's module exports with dynamic B and S_past; the exported program calls one
  ``torch.ops.umc`` node per fused op (and none of the math inside them), and equals the graph backend at two
  batch sizes it was not traced with.
- The writer, without torch-tensorrt, writes compile_trt.py and a README saying what ran and what did not, and
  says the compile must run on a machine with TensorRT and a GPU; ``build_engine`` is a clear ExportError.
- compile_trt.py compiles, imports without torch_tensorrt (and exits with that reason), and its compile steps
  run end to end on the CPU against a stand-in torch_tensorrt that records what it is asked.
"""

import py_compile
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import umc
from conftest import SPECS
from graph_inputs import random_inputs, random_values, run_graph
from op_samples import check_instance
from umc.dtypes import torch_dtype
from umc.export import FORMATS, ExportContext, ExportError
from umc.export.torch_library import FAKES, custom_impl
from umc.export import torch_module
from umc.export import torch_tensorrt as torch_tensorrt_format
from umc.export.torch_module import custom_op_counts, export_graph, graph_module, size_ranges
from umc.export.torch_tensorrt import SCRIPT, check_graph, load_script, placeholder_weights, write_torch_tensorrt
from umc.ir import TensorType
from umc.ir.dims import Sym
from umc.ir.ops import infer_types, lookup
from umc.runtime import read_build
from umc.runtime.checks import check_weights

B, T = Sym.of("B"), Sym.of("T")


def coarse(batch, steps, heads, n, kd, m):
    """A coarse_topm instance: (op, input types, attributes)."""
    return "coarse_topm", [TensorType("f32", (batch, steps, heads, kd)), TensorType("f32", (heads, n, kd))], {"k": m}


def grid(batch, steps, heads, n, kd, rank, cores, m):
    """A grid_topm instance."""
    side, picks = TensorType("f32", (batch, steps, heads, kd)), TensorType("i64", (batch, steps, heads, m))
    keys = TensorType("f32", (heads, n, kd, rank))
    return "grid_topm", [side, side, keys, keys, picks, picks, TensorType("f32", (heads, cores, rank, rank))], {"n": n}


def pool(batch, steps, rows, vdim, heads, m, cores, blocks, shuffle):
    """A lookup_pool instance, with or without the shuffle operand."""
    types_ = [TensorType("f32", (rows, vdim)), TensorType("i64", (batch, steps, heads, m)),
              TensorType("f32", (batch, steps, heads, m, cores))]
    return "lookup_pool", types_ + ([TensorType("i64", (rows * blocks,))] if shuffle else []), {"N": rows, "E": blocks}


def gather(batch, steps, rows, vdim, heads, m, cores, blocks):
    """A gather_pool instance."""
    index = TensorType("i64", (batch, steps, heads, m))
    return "gather_pool", [TensorType("f32", (rows, vdim)), index, index,
                           TensorType("f32", (batch, steps, heads, m, cores))], {"E": blocks}


CONCRETE = [coarse(2, 3, 2, 16, 16, 6), coarse(1, 1, 1, 12, 10, 5), coarse(4, 2, 2, 33, 8, 17),
            grid(2, 3, 2, 16, 16, 2, 2, 6), grid(1, 1, 1, 12, 10, 3, 1, 5), grid(3, 2, 2, 9, 8, 1, 3, 3),
            pool(2, 3, 16, 32, 2, 6, 2, 4, True), pool(1, 1, 9, 20, 1, 5, 1, 9, True),
            pool(3, 2, 25, 70, 2, 3, 2, 1, False),
            gather(2, 3, 16, 32, 2, 6, 2, 4), gather(1, 4, 9, 20, 1, 5, 1, 9)]
SYMBOLIC = [coarse(B, T, 2, 16, 16, 6), coarse(B, T, 1, 33, 8, 17), grid(B, T, 2, 16, 16, 2, 2, 6),
            grid(B, T, 1, 12, 10, 3, 1, 5), pool(B, T, 16, 32, 2, 6, 2, 4, True), pool(B, T, 25, 70, 2, 3, 2, 1, False),
            gather(B, T, 16, 32, 2, 6, 2, 4), gather(B, T, 9, 20, 1, 5, 1, 9)]


def check_fake(op, input_types, attrs, fake) -> None:
    """``fake(*schema arguments)`` on meta tensors gives the shapes and dtypes of the op's IR type rule."""
    definition = lookup(op)
    operands = [torch.empty(t.shape, dtype=torch_dtype(t.dtype), device="meta") for t in input_types]
    operands += [None] * (len(definition.inputs) - len(operands))
    got = fake(*operands, *(attrs[a.name] for a in definition.attrs))
    got = got if isinstance(got, tuple) else (got,)
    want = [(t.shape, torch_dtype(t.dtype)) for t in infer_types(op, tuple(input_types), attrs)]
    assert [(tuple(o.shape), o.dtype) for o in got] == want, (op, input_types)


def test_every_kernel_sized_op_is_a_custom_op():
    assert set(FAKES) == {"coarse_topm", "grid_topm", "lookup_pool", "gather_pool"}
    assert str(torch.ops.umc.lookup_pool.default._schema) == (
        "umc::lookup_pool(Tensor table, Tensor address, Tensor scores, Tensor? perm, int N, int E) -> Tensor")


@pytest.mark.parametrize("op, input_types, attrs", CONCRETE, ids=lambda x: x if isinstance(x, str) else "")
def test_fake_implementation_agrees_with_the_type_rule(op, input_types, attrs):
    check_fake(op, input_types, attrs, getattr(torch.ops.umc, op))  # on meta tensors the registered fake runs


def test_a_fake_with_a_wrong_shape_is_caught():
    def one_too_many(q, keys, k):
        return q.new_empty((*q.shape[:-1], k + 1)), q.new_empty((*q.shape[:-1], k + 1), dtype=torch.int64)

    def float_addresses(*args):
        address, scores = FAKES["grid_topm"](*args)
        return address.float(), scores

    for (op, input_types, attrs), wrong in ((CONCRETE[0], one_too_many), (CONCRETE[3], float_addresses)):
        with pytest.raises(AssertionError):
            check_fake(op, input_types, attrs, wrong)


@pytest.mark.parametrize("op, input_types, attrs", SYMBOLIC, ids=lambda x: x if isinstance(x, str) else "")
def test_custom_op_equals_the_decomposition(op, input_types, attrs):
    produce = lambda inputs: custom_impl(op)(attrs, *inputs)
    for seed, dtype in enumerate(("f32", "bf16")):
        check_instance(op, input_types, attrs, produce, seed, dtype)


def test_a_custom_op_that_scales_its_output_is_caught():
    op, input_types, attrs = SYMBOLIC[-2]
    with pytest.raises(AssertionError):
        check_instance(op, input_types, attrs, lambda inputs: [1.001 * custom_impl(op)(attrs, *inputs)[0]], 0, "f32")


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    path = tmp_path_factory.mktemp("torch_export") / "build"
    umc.compile(SPECS / "ultramem-tiny.yaml", path)
    return read_build(path)


@pytest.fixture(scope="module")
def tiny_weights(tiny_build):
    return random_values(tiny_build.graphs["decode"].params, seed=7)


@pytest.fixture(scope="module")
def exported_decode(tiny_build, tiny_weights):
    graph = tiny_build.graphs["decode"]
    module = graph_module(graph, tiny_weights)
    return export_graph(module, size_ranges(tiny_build.spec, max_batch=8), tiny_build.spec.model.vocab_size)


def test_exported_decode_calls_one_node_per_fused_op(tiny_build, exported_decode):
    fused = [n.op for n in tiny_build.graphs["decode"].nodes if n.op in FAKES]
    assert custom_op_counts(exported_decode) == {op: fused.count(op) for op in set(fused)}
    assert sorted(set(fused)) == ["coarse_topm", "grid_topm", "lookup_pool"]
    targets = {str(n.target) for n in exported_decode.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if "topk" in t or "scatter" in t or "one_hot" in t}  # the fused math stays inside
    assert {str(s) for s in exported_decode.range_constraints.values()} == {"VR[1, 8]", "VR[1, 255]"}  # B, S_past


@pytest.mark.parametrize("sizes", [{"B": 1, "S_past": 2}, {"B": 4, "S_past": 7}])
def test_exported_decode_equals_the_graph_backend(tiny_build, tiny_weights, exported_decode, sizes):
    graph = tiny_build.graphs["decode"]
    feeds = random_inputs(graph, tiny_build.spec.model.vocab_size, seed=sizes["B"], sizes=sizes)
    want = run_graph(graph, tiny_weights, feeds)
    got = exported_decode.module()(*(feeds[v.name] for v in graph.inputs))
    for value, tensor in zip(graph.outputs, got, strict=True):
        expected = want[value.name]
        assert tensor.shape == expected.shape and tensor.dtype == expected.dtype, value.name
        if expected.is_floating_point():
            scale = expected.abs().max().item()
            assert (tensor - expected).abs().max().item() <= 1e-6 * scale, value.name
        else:
            assert torch.equal(tensor, expected), value.name


def test_placeholder_weights_fit_the_graphs(tiny_build):
    check_weights(tiny_build.graphs, placeholder_weights(tiny_build.graphs))


def test_writer_without_torch_tensorrt_writes_the_script_and_says_where_to_run_it(tiny_build, tiny_weights, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # not importable, whatever this machine has
    registered = FORMATS["torch-tensorrt"]
    assert registered.write is write_torch_tensorrt and registered.subdir == "torch-tensorrt"
    ctx = ExportContext(tiny_build, tmp_path, tiny_weights)
    write_torch_tensorrt(ctx)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "compile_trt.py"]
    assert (tmp_path / "compile_trt.py").read_text() == SCRIPT
    readme = (tmp_path / "README.md").read_text()
    assert "2 umc::grid_topm, 2 umc::lookup_pool" in readme and "Not run here" in readme
    assert "B=1, T=2 and B=3, T=5" in readme and "B=1, S_past=2 and B=3, S_past=4" in readme
    assert "B in [1, 8], S_past in [1, 255]" in readme and "largest difference 0 " in readme
    said = "\n".join(ctx.messages)
    assert "not compiled" in said and "TensorRT" in said and "GPU" in said and "compile_trt.py" in said


def test_build_engine_without_torch_tensorrt_is_a_clear_error(tiny_build, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(ExportError, match="cannot build the engine: torch_tensorrt is not importable.*TensorRT.*GPU"):
        write_torch_tensorrt(ExportContext(tiny_build, tmp_path, tiny_weights, {"build_engine": True}))
    assert not list(tmp_path.iterdir())


def test_script_compiles_and_imports_without_torch_tensorrt(tiny_build, tmp_path, monkeypatch):
    path = tmp_path / "compile_trt.py"
    path.write_text(SCRIPT)
    py_compile.compile(str(path), cfile=str(tmp_path / "compile_trt.pyc"), doraise=True)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    script = load_script(path)
    assert script.torch_tensorrt is None
    with pytest.raises(SystemExit, match="torch_tensorrt is not importable here"):
        script.main(["--build", str(tiny_build.path)])


def stand_in_torch_tensorrt(calls: dict) -> dict[str, types.ModuleType]:
    """A torch_tensorrt that records what it is asked: Input specs, converter generation (only for ops a plugin
    registered, as the real one asserts), compile (returns the exported program's module) and save."""
    root, dynamo = types.ModuleType("torch_tensorrt"), types.ModuleType("torch_tensorrt.dynamo")
    conversion, plugins = (types.ModuleType("torch_tensorrt.dynamo.conversion"),
                           types.ModuleType("torch_tensorrt.dynamo.conversion.plugins"))
    root.registered_plugins = []
    root.Input = lambda **spec: spec
    root.dynamo, dynamo.conversion, conversion.plugins = dynamo, conversion, plugins

    def generate_plugin_converter(op, **options):
        assert op in [name for name, capability in root.registered_plugins]
        calls.setdefault("converters", []).append((op, options))

    def compile_(exported, arg_inputs, **options):
        calls["inputs"] = arg_inputs
        return exported.module()

    def save(module, path, arg_inputs):
        calls.setdefault("saved", []).append(path)
        open(path, "w").write("compiled")

    plugins.generate_plugin_converter, dynamo.compile, root.save = generate_plugin_converter, compile_, save
    return {m.__name__: m for m in (root, dynamo, conversion, plugins)}


def test_script_compile_steps_run_against_a_stand_in_torch_tensorrt(tiny_build, tiny_weights, exported_decode,
                                                                     tmp_path, monkeypatch):
    """The script's steps on the CPU; the module's export is the fixture's (tracing it again only costs time)."""
    build = tmp_path / "build"
    shutil.copytree(tiny_build.path, build)
    (build / "tensorrt").mkdir()
    (build / "tensorrt" / "umc_plugins.py").write_text(  # registers only when asked, as the real package does
        "import torch_tensorrt\n"
        "def register_plugins(capability):\n"
        "    torch_tensorrt.registered_plugins.append(('umc::lookup_pool', capability))\n")
    save_file(dict(tiny_weights), str(tmp_path / "weights.safetensors"))
    calls: dict = {}
    for name, module in stand_in_torch_tensorrt(calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch_module, "export_graph",
                        lambda module, ranges, vocab: calls.update(ranges=ranges) or exported_decode)
    path = build / "torch-tensorrt" / "compile_trt.py"
    path.parent.mkdir()
    path.write_text(SCRIPT)
    load_script(path).main(["--weights", str(tmp_path / "weights.safetensors"), "--graphs", "decode",
                            "--device", "cpu", "--max-batch", "4"])
    assert sys.modules["torch_tensorrt"].registered_plugins == [("umc::lookup_pool", 90)]
    (op, options), = calls["converters"]
    assert op == "umc::lookup_pool" and options["use_aot_if_available"] and options["supports_dynamic_shapes"]
    validator = options["capability_validator"]
    assert validator(types.SimpleNamespace(args=(1, 2, 3, 4, 64, 4)), None)
    assert not validator(types.SimpleNamespace(args=(1, 2, 3, None, 64, 4)), None)  # no shuffle: stays in PyTorch
    tokens, past_k = calls["inputs"][0], calls["inputs"][1]
    assert (tokens["min_shape"], tokens["max_shape"], tokens["dtype"]) == ((1, 1), (4, 1), torch.int64)
    assert (past_k["min_shape"], past_k["opt_shape"], past_k["max_shape"]) == ((1, 2, 1, 16), (3, 2, 128, 16),
                                                                                (4, 2, 255, 16))
    assert calls["ranges"] == {"B": (1, 4), "T": (1, 256), "S_past": (1, 255)}
    assert calls["saved"] == [str(path.parent / "decode.trt.ep")]


def test_the_writers_equality_check_fails_on_a_wrong_program(tiny_build, tiny_weights, monkeypatch):
    """check_graph stops the export when the program differs from the graph backend: here the module (standing in
    for its export, which is slow to trace) runs a lookup_pool that scales its output."""
    honest = torch_module.custom_impl

    def scaled(op):
        call = honest(op)
        return (lambda attrs, *inputs: tuple(1.001 * o for o in call(attrs, *inputs))) if op == "lookup_pool" else call

    monkeypatch.setattr(torch_module, "custom_impl", scaled)
    monkeypatch.setattr(torch_tensorrt_format, "export_graph", lambda module, ranges, vocab: types.SimpleNamespace(
        module=lambda: module))
    with pytest.raises(RuntimeError, match="umc bug: the exported decode program differs from the graph backend"):
        check_graph(tiny_build.graphs["decode"], tiny_weights, tiny_build.spec, max_batch=8)
