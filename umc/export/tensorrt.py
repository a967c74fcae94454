"""``umc export DIR --format tensorrt``: a TensorRT plugin package for umc's memory op, and a script to build an engine.

It writes ``<build>/tensorrt/``:

- ``umc_plugins.py``: the ``umc::lookup_pool`` plugin as a ``tensorrt.plugin`` ahead-of-time plugin (TensorRT
  >= 10.10): ``register`` with the shape and type rule, ``aot_impl`` returning the kernel's name, the PTX that runs
  on the GPU, its launch (grid, block, shared memory) and no extra scalars. It imports without TensorRT.
- ``launch.py``: the launch arithmetic and argument-layout checks, a verbatim copy of ``umc.export.tensorrt_launch``
  (so the export's checks and the plugin's launches are one code).
- ``build_engine.py``: parses ``<build>/onnx/decode.onnx`` (or prefill) into a strongly typed network with the
  plugin bound to the ``umc::lookup_pool`` nodes, and builds the engine.
- ``kernels.json`` and ``kernels/<name>.sm_80.ptx``, ``.sm_90.ptx``: the kernel table (sizes, argument layout,
  per-target PTX with sha256, shared memory) and the PTX itself.
- ``README.md``: what was run where this was exported, what was not, and how to build the engine.

The PTX is the build's own (compiled by ``umc compile --target sm_80,sm_90``, checked against the manifest); a
build compiled without targets gets both compiled here, from umc's rendering of its kernels, without a GPU. Every
PTX is checked before it is written: kernel name, parameters against TensorRT's argument order (inputs, int32
scalars, outputs; Triton's hidden scratch pointers unread), block size, scratch and shared memory, launch limits.
Nothing from the spec is pasted into generated source: the two scripts are fixed text and read kernels.json.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from umc import __version__
from umc.export import ExportContext, ExportError, export_format
from umc.export import tensorrt_launch
from umc.export.tensorrt_launch import LaunchError, argument_layout, launch_params, read_ptx_entry
from umc.ir.dims import Sym
from umc.kernels import kernel_sources
from umc.kernels.aot import AOTError, compile_kernels
from umc.kernels.source import POINTER_TYPES, KernelSource, sanitize_comment

TARGETS = (80, 90)
PLUGIN_INPUTS = ("table", "address", "scores", "perm")  # the ONNX node's inputs, perm made explicit by build_engine.py
PLUGIN_OUTPUTS = ("pooled",)
DEFAULT_MAX_BATCH = 8
ENGINE_TIMEOUT_S = 3600
NO_TENSORRT = ("TensorRT is not installed here (import tensorrt failed): the engine build must run on a machine with "
               "TensorRT >= 10.10 and an NVIDIA GPU (sm_80 or newer)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DTYPE_OF_POINTER = {pointer: dtype for dtype, pointer in POINTER_TYPES.items()}


@export_format("tensorrt", "tensorrt")
def write_tensorrt(ctx: ExportContext) -> None:
    """TensorRT plugin package: the memory op as an ahead-of-time plugin (umc::lookup_pool, the kernels' sm_80/sm_90
    PTX) and build_engine.py, which builds an engine from onnx/decode.onnx where TensorRT >= 10.10 and a GPU are."""
    build, out = ctx.build, ctx.out
    build_engine = bool(ctx.options.get("build_engine"))
    tensorrt = tensorrt_version()
    if build_engine and tensorrt is None:
        raise ExportError(NO_TENSORRT + "; export without --build-engine to write the plugin package, then run "
                                        f"`python {build.path / 'tensorrt' / 'build_engine.py'}` there")
    sources = lookup_pool_sources(build)
    ptx, compiled_here = kernel_ptx(build, sources)
    records = [kernel_record(source, users, ptx[source.name]) for source, users in sources]
    (out / "kernels").mkdir(parents=True, exist_ok=True)
    for record in records:
        for target, entry in record["targets"].items():
            (out / entry["ptx"]).write_text(ptx[record["name"]][target][0], encoding="utf-8")
    table = {"format": 1, "umc_version": __version__,
             "plugin": {"id": "umc::lookup_pool", "inputs": list(PLUGIN_INPUTS), "attributes": ["N", "E"],
                        "outputs": list(PLUGIN_OUTPUTS)},
             "spec": {"name": build.spec.name, "dtype": build.spec.dtype},
             "kernels": records, "graphs": graph_records(build), "dims": dim_defaults(build)}
    (out / "kernels.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    (out / "launch.py").write_text(Path(tensorrt_launch.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    (out / "umc_plugins.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    (out / "build_engine.py").write_text(BUILD_SCRIPT, encoding="utf-8")
    engine = run_engine_build(build.path, out) if build_engine else None
    (out / "README.md").write_text(readme(table, compiled_here, tensorrt, engine), encoding="utf-8")
    names = ", ".join(record["name"] for record in records)
    origin = "compiled here (the build has none)" if compiled_here else "the build's"
    ctx.say(f"tensorrt: plugin umc::lookup_pool for {names}: {origin} sm_80 and sm_90 PTX, build_engine.py")
    if engine is not None:
        ctx.say(f"tensorrt: built {engine.name} with TensorRT {tensorrt}")
    elif tensorrt is None:
        ctx.say(f"tensorrt: no engine was built: {NO_TENSORRT}; there, run "
                f"`python {build.path / 'tensorrt' / 'build_engine.py'}`")
    else:
        ctx.say(f"tensorrt: TensorRT {tensorrt} is installed here; build the engine with --build-engine or "
                f"`python {build.path / 'tensorrt' / 'build_engine.py'}`")


def tensorrt_version() -> str | None:
    """TensorRT's version where ``import tensorrt`` works in this Python, else None (the engine is then built on a
    machine that has it)."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return str(getattr(tensorrt, "__version__", "unknown"))


