"""``umc export --format tensorrt``: the plugin package for the memory op (umc::lookup_pool as a TensorRT AOT
plugin), checked without TensorRT or a GPU. The launch arithmetic and argument layout are tested as umc code and as
the generated ``launch.py``, against first principles and against the kernel's own ``launch``; every PTX check is
shown to fail on a PTX or kernel with the fault it guards against; the generated plugin and build script import
without TensorRT, and the plugin's registration and launch are run against a stand-in for ``tensorrt.plugin``."""

import enum
import hashlib
import importlib.util
import inspect
import itertools
import json
import shutil
import sys
import types

import pytest
import torch

import umc
import umc.export.tensorrt as export_tensorrt
from conftest import SPECS
from umc.export import ExportContext, ExportError
from umc.export import tensorrt_launch
from umc.kernels import kernel_sources, load
from umc.runtime.session import read_build

TINY = str(SPECS / "ultramem-tiny.yaml")
_imports = itertools.count()


def import_file(path):
    """A module imported from ``path`` under a fresh name (generated files are tested as written)."""
    name = f"umc_test_generated_{path.stem}_{next(_imports)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def export(build_dir, out, monkeypatch, **options):
    """Run the exporter on a build as the CLI does, with TensorRT reported absent (as it is on these machines)."""
    monkeypatch.setattr(export_tensorrt, "tensorrt_version", lambda: None)
    ctx = ExportContext(read_build(build_dir), out, None, options)
    out.mkdir(parents=True, exist_ok=True)
    export_tensorrt.write_tensorrt(ctx)
    return ctx.messages


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return umc.compile(TINY, tmp_path_factory.mktemp("trt") / "b", targets=(80, 90)).path


@pytest.fixture(scope="module")
def package(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "tensorrt"
    with pytest.MonkeyPatch.context() as patch:
        messages = export(built, out, patch)
    return out, messages


@pytest.fixture(scope="module")
def table(package):
    return json.loads((package[0] / "kernels.json").read_text())


@pytest.fixture(params=["umc", "generated"])
def launch(request, package):
    """The launch module both ways: umc's own, and the copy written into the package, imported from there."""
    return tensorrt_launch if request.param == "umc" else import_file(package[0] / "launch.py")


@pytest.fixture
def kernel(table):
    return table["kernels"][0]


def lookup_pool_source(build_dir):
    return next(s for s, _ in kernel_sources(read_build(build_dir).graphs).values() if s.op == "lookup_pool")


# ---- the package ----------------------------------------------------------------------------------------------

def test_package_has_the_plugin_the_build_script_and_the_builds_ptx(package, table, built):
    out, messages = package
    source = lookup_pool_source(built)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "build_engine.py", "kernels", "kernels.json",
                                                     "launch.py", "umc_plugins.py"]
    assert [k["name"] for k in table["kernels"]] == [source.name]
    for target in ("sm_80", "sm_90"):
        assert (out / "kernels" / f"{source.name}.{target}.ptx").read_bytes() == \
               (built / "kernels" / f"{source.name}.{target}.ptx").read_bytes()
    record = table["kernels"][0]
    assert record["arguments"]["inputs"] == ["table_ptr", "address_ptr", "scores_ptr", "perm_ptr"]
    assert record["arguments"]["scalars"] == [] and record["arguments"]["outputs"] == ["out_ptr"]
    assert len(record["arguments"]["hidden"]) == 2  # Triton's global and profile scratch pointers
    assert {t: (r["ptx_target"], r["threads"]) for t, r in record["targets"].items()} == \
           {"sm_80": ("sm_80", 128), "sm_90": ("sm_90a", 128)}
    assert table["graphs"]["decode"]["tokens"] == [["B", "1"]] and table["graphs"]["prefill"]["tokens"] == [["B", "T"]]
    assert table["dims"] == {"B": [1, 1, 8], "S_past": [1, 128, 255], "T": [1, 128, 256]}
    assert "the build's sm_80 and sm_90 PTX" in messages[0]
    assert "engine build must run on a machine with TensorRT" in messages[1]
    assert "**Not run here**" in (out / "README.md").read_text()