def lookup_pool_sources(build) -> list[tuple[KernelSource, tuple[str, ...]]]:
    """umc's own rendering of every lookup_pool kernel the build's graphs use, with the nodes using it (the kernel
    files in the build are never imported: their PTX is checked against these)."""
    found = [(source, users) for source, users in kernel_sources(build.graphs).values() if source.op == "lookup_pool"]
    if not found:
        raise ExportError(f"{build.path}: the graphs have no lookup_pool node, so there is no memory op for a "
                          "TensorRT plugin to run")
    for source, _ in found:
        if not _NAME.fullmatch(source.name):
            raise ExportError(f"{build.path}: kernel name {source.name!r} is not an identifier; recompile the build")
    return found


def kernel_ptx(build, sources) -> tuple[dict[str, dict[str, tuple[str, dict]]], bool]:
    """Kernel name -> target ("sm_80", "sm_90") -> (PTX text, what the compile reported it uses), and whether they
    were compiled here: the build's own PTX when it has both targets for every kernel, else all compiled now."""
    own = {source.name: _build_ptx(build, source.name) for source, _ in sources}
    if all(own.values()):
        return own, False
    return _compile_ptx([source for source, _ in sources]), True


def _build_ptx(build, name: str) -> dict[str, tuple[str, dict]] | None:
    """The build's PTX and reported use of kernel ``name`` for both targets, each file checked against the sha256
    the manifest lists; None when the build was compiled without one of the targets."""
    listed = build.manifest["artifacts"]
    report = json.loads((build.path / "report.json").read_text(encoding="utf-8"))
    used = report.get("kernels", {}).get(name, {}).get("targets", {})
    found = {}
    for cc in TARGETS:
        target, artifact = f"sm_{cc}", f"kernels/{name}.sm_{cc}.ptx"
        if artifact not in listed or target not in used:
            return None
        data = (build.path / artifact).read_bytes()
        if hashlib.sha256(data).hexdigest() != listed[artifact]:
            raise ExportError(f"{build.path / artifact}: not the file the build's manifest lists (sha256 differs); "
                              "recompile the build")
        found[target] = (data.decode("utf-8"), used[target])
    return found


def _compile_ptx(sources: list[KernelSource]) -> dict[str, dict[str, tuple[str, dict]]]:
    """Compile umc's rendering of ``sources`` for sm_80 and sm_90 in a private directory (Triton, no GPU needed)."""
    with tempfile.TemporaryDirectory(prefix="umc-tensorrt-") as tmp:
        folder = Path(tmp)
        for source in sources:
            (folder / f"{source.name}.py").write_text(source.text(), encoding="utf-8")
        try:
            used = compile_kernels(folder, TARGETS)
        except AOTError as exc:
            raise ExportError(f"compiling the lookup_pool kernels for sm_80, sm_90: {exc}") from None
        return {name: {target: ((folder / f"{name}.{target}.ptx").read_text(encoding="utf-8"), use)
                       for target, use in per_target.items()}
                for name, per_target in used.items()}