def test_generated_sources_are_fixed_text_and_launch_is_umcs_own(package):
    out, _ = package
    assert (out / "umc_plugins.py").read_text() == export_tensorrt.PLUGIN_SOURCE
    assert (out / "build_engine.py").read_text() == export_tensorrt.BUILD_SCRIPT
    assert (out / "launch.py").read_text() == open(tensorrt_launch.__file__).read()
    assert not any("ultramem" in (out / name).read_text() for name in ("umc_plugins.py", "build_engine.py"))


def test_generated_modules_import_without_tensorrt(package, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails, as on these machines
    plugins = import_file(package[0] / "umc_plugins.py")
    script = import_file(package[0] / "build_engine.py")
    assert plugins.trtp is None and plugins.TABLE["plugin"]["id"] == "umc::lookup_pool"
    with pytest.raises(RuntimeError, match=r"tensorrt.plugin with ahead-of-time plugins \(TensorRT >= 10.10\)"):
        plugins.register_plugins(90)
    with pytest.raises(script.BuildFailure, match="TensorRT does not import"):
        script.import_tensorrt()


def test_build_engine_option_without_tensorrt_is_an_error_and_writes_nothing(built, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match=r"TensorRT is not installed here .* the engine build must run on a machine "
                                          r"with TensorRT >= 10.10 .*export without --build-engine"):
        export(built, tmp_path / "out", monkeypatch, build_engine=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_build_without_ptx_gets_them_compiled(tmp_path, monkeypatch, table):
    bare = umc.compile(TINY, tmp_path / "b").path
    assert not list((bare / "kernels").glob("*.ptx"))
    messages = export(bare, tmp_path / "out", monkeypatch)
    assert "compiled here (the build has none)" in messages[0]
    compiled = json.loads((tmp_path / "out" / "kernels.json").read_text())["kernels"][0]
    expected = table["kernels"][0]
    def without(record, key):
        return {k: v for k, v in record.items() if k != key}

    assert without(compiled, "targets") == without(expected, "targets")
    for target, record in compiled["targets"].items():
        assert without(record, "sha256") == without(expected["targets"][target], "sha256")
        ptx = (tmp_path / "out" / record["ptx"]).read_text()
        assert hashlib.sha256(ptx.encode()).hexdigest() == record["sha256"]


def test_a_ptx_changed_after_compile_is_refused(built, tmp_path, monkeypatch):
    copy = shutil.copytree(built, tmp_path / "b")
    build = read_build(copy)
    ptx = next((copy / "kernels").glob("lookup_pool_*.sm_90.ptx"))
    ptx.write_text(ptx.read_text() + "// edited\n")
    monkeypatch.setattr(export_tensorrt, "tensorrt_version", lambda: None)
    with pytest.raises(ExportError, match=r"sm_90.ptx: not the file the build's manifest lists \(sha256 differs\)"):
        export_tensorrt.write_tensorrt(ExportContext(build, tmp_path / "out", None, {}))


@pytest.fixture(scope="module")
def compiled_pieces(built):
    """The real kernel's source, users and per-target (PTX, reported use), as the writer reads them."""
    source = lookup_pool_source(built)
    report = json.loads((built / "report.json").read_text())["kernels"][source.name]
    per_target = {t: ((built / "kernels" / f"{source.name}.{t}.ptx").read_text(), report["targets"][t])
                  for t in ("sm_80", "sm_90")}
    return source, tuple(report["used_by"]), per_target


def hidden_param(ptx):
    return tensorrt_launch.read_ptx_entry(ptx).params[-1][1]


@pytest.mark.parametrize("fault, change, message", [
    ("wrong kernel name", lambda ptx, use: (ptx.replace(".entry lookup_pool_", ".entry other_"), use),
     r"its PTX defines kernel 'other_\w+', not this one"),
    ("block size", lambda ptx, use: (ptx, dict(use, num_warps=8)),
     r"its PTX requires 128 threads per block, not num_warps \* 32 = 256"),
    ("scratch memory", lambda ptx, use: (ptx, dict(use, global_scratch_bytes=64)), r"needs Triton scratch memory"),
    ("hidden parameter read", lambda ptx, use: (ptx.replace("\tret;", f"\tld.param.b64 %rd99, [{hidden_param(ptx)}];"
                                                                      "\n\tret;"), use),
     r"uses its hidden parameter \w+_param_6"),
    ("no entry", lambda ptx, use: (ptx.replace(".visible .entry", ".func"), use), r"has 0 \.visible \.entry"),
    ("shared memory", lambda ptx, use: (ptx, dict(use, shared_bytes=64 * 1024)),
     r"65536 bytes of dynamic shared memory per block"),
])
def test_each_ptx_check_refuses_its_fault(compiled_pieces, fault, change, message):
    source, users, per_target = compiled_pieces
    assert export_tensorrt.kernel_record(source, users, per_target)["name"] == source.name
    broken = dict(per_target, sm_90=change(*per_target["sm_90"]))
    with pytest.raises(ExportError, match=rf"kernel {source.name} \(sm_90\): .*{message}"):
        export_tensorrt.kernel_record(source, users, broken)


# ---- launch arithmetic (umc's module and the generated launch.py) ------------------------------------------------

@pytest.mark.parametrize("batch, seq", [(1, 1), (3, 1), (8, 1), (2, 17), (5, 256), (64, 1)])
def test_grid_block_and_shared_memory_from_first_principles(launch, kernel, batch, seq):
    for target, record in kernel["targets"].items():
        params = launch.launch_params(kernel, target, batch, seq)
        columns = (kernel["constants"]["VDIM"] + kernel["constants"]["BLOCK_V"] - 1) // kernel["constants"]["BLOCK_V"]
        assert params.grid == (batch * seq, columns, 1)
        assert params.block == (4 * 32, 1, 1) and params.shared_bytes == record["shared_bytes"]


@pytest.mark.parametrize("vdim, block_v, columns", [(32, 32, 1), (100, 32, 4), (64, 16, 4), (33, 32, 2)])
def test_column_blocks_round_up(launch, kernel, vdim, block_v, columns):
    wide = dict(kernel, constants=dict(kernel["constants"], VDIM=vdim, BLOCK_V=block_v))
    assert launch.launch_params(wide, "sm_80", 2, 3).grid == (6, columns, 1)


@pytest.mark.parametrize("batch, seq", [(1, 1), (4, 1), (3, 7)])
def test_grid_is_the_kernels_own_launch_grid(built, kernel, monkeypatch, batch, seq):
    source = lookup_pool_source(built)
    module = load(source)
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    monkeypatch.setattr(module, source.name, Recorder())
    c = module.CONSTANTS
    heads, picks = 2, c["K"] // 2
    table = torch.zeros(c["NPHYS"], c["VDIM"])
    address = torch.zeros(batch, seq, heads, picks, dtype=torch.int64)
    scores = torch.zeros(batch, seq, heads, picks, c["CORES"])
    module.launch(table, address, scores, torch.zeros(c["NPHYS"] * c["E"], dtype=torch.int64))
    assert grids == [tensorrt_launch.launch_params(kernel, "sm_80", batch, seq).grid[:2]]


def test_tokens_past_int32_are_a_clear_error(launch, kernel):
    assert launch.launch_params(kernel, "sm_80", 2**31 - 1, 1).grid[0] == 2**31 - 1
    with pytest.raises(launch.LaunchError, match=r"B\*T = 65536\*32768 = 2147483648 tokens exceed 2\*\*31-1 = "
                                                 r"2147483647: .* int32"):
        launch.launch_params(kernel, "sm_80", 2**16, 2**15)


@pytest.mark.parametrize("change, message", [
    (lambda k: dict(k, constants=dict(k["constants"], VDIM=32 * 65536)), r"grid y = 65536 is outside 1\.\.65535"),
    (lambda k: dict(k, targets={"sm_80": dict(k["targets"]["sm_80"], threads=2048)}), r"block x = 2048"),
    (lambda k: dict(k, targets={"sm_80": dict(k["targets"]["sm_80"], shared_bytes=49153)}), r"49153 bytes"),
])
def test_launches_past_cuda_limits_are_errors(launch, kernel, change, message):
    with pytest.raises(launch.LaunchError, match=message):
        launch.launch_params(change(kernel), "sm_80", 1, 1)


def test_no_tokens_is_an_error(launch, kernel):
    with pytest.raises(launch.LaunchError, match=r"grid x = 0 is outside .* must be skipped"):
        launch.launch_params(kernel, "sm_80", 0, 5)


def test_symbolic_sizes_leave_the_product_to_tensorrt(launch, kernel):
    class Expr:
        """Stands for a TensorRT shape expression: it multiplies, it has no value."""

        def __init__(self, text):
            self.text = text

        def __mul__(self, other):
            return Expr(f"{self.text}*{other.text}")

    params = launch.launch_params(kernel, "sm_90", Expr("B"), Expr("T"))
    assert params.grid[0].text == "B*T" and params.grid[1:] == (1, 1)


# ---- PTX entries and the argument layout ----------------------------------------------------------------------

SMALL_PTX = """.version 8.0
.target sm_80
.address_size 64
.visible .entry small(
\t.param .u64 .ptr .global .align 1 small_param_0,
\t.param .u32 small_param_1,
\t.param .u64 .ptr .global .align 1 small_param_2,
\t.param .u64 .ptr .global .align 1 small_param_3
)
.reqntid 64, 2
{
\tld.param.b64 %rd1, [small_param_0];
\tret;
}
"""


def test_the_real_kernels_ptx_and_layout(launch, built, kernel):
    ptx = (built / "kernels" / f"{kernel['name']}.sm_90.ptx").read_text()
    entry = launch.read_ptx_entry(ptx)
    assert (entry.name, entry.target, entry.threads, len(entry.params)) == (kernel["name"], "sm_90a", 128, 7)
    layout = launch.argument_layout(kernel["signature"], 4, 1, entry)
    assert layout._asdict() == {k: tuple(v) for k, v in kernel["arguments"].items()}


def test_scalars_sit_between_inputs_and_outputs_and_are_int32(launch):
    entry = launch.read_ptx_entry(SMALL_PTX)
    assert entry.threads == 128 and entry.params[1] == ("u32", "small_param_1")
    signature = {"x_ptr": "*fp32", "n": "i32", "y_ptr": "*fp16", "BLOCK": "constexpr"}
    assert launch.argument_layout(signature, 1, 1, entry) == (("x_ptr",), ("n",), ("y_ptr",), ("small_param_3",))
    with pytest.raises(launch.LaunchError, match="argument n is i64, but TensorRT passes extra scalar arguments as "
                                                 "int32 only"):
        launch.argument_layout(dict(signature, n="i64"), 1, 1, entry)
    with pytest.raises(launch.LaunchError, match=r"argument n \(i32\) sits where TensorRT passes a tensor pointer"):
        launch.argument_layout({"x_ptr": "*fp32", "y_ptr": "*fp16", "n": "i32"}, 1, 1, entry)
    with pytest.raises(launch.LaunchError, match=r"PTX parameter small_param_1 is \.u32, but argument y_ptr is \*fp16"):
        launch.argument_layout({"x_ptr": "*fp32", "y_ptr": "*fp16", "z_ptr": "*fp16"}, 1, 2, entry)
    with pytest.raises(launch.LaunchError, match="has 2 .visible .entry functions"):
        launch.read_ptx_entry(SMALL_PTX + SMALL_PTX[SMALL_PTX.index(".visible"):])


@pytest.mark.parametrize("capability, target", [(80, "sm_80"), (86, "sm_80"), (89, "sm_80"), (90, "sm_90"),
                                                (100, "sm_80"), (120, "sm_80")])
def test_the_ptx_that_runs_on_each_gpu(launch, kernel, capability, target):
    assert launch.select_target(kernel["targets"], capability) == target


def test_no_ptx_for_an_older_gpu(launch, kernel):
    with pytest.raises(launch.LaunchError, match=r"no PTX runs on a GPU of compute capability 7.5: the package has "
                                                 r"sm_80 \(.target sm_80\), sm_90 \(.target sm_90a\)"):
        launch.select_target(kernel["targets"], 75)
    with pytest.raises(launch.LaunchError, match="compute capability 9.0"):
        launch.select_target({"sm_80": {"ptx_target": "sm_80a"}}, 90)


def test_the_kernel_is_chosen_by_every_fact_tensorrt_knows(launch, kernel):
    plain = dict(kernel, name="no_shuffle", constants=dict(kernel["constants"], HAS_PERM=0))
    facts = {"dtype": "f32", "NPHYS": 64, "E": 4, "VDIM": 32, "K": 12, "CORES": 2}
    assert launch.select_kernel([kernel, plain], dict(facts, HAS_PERM=1))["name"] == kernel["name"]
    assert launch.select_kernel([kernel, plain], dict(facts, HAS_PERM=0))["name"] == "no_shuffle"
    with pytest.raises(launch.LaunchError, match="more than one lookup_pool kernel"):
        launch.select_kernel([kernel, plain], dict(facts, HAS_PERM=None))
    with pytest.raises(launch.LaunchError, match=r"no lookup_pool kernel for a node with .*dtype=bf16"):
        launch.select_kernel([kernel], dict(facts, dtype="bf16"))


# ---- the generated plugin, against a stand-in for tensorrt.plugin ------------------------------------------------

class Dim(int):
    """A stand-in shape expression known when building (a constant)."""

    is_fake, is_constant = False, True

    def constant_value(self):
        return int(self)


class RuntimeDim(Dim):
    """A stand-in shape expression known only at run time."""

    is_constant = False


def stand_in_tensorrt():
    """Modules standing in for ``tensorrt`` and ``tensorrt.plugin``: they record what the plugin registers and apply
    the signature rules of TensorRT's own checks (tensorrt/plugin/_validate.py): real annotations on register, and
    aot_impl's parameters are register's, then ``outputs, tactic``, with a return annotation."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"
    trt.DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT32 INT64")
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.registered = {}

    class TensorDesc:
        def __init__(self, shape_expr, dtype):
            self.shape_expr, self.dtype = tuple(shape_expr), dtype

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
        shared_mem = 0

    class SymIntExprs(list):
        def __init__(self, length):
            super().__init__([None] * length)

    def register(plugin_id):
        def wrap(function):
            signature = inspect.signature(function)
            assert all(not isinstance(p.annotation, str) for p in signature.parameters.values())
            trtp.registered["register"] = function
            return function
        return wrap

    def aot_impl(plugin_id):
        def wrap(function):
            expected = [*inspect.signature(trtp.registered["register"]).parameters, "outputs", "tactic"]
            assert list(inspect.signature(function).parameters) == expected
            assert inspect.signature(function).return_annotation is not inspect.Signature.empty
            trtp.registered["aot_impl"] = function
            return function
        return wrap

    trtp.TensorDesc, trtp.KernelLaunchParams, trtp.SymIntExprs = TensorDesc, KernelLaunchParams, SymIntExprs
    trtp.register, trtp.aot_impl = register, aot_impl
    trtp.from_shape_expr = lambda shape, dtype: TensorDesc(shape, dtype)
    trt.plugin = trtp
    return trt, trtp


def node_descs(trt, trtp, batch=3, seq=5, address_dtype=None):
    """The tiny spec's prefill node as TensorRT describes it: batch and sequence known at run time, the rest
    constant."""
    desc = trtp.TensorDesc
    return (desc((Dim(64), Dim(32)), trt.DataType.FLOAT),
            desc((RuntimeDim(batch), RuntimeDim(seq), Dim(2), Dim(6)), address_dtype or trt.DataType.INT64),
            desc((RuntimeDim(batch), RuntimeDim(seq), Dim(2), Dim(6), Dim(2)), trt.DataType.FLOAT),
            desc((Dim(256),), trt.DataType.INT64))


@pytest.fixture
def plugin_with_stand_in(package, monkeypatch):
    trt, trtp = stand_in_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    return import_file(package[0] / "umc_plugins.py"), trt, trtp


@pytest.mark.parametrize("capability, target, marker", [(90, "sm_90", ".target sm_90a"),
                                                        (86, "sm_80", ".target sm_80")])
def test_plugin_registers_its_rule_and_launch(plugin_with_stand_in, package, kernel, capability, target, marker):
    plugins, trt, trtp = plugin_with_stand_in
    plugins.register_plugins(capability)
    descs = node_descs(trt, trtp)
    pooled = trtp.registered["register"](*descs, N=64, E=4)
    assert pooled.shape_expr == (3, 5, 4 * 32) and pooled.dtype == trt.DataType.FLOAT
    name, ptx, params, extra = trtp.registered["aot_impl"](*descs, 64, 4, (pooled,), 0)
    assert name == kernel["name"] and marker in ptx
    assert ptx == (package[0] / kernel["targets"][target]["ptx"]).read_text()
    assert (params.grid_x, params.grid_y, params.grid_z) == (3 * 5, 1, 1)
    assert (params.block_x, params.block_y, params.block_z, params.shared_mem) == \
           (128, 1, 1, kernel["targets"][target]["shared_bytes"])
    assert len(extra) == 0


def test_plugin_refuses_wrong_types_other_sizes_and_edited_ptx(plugin_with_stand_in, package, kernel, tmp_path,
                                                               monkeypatch):
    plugins, trt, trtp = plugin_with_stand_in
    plugins.register_plugins(90)
    with pytest.raises(TypeError, match="got table DataType.FLOAT, address DataType.INT32"):
        trtp.registered["register"](*node_descs(trt, trtp, address_dtype=trt.DataType.INT32), N=64, E=4)
    with pytest.raises(plugins.launch.LaunchError, match=r"no lookup_pool kernel for a node with .*NPHYS=32"):
        trtp.registered["aot_impl"](*node_descs(trt, trtp), 32, 4, (), 0)
    table, address, scores, _ = node_descs(trt, trtp)
    placeholder = trtp.TensorDesc((Dim(1),), trt.DataType.INT64)  # a node without a shuffle: not this kernel
    with pytest.raises(plugins.launch.LaunchError, match=r"no lookup_pool kernel for a node with .*HAS_PERM=0"):
        trtp.registered["aot_impl"](table, address, scores, placeholder, 64, 4, (), 0)
    with pytest.raises(RuntimeError, match="already registered for compute capability 90"):
        plugins.register_plugins(80)
    copy = shutil.copytree(package[0], tmp_path / "tensorrt")
    ptx = copy / kernel["targets"]["sm_90"]["ptx"]
    ptx.write_text(ptx.read_text().replace("ret;", "trap;"))
    edited = import_file(copy / "umc_plugins.py")
    edited.register_plugins(90)
    with pytest.raises(edited.launch.LaunchError, match="sha256 differs from kernels.json"):
        trtp.registered["aot_impl"](*node_descs(trt, trtp), 64, 4, (), 0)


# ---- the generated build script (its TensorRT-free parts) ------------------------------------------------------

@pytest.fixture
def script(package):
    return import_file(package[0] / "build_engine.py")


def small_model(with_perm=True):
    """A decode-shaped ONNX model with one umc::lookup_pool node (the ONNX exporter's node, reduced to it)."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("address", TensorProto.INT64, ["B", 1, 2, 6]),
              helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", 1, 2, 6, 2]),
              helper.make_tensor_value_info("past_k.0", TensorProto.FLOAT, ["B", 2, "S_past", 16])]
    initializers = [helper.make_tensor("table", TensorProto.FLOAT, [64, 32], [0.0] * 64 * 32)]
    node_inputs = ["table", "address", "scores"]
    if with_perm:
        initializers.append(helper.make_tensor("perm", TensorProto.INT64, [256], list(range(256))))
        node_inputs.append("perm")
    node = helper.make_node("lookup_pool", node_inputs, ["pooled"], domain="umc", N=64, E=4)
    graph = helper.make_graph([node], "decode", inputs,
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", 1, 128])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("umc", 1)]), onnx


@pytest.mark.parametrize("with_perm", [True, False])
def test_prepare_onnx_binds_the_plugin(script, with_perm):
    model, onnx = small_model(with_perm)
    assert script.prepare_onnx(model) == 1
    node = model.graph.node[0]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"N": 64, "E": 4, "plugin_namespace": b"umc"}
    assert list(node.input) == ["table", "address", "scores", "perm" if with_perm else script.NO_PERM]
    placeholder = [t for t in model.graph.initializer if t.name == script.NO_PERM]
    assert len(placeholder) == (0 if with_perm else 1)
    if placeholder:
        assert list(onnx.numpy_helper.to_array(placeholder[0])) == [0] and placeholder[0].data_type == 7  # INT64
    del node.attribute[:]
    with pytest.raises(script.BuildFailure, match="needs the int attributes N and E"):
        script.prepare_onnx(model)


def test_profile_shapes_from_named_dims(script, table):
    model, _ = small_model()
    ranges = script.dim_ranges(table["dims"], [script.parse_dim("B=2:4:16")])
    shapes = script.profile_shapes(model, ranges)
    assert shapes["address"] == ((2, 1, 2, 6), (4, 1, 2, 6), (16, 1, 2, 6))
    assert shapes["past_k.0"] == ((2, 2, 1, 16), (4, 2, 128, 16), (16, 2, 255, 16))
    with pytest.raises(script.BuildFailure, match=r"input 'past_k.0' dimension 2 \(S_past\) has no range: pass "
                                                  r"--dim S_past=MIN:OPT:MAX"):
        script.profile_shapes(model, {"B": (1, 1, 1)})
    with pytest.raises(Exception, match="MIN <= OPT <= MAX"):
        script.parse_dim("B=4:2:8")


def test_token_limits_are_checked_at_the_profiles_largest_sizes(script, table):
    plugins = script.load_plugins()
    script.check_tokens(plugins, table["graphs"]["prefill"], {"B": (1, 1, 8), "T": (1, 1, 256)}, 90)
    with pytest.raises(plugins.launch.LaunchError, match=r"B\*T = 65536\*65536 = 4294967296 tokens exceed"):
        script.check_tokens(plugins, table["graphs"]["prefill"], {"B": (1, 1, 2**16), "T": (1, 1, 2**16)}, 90)
    with pytest.raises(script.BuildFailure, match="the token dim T has no range"):
        script.check_tokens(plugins, table["graphs"]["prefill"], {"B": (1, 1, 8)}, 90)


def test_through_the_cli_on_the_onnx_exporters_models(built, tmp_path, monkeypatch):
    import onnx
    from click.testing import CliRunner

    from umc.cli import main

    monkeypatch.setattr(export_tensorrt, "tensorrt_version", lambda: None)
    copy = shutil.copytree(built, tmp_path / "b")
    for fmt in ("onnx", "tensorrt"):
        result = CliRunner().invoke(main, ["export", str(copy), "--format", fmt])
        assert result.exit_code == 0, result.output
    assert "engine build must run on a machine with TensorRT" in result.output
    listed = json.loads((copy / "manifest.json").read_text())["artifacts"]
    assert {"tensorrt/umc_plugins.py", "tensorrt/build_engine.py", "tensorrt/kernels.json"} <= set(listed)
    script = import_file(copy / "tensorrt" / "build_engine.py")
    plugins = script.load_plugins()
    ranges = script.dim_ranges(plugins.TABLE["dims"], [])
    for graph in ("decode", "prefill"):
        model = onnx.load(str(copy / "onnx" / f"{graph}.onnx"), load_external_data=False)
        assert script.prepare_onnx(model) == 2  # one memory op per memory unit
        assert all(len(node.input) == 4 for node in model.graph.node if node.op_type == "lookup_pool")
        assert "tokens" in script.profile_shapes(model, ranges)
        script.check_tokens(plugins, plugins.TABLE["graphs"][graph], ranges, 90)
    result = CliRunner().invoke(main, ["export", str(copy), "--format", "tensorrt", "--force", "--build-engine"])
    assert result.exit_code != 0 and "the engine build must run on a machine with TensorRT >= 10.10" in result.output


def test_build_script_says_what_is_missing(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert script.main(["--onnx", str(tmp_path / "missing.onnx")]) == 1
    assert "missing.onnx does not exist: run `umc export <build> --format onnx` first" in capsys.readouterr().err
    model, onnx = small_model()
    onnx.save(model, tmp_path / "decode.onnx")
    assert script.main(["--onnx", str(tmp_path / "decode.onnx"), "--output", str(tmp_path / "e")]) == 1
    assert "TensorRT does not import" in capsys.readouterr().err and not (tmp_path / "e").exists()