def kernel_record(source: KernelSource, users: tuple[str, ...], per_target: dict[str, tuple[str, dict]]) -> dict:
    """The kernels.json record of one kernel, after checking each target's PTX: the kernel it defines is this one,
    its parameters take TensorRT's argument order (inputs, int32 scalars, outputs) and any further (hidden)
    parameter is never read, its block is num_warps * 32 threads, it needs no scratch memory, and its launch is
    within CUDA's limits. ExportError names the kernel, the target and the fault."""
    record = {"name": source.name, "op": source.op, "dtype": _DTYPE_OF_POINTER[source.signature["table_ptr"]],
              "specialization": sanitize_comment(source.specialization), "used_by": list(users),
              "constants": source.constants, "signature": source.signature, "targets": {}}
    for target, (ptx, use) in sorted(per_target.items()):
        where = f"kernel {source.name} ({target})"
        try:
            entry = read_ptx_entry(ptx)
            layout = argument_layout(source.signature, len(PLUGIN_INPUTS), len(PLUGIN_OUTPUTS), entry)
        except LaunchError as exc:
            raise ExportError(f"{where}: {exc}; recompile the build") from None
        threads = use["num_warps"] * 32
        fault = None
        if entry.name != source.name:
            fault = f"its PTX defines kernel {entry.name!r}, not this one"
        elif entry.threads != threads:
            fault = f"its PTX requires {entry.threads} threads per block, not num_warps * 32 = {threads}"
        elif use["global_scratch_bytes"] or use["profile_scratch_bytes"]:
            fault = "it needs Triton scratch memory, which a TensorRT plugin launch does not allocate"
        elif layout.scalars:
            fault = f"it takes runtime scalars {', '.join(layout.scalars)}, which this plugin does not pass"
        if fault:
            raise ExportError(f"{where}: {fault}; recompile the build")
        record["arguments"] = layout._asdict()
        record["targets"][target] = {"ptx": f"kernels/{source.name}.{target}.ptx",
                                     "sha256": hashlib.sha256(ptx.encode("utf-8")).hexdigest(),
                                     "ptx_target": entry.target, "ptx_version": entry.version,
                                     "threads": threads, "shared_bytes": int(use["shared_bytes"])}
        try:
            launch_params(record, target, 1, 1)
        except LaunchError as exc:
            raise ExportError(f"{where}: {exc}") from None
    return record


def graph_records(build) -> dict[str, dict]:
    """Per graph: its ONNX file relative to the package, and the (batch, sequence) dims of its lookup_pool nodes'
    tokens (names or numbers), which build_engine.py checks at the profile's largest sizes."""
    records = {}
    for kind, graph in sorted(build.graphs.items()):
        tokens = sorted({tuple(str(dim) for dim in node.inputs[1].type.shape[:2])
                         for node in graph.nodes if node.op == "lookup_pool"})
        for dim in (dim for pair in tokens for dim in pair):
            if not (dim.isdigit() or _NAME.fullmatch(dim)):
                raise ExportError(f"{build.path}: {kind} lookup_pool token dim {dim!r} is neither a number nor a name")
        records[kind] = {"onnx": f"../onnx/{kind}.onnx", "tokens": [list(pair) for pair in tokens]}
    return records


def dim_defaults(build) -> dict[str, list[int]]:
    """Default (min, opt, max) of every named dim of the graphs' inputs, for the engine's optimization profile:
    B up to DEFAULT_MAX_BATCH, S_past (the cache before a decode step) up to max_seq_len - 1, any other (sequence)
    dim up to max_seq_len."""
    length = build.spec.model.max_seq_len
    names = sorted({name for graph in build.graphs.values() for value in graph.inputs
                    for dim in value.type.shape if isinstance(dim, Sym) for name in dim.symbols})
    ranges = {}
    for name in names:
        if name == "B":
            ranges[name] = [1, 1, DEFAULT_MAX_BATCH]
        elif name == "S_past":
            ranges[name] = [1, max(1, length // 2), max(1, length - 1)]
        else:
            ranges[name] = [1, max(1, length // 2), length]
    return ranges


def run_engine_build(build_dir: Path, out: Path) -> Path:
    """Run the written build_engine.py in a fresh Python for the decode graph (what a user runs on a GPU machine),
    writing ``decode.engine`` next to it; ExportError with its last line when it fails."""
    onnx = build_dir / "onnx" / "decode.onnx"
    if not onnx.is_file():
        raise ExportError(f"{onnx} does not exist: run `umc export {build_dir} --format onnx` before --build-engine")
    engine = out / "decode.engine"
    command = [sys.executable, str(out / "build_engine.py"), "--graph", "decode", "--onnx", str(onnx),
               "--output", str(engine)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ExportError(f"building the TensorRT engine took longer than {ENGINE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise ExportError(f"build_engine.py failed: {lines[-1]}")
    return engine


def readme(table: dict, compiled_here: bool, tensorrt: str | None, engine: Path | None) -> str:
    """README.md of the package: its files, the kernels, what was run where it was exported and what was not, and
    how to build the engine."""
    rows = []
    for kernel in table["kernels"]:
        for target, entry in sorted(kernel["targets"].items()):
            rows.append(f"| `{kernel['name']}` | {kernel['dtype']} | {target} | .target {entry['ptx_target']}, "
                        f"PTX ISA {entry['ptx_version']} | {entry['threads']} | {entry['shared_bytes']} |")
    hidden = " or ".join(sorted({str(len(kernel["arguments"]["hidden"])) for kernel in table["kernels"]}))
    dims = "\n".join(f"| {name} | {low} | {opt} | {high} |" for name, (low, opt, high) in table["dims"].items())
    origin = ("compiled here with Triton from umc's rendering of the kernels (the build was compiled without "
              "--target sm_80,sm_90)" if compiled_here else
              "the build's own (`umc compile --target sm_80,sm_90`), each checked against the build's manifest")
    if engine is not None:
        engine_line = f"- `{engine.name}` was built here with TensorRT {tensorrt} by `build_engine.py --graph decode`."
    elif tensorrt is None:
        engine_line = ("- **Not run here**: TensorRT is not installed where this was exported, so the plugin was "
                       "never registered with TensorRT, no ONNX graph was parsed, no engine was built and the kernel "
                       "never ran on a GPU. That happens on a machine with TensorRT and a GPU (below).")
    else:
        engine_line = (f"- TensorRT {tensorrt} is installed where this was exported, but no engine was built "
                       "(export with --build-engine, or run `build_engine.py`).")
    return f"""# TensorRT plugin package: {sanitize_comment(table['spec']['name'])}

Written by `umc export --format tensorrt` (umc {table['umc_version']}). The memory op of the exported ONNX graphs,
the node `umc::lookup_pool`, runs as the TensorRT plugin `umc::lookup_pool`: a `tensorrt.plugin` ahead-of-time
plugin whose kernel is umc's Triton kernel as PTX. TensorRT keeps the kernel in the engine: running the engine needs
no Python and no plugin library. The other `umc::` nodes (top-m selections) import as their standard-op
decompositions (the ONNX model's local functions).

## Files

- `umc_plugins.py`: `register_plugins(capability)` registers the plugin (shape/type rule, AOT implementation:
  kernel name, PTX for the GPU, grid/block/shared memory, no extra scalars). Imports without TensorRT.
- `launch.py`: launch arithmetic and argument-layout checks (pure Python; a copy of `umc.export.tensorrt_launch`).
- `build_engine.py`: builds an engine from `../onnx/decode.onnx` (or `--graph prefill`).
- `kernels.json`: the kernels (sizes, dtype, argument layout, per-target PTX file, sha256, shared memory), the
  graphs' token dims, the default dim ranges. `kernels/*.ptx`: the PTX.

## Kernels

Arguments as TensorRT passes them: inputs `table, address, scores, perm`, no scalars, output `pooled`; the
further PTX parameters ({hidden} per kernel: Triton's scratch pointers) are never read; TensorRT passes them null.
Grid: (B*T tokens, ceil(VDIM / BLOCK_V), 1).

| kernel | dtype | target | PTX | threads per block | shared bytes |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## What was run here, and what was not

- The PTX is {origin}. For each kernel and target the PTX's entry name, parameter types and order, block size,
  unread hidden parameters, scratch and shared memory, and the launch limits were checked.
{engine_line}

## Building the engine

On a machine with TensorRT >= 10.10 (Python), `pip install onnx`, and an NVIDIA GPU of compute capability 8.0 or
newer whose driver loads the PTX ISA version above. PTX for `.target sm_XY` runs on any GPU from sm_XY up, PTX for
`.target sm_XYa` only on sm_XY itself; the plugin takes the newest PTX that runs on the GPU it builds for:

    umc export <build> --format onnx      # if ../onnx/decode.onnx is missing
    python build_engine.py                # ../onnx/decode.onnx -> decode.engine
    python build_engine.py --graph prefill --dim T=1:128:256

The engine is strongly typed: every tensor keeps the ONNX model's dtype (the spec's `{table['spec']['dtype']}`).
Its optimization profile takes each named input dim from this table, unless `--dim NAME=MIN:OPT:MAX` says otherwise:

| dim | min | opt | max |
|---|---|---|---|
{dims}
"""


PLUGIN_SOURCE = '''"""TensorRT plugin for umc's memory op: ONNX node `umc::lookup_pool` -> plugin `umc::lookup_pool`.

Written by `umc export --format tensorrt`. An ahead-of-time `tensorrt.plugin` plugin (TensorRT >= 10.10):
`register_plugins(capability)` registers `umc::lookup_pool` with its shape and type rule and an AOT implementation
that gives TensorRT the Triton kernel's name, its PTX for the GPU (kernels/<name>.sm_XX.ptx) and its launch (grid,
block, shared memory; no extra scalar arguments: every size is a constant of the kernel). TensorRT keeps the kernel
in the engine, so running the engine needs no Python.

The kernel table (kernels.json) is data and the launch arithmetic (launch.py) plain Python: this module imports
without TensorRT; only `register_plugins` needs it.
"""
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Tuple, Union

try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except (ImportError, OSError):  # no TensorRT here: the kernel table and the launch arithmetic still import
    trt = trtp = None

HERE = Path(__file__).resolve().parent
PLUGIN_ID = "umc::lookup_pool"
_registered = []  # the compute capability the plugin was registered for (once per process)


def load_sibling(name):
    """The module `<name>.py` of this directory, imported under a name unique to the directory (packages of several
    builds can be loaded in one process)."""
    module_name = "umc_tensorrt_%s_%s" % (name, hashlib.sha256(str(HERE).encode()).hexdigest()[:12])
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HERE / (name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


launch = load_sibling("launch")
TABLE = json.loads((HERE / "kernels.json").read_text(encoding="utf-8"))


def read_ptx(kernel, target):
    """The PTX text of a kernel record for a target, after checking its sha256 against kernels.json: a PTX file
    changed after export is refused, never launched."""
    record = kernel["targets"][target]
    path = HERE / record["ptx"]
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise launch.LaunchError("%s: sha256 differs from kernels.json (the file changed after export); export again"
                                 % path)
    return data.decode("utf-8")


def constant(expr):
    """The value of a TensorRT shape expression known when the engine is built, else None."""
    if getattr(expr, "is_fake", False) or not expr.is_constant:
        return None
    return expr.constant_value()


def node_facts(dtype_names, table, address, scores, perm, N, E):
    """What TensorRT knows of a lookup_pool node when it builds, in the kernels' terms (None: known only at run
    time): dtype, NPHYS and E (the node's attributes), VDIM, K = H * m, CORES, HAS_PERM (perm holds N * E entries;
    build_engine.py gives a node without a shuffle a one-element placeholder)."""
    vdim, heads, picks, cores, perm_length = (constant(dim) for dim in (
        table.shape_expr[1], address.shape_expr[2], address.shape_expr[3], scores.shape_expr[4], perm.shape_expr[0]))
    return {"dtype": dtype_names.get(table.dtype, str(table.dtype)), "NPHYS": N, "E": E, "VDIM": vdim,
            "K": None if heads is None or picks is None else heads * picks, "CORES": cores,
            "HAS_PERM": None if perm_length is None else int(perm_length == N * E)}


def register_plugins(capability):
    """Register `umc::lookup_pool` with TensorRT for a GPU of compute capability `capability` (major * 10 + minor:
    80 for A100, 90 for H100): its AOT implementation hands TensorRT the PTX that runs there. Once per process;
    RuntimeError where `tensorrt.plugin` with AOT plugins does not import, LaunchError where no PTX runs on the GPU."""
    if trtp is None or not hasattr(trtp, "aot_impl"):
        raise RuntimeError("tensorrt.plugin with ahead-of-time plugins (TensorRT >= 10.10) does not import here: "
                           "run on a machine with TensorRT and an NVIDIA GPU")
    if _registered:
        if _registered[0] != capability:
            raise RuntimeError("%s is already registered for compute capability %d" % (PLUGIN_ID, _registered[0]))
        return
    for kernel in TABLE["kernels"]:
        launch.select_target(kernel["targets"], capability)
    _define_plugin(capability)
    _registered.append(capability)


def _define_plugin(capability):
    """Define the plugin's `trtp.register` (shape and type rule) and `trtp.aot_impl` (kernel and launch). TensorRT
    checks their signatures: the node's inputs, then its attributes N and E, then (aot_impl) outputs and tactic."""
    dtype_names = {trt.DataType.FLOAT: "f32", trt.DataType.HALF: "f16", trt.DataType.BF16: "bf16"}

    @trtp.register(PLUGIN_ID)
    def lookup_pool(table: trtp.TensorDesc, address: trtp.TensorDesc, scores: trtp.TensorDesc,
                    perm: trtp.TensorDesc, N: int, E: int) -> trtp.TensorDesc:
        """pooled (B, T, E * vdim) in the table's dtype, from table (N, vdim), address int64 (B, T, H, m), scores
        (B, T, H, m, cores) in the table's dtype and perm int64 (N * E, or the one-element placeholder)."""
        if (table.dtype not in dtype_names or scores.dtype != table.dtype or address.dtype != trt.DataType.INT64
                or perm.dtype != trt.DataType.INT64):
            raise TypeError("umc::lookup_pool takes a float32/float16/bfloat16 table, scores of the table's dtype "
                            "and int64 address and perm; got table %s, address %s, scores %s, perm %s"
                            % (table.dtype, address.dtype, scores.dtype, perm.dtype))
        return trtp.from_shape_expr((address.shape_expr[0], address.shape_expr[1], table.shape_expr[1] * E),
                                    dtype=table.dtype)

    @trtp.aot_impl(PLUGIN_ID)
    def lookup_pool_aot(table: trtp.TensorDesc, address: trtp.TensorDesc, scores: trtp.TensorDesc,
                        perm: trtp.TensorDesc, N: int, E: int, outputs: Tuple[trtp.TensorDesc], tactic: int
                        ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        """The kernel specialized for this node (its name, its PTX for this GPU), its launch (grid: one program per
        token and per BLOCK_V value columns; block; shared memory) and no extra scalar arguments."""
        kernel = launch.select_kernel(TABLE["kernels"], node_facts(dtype_names, table, address, scores, perm, N, E))
        target = launch.select_target(kernel["targets"], capability)
        params = launch.launch_params(kernel, target, address.shape_expr[0], address.shape_expr[1])
        launch_params = trtp.KernelLaunchParams()
        launch_params.grid_x, launch_params.grid_y, launch_params.grid_z = params.grid
        launch_params.block_x, launch_params.block_y, launch_params.block_z = params.block
        launch_params.shared_mem = params.shared_bytes
        return kernel["name"], read_ptx(kernel, target), launch_params, trtp.SymIntExprs(0)
'''


BUILD_SCRIPT = '''"""Build a TensorRT engine from an exported umc ONNX graph, with the umc::lookup_pool plugin.

Written by `umc export --format tensorrt`. Needs TensorRT >= 10.10 (Python), the `onnx` package and an NVIDIA GPU
of compute capability 8.0 or newer. From this directory:

    python build_engine.py                                # ../onnx/decode.onnx -> decode.engine
    python build_engine.py --graph prefill                # ../onnx/prefill.onnx -> prefill.engine
    python build_engine.py --dim B=1:4:16 --dim S_past=1:64:255

Steps: read the ONNX model (external weight files stay where they are); mark each `umc::lookup_pool` node for the
plugin (attribute plugin_namespace="umc": TensorRT's ONNX parser then imports the node as the registered plugin
instead of its local-function decomposition) and give a node without a shuffle a one-element placeholder for the
kernel's `perm` argument (the kernel specialized without a shuffle never reads it); check the kernels' launch at
the profile's largest sizes; register the plugin for this GPU; parse into a strongly typed network (every tensor
keeps the ONNX model's dtype: the spec's float32, float16 or bfloat16); set one optimization profile from the named
dims' ranges; build; write the serialized engine.
"""
import argparse
import ctypes
import hashlib
import importlib.util
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIN_TENSORRT = (10, 10)
NO_PERM = "umc_lookup_pool_no_perm"
CUDA_CAPABILITY_MAJOR, CUDA_CAPABILITY_MINOR = 75, 76  # CUdevice_attribute values


class BuildFailure(Exception):
    """A build that cannot go on; the message says why and what to do."""


def load_plugins():
    """umc_plugins.py of this directory (the plugin, its kernel table and launch arithmetic), imported under a
    name unique to the directory."""
    module_name = "umc_tensorrt_umc_plugins_%s" % hashlib.sha256(str(HERE).encode()).hexdigest()[:12]
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HERE / "umc_plugins.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def parse_dim(text):
    """"B=1:4:16" -> ("B", (1, 4, 16)); argparse's error unless it names a dim with 0 <= min <= opt <= max."""
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(\\d+):(\\d+):(\\d+)", text)
    if match is None or not int(match.group(2)) <= int(match.group(3)) <= int(match.group(4)):
        raise argparse.ArgumentTypeError("expected NAME=MIN:OPT:MAX with MIN <= OPT <= MAX, got %r" % text)
    return match.group(1), tuple(int(match.group(i)) for i in (2, 3, 4))


def dim_ranges(defaults, overrides):
    """Dim name -> (min, opt, max): kernels.json's defaults, each replaced by a --dim of the same name."""
    ranges = {name: tuple(sizes) for name, sizes in defaults.items()}
    ranges.update(dict(overrides))
    return ranges


def prepare_onnx(model):
    """Bind the plugin to the model's `umc::lookup_pool` nodes (in place) and return how many there are: each gets
    plugin_namespace="umc" (so TensorRT's parser imports it as the plugin, not as its local function), and a node
    without a shuffle gets a one-element int64 placeholder as its fourth input (the kernel's perm argument)."""
    import onnx
    from onnx import helper

    count = 0
    for node in model.graph.node:
        if node.domain != "umc" or node.op_type != "lookup_pool":
            continue
        attributes = {attribute.name: attribute for attribute in node.attribute}
        if not {"N", "E"} <= set(attributes):
            raise BuildFailure("node %r: umc::lookup_pool needs the int attributes N and E" % node.name)
        if "plugin_namespace" not in attributes:
            node.attribute.append(helper.make_attribute("plugin_namespace", "umc"))
        elif helper.get_attribute_value(attributes["plugin_namespace"]) != b"umc":
            raise BuildFailure("node %r: plugin_namespace is not \\"umc\\"" % node.name)
        if len(node.input) < 4 or not node.input[3]:
            if NO_PERM not in {tensor.name for tensor in model.graph.initializer}:
                model.graph.initializer.append(helper.make_tensor(NO_PERM, onnx.TensorProto.INT64, [1], [0]))
            del node.input[3:]
            node.input.append(NO_PERM)
        count += 1
    return count


def profile_shapes(model, ranges):
    """Input name -> (min, opt, max) shapes of every graph input with a dynamic dim, each named dim taken from
    `ranges`; BuildFailure naming an input dim that has no range (or no name)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in initializers or all(dim.HasField("dim_value") for dim in dims):
            continue
        sizes = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value"):
                sizes.append((dim.dim_value,) * 3)
            elif dim.dim_param in ranges:
                sizes.append(ranges[dim.dim_param])
            else:
                raise BuildFailure("input %r dimension %d (%s) has no range: pass --dim %s=MIN:OPT:MAX"
                                   % (value.name, axis, dim.dim_param or "unnamed", dim.dim_param or "NAME"))
        shapes[value.name] = tuple(tuple(size[i] for size in sizes) for i in range(3))
    return shapes


def check_tokens(plugins, graph, ranges, capability):
    """Each kernel's launch at the largest token count the profile allows, checked before TensorRT builds: a grid
    past int32 or CUDA's limits is a LaunchError naming the sizes, not a wrong launch later."""
    def largest(dim):
        """The largest value of a token dim: a number, or a named dim's profile maximum."""
        if dim.isdigit():
            return int(dim)
        if dim not in ranges:
            raise BuildFailure("the token dim %s has no range: pass --dim %s=MIN:OPT:MAX" % (dim, dim))
        return ranges[dim][2]

    for batch, seq in graph["tokens"]:
        for kernel in plugins.TABLE["kernels"]:
            target = plugins.launch.select_target(kernel["targets"], capability)
            plugins.launch.launch_params(kernel, target, largest(batch), largest(seq))


def device_capability(ordinal):
    """Compute capability (major * 10 + minor) of CUDA device `ordinal`, from the driver library."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise BuildFailure("cannot load the CUDA driver (libcuda.so.1): run on a machine with an NVIDIA GPU, or "
                           "pass --sm") from None
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    calls = (("cuInit", lambda: driver.cuInit(0)),
             ("cuDeviceGet", lambda: driver.cuDeviceGet(ctypes.byref(device), ordinal)),
             ("cuDeviceGetAttribute", lambda: driver.cuDeviceGetAttribute(ctypes.byref(major),
                                                                          CUDA_CAPABILITY_MAJOR, device)),
             ("cuDeviceGetAttribute", lambda: driver.cuDeviceGetAttribute(ctypes.byref(minor),
                                                                          CUDA_CAPABILITY_MINOR, device)))
    for name, call in calls:
        status = call()
        if status != 0:
            raise BuildFailure("%s failed with CUDA error %d (device %d)" % (name, status, ordinal))
    return major.value * 10 + minor.value


def import_tensorrt():
    """The tensorrt module; BuildFailure unless TensorRT >= 10.10 imports."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        raise BuildFailure("TensorRT does not import (%s): the engine build needs TensorRT >= %d.%d and an NVIDIA GPU"
                           % (exc, *MIN_TENSORRT)) from None
    version = tuple(int(part) for part in re.findall(r"\\d+", tensorrt.__version__)[:2])
    if version < MIN_TENSORRT:
        raise BuildFailure("TensorRT %s is too old: AOT plugins bound to ONNX nodes need TensorRT >= %d.%d"
                           % (tensorrt.__version__, *MIN_TENSORRT))
    return tensorrt


def import_onnx():
    """The onnx module; BuildFailure saying how to get it."""
    try:
        import onnx
    except ImportError:
        raise BuildFailure("the onnx package does not import: pip install onnx") from None
    return onnx


def build_engine(trt, model, onnx_path, shapes, workspace_mb):
    """The serialized engine of the prepared ONNX model: a strongly typed network (tensor dtypes are the model's),
    one optimization profile (`shapes`), at most `workspace_mb` MiB of workspace."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildFailure("TensorRT could not parse %s: %s" % (onnx_path, errors or "no error reported"))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        name = network.get_input(index).name
        if name in shapes:
            profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildFailure("TensorRT could not build the engine (its log above says why)")
    return engine


def arguments(argv, table):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", choices=sorted(table["graphs"]), default="decode",
                        help="which exported graph to build (default: decode)")
    parser.add_argument("--onnx", type=Path, help="the ONNX file (default: ../onnx/GRAPH.onnx)")
    parser.add_argument("--output", type=Path, help="the engine file (default: GRAPH.engine here)")
    parser.add_argument("--dim", type=parse_dim, action="append", default=[], metavar="NAME=MIN:OPT:MAX",
                        help="a named input dim's range in the optimization profile (repeatable)")
    parser.add_argument("--device", type=int, default=0, help="CUDA device to build for (default: 0)")
    parser.add_argument("--sm", type=int, help="compute capability to build for, e.g. 90 (default: the device's)")
    parser.add_argument("--workspace-mb", type=int, default=4096, help="builder workspace limit in MiB")
    return parser.parse_args(argv)


def main(argv=None):
    """Build the engine; exit status 0 when written, 1 with one line on stderr saying why not."""
    plugins = load_plugins()
    args = arguments(argv, plugins.TABLE)
    graph = plugins.TABLE["graphs"][args.graph]
    onnx_path = args.onnx or HERE / graph["onnx"]
    output = args.output or HERE / (args.graph + ".engine")
    try:
        if not onnx_path.is_file():
            raise BuildFailure("%s does not exist: run `umc export <build> --format onnx` first, or pass --onnx"
                               % onnx_path)
        ranges = dim_ranges(plugins.TABLE["dims"], args.dim)
        trt = import_tensorrt()
        capability = args.sm or device_capability(args.device)
        check_tokens(plugins, graph, ranges, capability)
        model = import_onnx().load(str(onnx_path), load_external_data=False)
        if prepare_onnx(model) == 0:
            raise BuildFailure("%s has no umc::lookup_pool node: nothing for the plugin to bind to" % onnx_path)
        shapes = profile_shapes(model, ranges)
        plugins.register_plugins(capability)
        engine = build_engine(trt, model, onnx_path, shapes, args.workspace_mb)
    except (BuildFailure, plugins.launch.LaunchError, RuntimeError) as exc:
        print("build_engine.py: error: %s" % exc, file=sys.stderr)
        return 1
    with open(output, "wb") as file:
        file.write(engine)
    print("wrote %s (%s, sm_%d, TensorRT %s)" % (output, args.graph, capability, trt.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''
