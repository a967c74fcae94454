'''The torch-tensorrt export format: the build's graphs as torch modules for Torch-TensorRT.

Here, on any machine, each graph (prefill, decode) becomes a ``umc.export.torch_module`` module whose fused
memory ops are single ``torch.ops.umc.*`` custom ops, is exported with ``torch.export`` (batch, sequence and
past lengths dynamic) and the exported program is run against the graph backend at two sizes; a difference
beyond 1e-6 of an output's magnitude stops the export. Then ``compile_trt.py`` is written: on a machine with an
NVIDIA GPU, TensorRT and torch-tensorrt it compiles the modules, with the build's TensorRT plugin for
``umc::lookup_pool`` (``<build>/tensorrt/umc_plugins.py``) bound through ``generate_plugin_converter(...,
use_aot_if_available=True)``. When torch-tensorrt and a GPU are here, the export runs that same script's code
in-process; when not, it says so and leaves the compile to that machine (``build_engine`` makes that an error).
The script reads weights from safetensors through umc: nothing written here holds pickled weights.
'''

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Mapping

import torch

import umc
from umc.dtypes import torch_dtype
from umc.export import ExportContext, ExportError, export_format
from umc.export.torch_library import FAKES
from umc.export.torch_module import (custom_op_counts, difference_from_graph_backend, export_graph, graph_module,
                                     size_ranges)
from umc.ir.core import Graph
from umc.ir.dims import Sym, evaluate_shape

SUBDIR = "torch-tensorrt"
SCRIPT_NAME = "compile_trt.py"
DEFAULT_MAX_BATCH = 8  # the largest batch the export checks and a compile here builds for (as compile_trt.py)
CHECK_SIZES = ({"B": 1, "T": 2, "S_past": 2}, {"B": 3, "T": 5, "S_past": 4})  # neither is what export traced with
TOLERANCE = 1e-6
NEEDS = "the Torch-TensorRT compile must run on a machine with TensorRT, torch-tensorrt and an NVIDIA GPU"

SCRIPT = '''"""Compile this umc build with Torch-TensorRT: one TensorRT-accelerated program per graph (prefill, decode).

Written by `umc export --format torch-tensorrt` into <build>/torch-tensorrt/. Run it on the deployment machine,
which needs an NVIDIA GPU, TensorRT (>= 10.10 for the ahead-of-time plugin), torch-tensorrt and umc:

    python compile_trt.py [--build DIR] [--weights FILE] [--max-batch N] [--graphs prefill,decode]

For each graph it
1. reads the build with umc (manifest and file hashes checked) and the weights from a safetensors file through
   umc: the build's weights.safetensors unless --weights is given (nothing is unpickled);
2. builds the graph's torch module (umc.export.torch_module.graph_module), in which every fused memory op is one
   torch.ops.umc.* custom op;
3. when <build>/tensorrt/umc_plugins.py is there (written by `umc export --format tensorrt`), imports it and
   calls its register_plugins(capability), which registers the TensorRT plugin for umc::lookup_pool with
   tensorrt.plugin for this GPU, then generates the op's Torch-TensorRT converter with
   generate_plugin_converter(..., use_aot_if_available=True), so the plugin's ahead-of-time kernel (PTX) runs
   inside the engine. Ops without a converter (umc::coarse_topm, umc::grid_topm, a umc::lookup_pool without a
   shuffle, and every umc::lookup_pool without the plugin) run in PyTorch between TensorRT engines;
4. exports the module with torch.export (batch, sequence and past lengths dynamic) and compiles it with
   torch_tensorrt.dynamo.compile for one optimization profile: every size from 1 to --max-batch sequences and
   the spec's max_seq_len tokens;
5. runs the compiled program once against umc's graph backend, prints the largest difference, and saves it as
   <graph>.trt.ep with torch_tensorrt.save (ExportedProgram format; load it with torch_tensorrt.load).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from umc.dtypes import torch_dtype
from umc.export.torch_module import (EXAMPLE_SIZES, difference_from_graph_backend, example_inputs, export_graph,
                                     graph_module, size_ranges)
from umc.ir.dims import evaluate_shape
from umc.runtime import read_build
from umc.runtime.session import load_weights_file

try:  # only the deployment machine has these; without them this file still imports and explains
    import torch_tensorrt
    from torch_tensorrt.dynamo.conversion.plugins import generate_plugin_converter
except ImportError:
    torch_tensorrt = None

HERE = Path(__file__).resolve().parent
MAX_BATCH = 8
PLUGIN_OPS = ("umc::lookup_pool",)  # the ops <build>/tensorrt/umc_plugins.py registers with tensorrt.plugin
NEEDS = "needs an NVIDIA GPU, TensorRT (>= 10.10 for the plugin) and torch-tensorrt"


def has_every_operand(node, settings) -> bool:
    """Converter guard: the plugin takes (table, address, scores, perm) as tensors, so a call without the optional
    shuffle (perm None) stays in PyTorch."""
    return all(arg is not None for arg in node.args)


def register_plugin_converters(build_dir: Path, device: str) -> list[str]:
    """Register the build's TensorRT plugins for the GPU ``device`` when the build has the plugin package, and
    generate a Torch-TensorRT converter for each, its ahead-of-time kernel preferred; the ops that got one."""
    path = build_dir / "tensorrt" / "umc_plugins.py"
    if not path.is_file():
        print(f"no TensorRT plugin package at {path.parent} (`umc export --format tensorrt` writes it): "
              f"{', '.join(PLUGIN_OPS)} will run in PyTorch between TensorRT engines")
        return []
    spec = importlib.util.spec_from_file_location("umc_build_tensorrt_plugins", path)
    plugins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugins)
    major, minor = torch.cuda.get_device_capability(device)
    plugins.register_plugins(10 * major + minor)
    for op in PLUGIN_OPS:
        generate_plugin_converter(op, capability_validator=has_every_operand, supports_dynamic_shapes=True,
                                  use_aot_if_available=True)
    print(f"registered the TensorRT plugins of {path} for sm_{major}{minor}: {', '.join(PLUGIN_OPS)} run inside "
          "the engine")
    return list(PLUGIN_OPS)


def profile(graph, ranges) -> list:
    """One torch_tensorrt.Input per graph input: the smallest, a middle and the largest shape TensorRT builds for."""
    smallest = {name: low for name, (low, high) in ranges.items()}
    middle = {name: (low + high + 1) // 2 for name, (low, high) in ranges.items()}
    largest = {name: high for name, (low, high) in ranges.items()}
    return [torch_tensorrt.Input(min_shape=evaluate_shape(value.type.shape, smallest),
                                 opt_shape=evaluate_shape(value.type.shape, middle),
                                 max_shape=evaluate_shape(value.type.shape, largest),
                                 dtype=torch_dtype(value.type.dtype))
            for value in graph.inputs]


def compile_graph(build, weights, kind: str, out_dir: Path, max_batch: int, device: str) -> Path:
    """Export, compile, check and save graph ``kind``; the file written."""
    graph, vocab = build.graphs[kind], build.spec.model.vocab_size
    ranges = size_ranges(build.spec, max_batch)
    exported = export_graph(graph_module(graph, weights).to(device), ranges, vocab)
    compiled = torch_tensorrt.dynamo.compile(exported, arg_inputs=profile(graph, ranges), min_block_size=1)
    worst = difference_from_graph_backend(compiled, graph, weights, EXAMPLE_SIZES, vocab, device=device)
    print(f"{kind}: largest difference from umc's graph backend, relative to each output's magnitude: {worst:.3g} "
          "(inf: a selection differs, which TensorRT's rounding can do where candidate scores tie)")
    path = out_dir / f"{kind}.trt.ep"
    example = list(example_inputs(graph, EXAMPLE_SIZES, vocab, device=device))
    torch_tensorrt.save(compiled, str(path), arg_inputs=example)
    return path


def compile_build(build, weights, out_dir: Path, max_batch: int = MAX_BATCH, kinds=("prefill", "decode"),
                  device: str = "cuda") -> list[Path]:
    """Register the plugin converters, then compile each graph of ``kinds``; the files written."""
    register_plugin_converters(build.path, device)
    return [compile_graph(build, weights, kind, out_dir, max_batch, device) for kind in kinds]


def main(argv=None) -> None:
    """Command line: compile the build this script belongs to (or --build)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=HERE.parent,
                        help="the umc build (default: the one holding this script)")
    parser.add_argument("--weights", type=Path, help="safetensors weights (default: the build's weights.safetensors)")
    parser.add_argument("--out", type=Path, default=HERE,
                        help="where the compiled programs go (default: beside this script)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help=f"largest batch to build for (default {MAX_BATCH})")
    parser.add_argument("--graphs", default="prefill,decode", help="graphs to compile (default: prefill,decode)")
    parser.add_argument("--device", default="cuda", help="the GPU to compile for (default: cuda)")
    args = parser.parse_args(argv)
    if torch_tensorrt is None:
        sys.exit(f"compile_trt.py: torch_tensorrt is not importable here; the compile {NEEDS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"compile_trt.py: no CUDA GPU here; the compile {NEEDS}")
    build = read_build(args.build)
    if args.weights is None and build.weights_file is None:
        sys.exit(f"compile_trt.py: {build.path} has no weights.safetensors; give --weights FILE")
    weights = load_weights_file(args.weights or build.weights_file)
    for path in compile_build(build, weights, args.out, args.max_batch, args.graphs.split(","), args.device):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
'''


def compile_unavailable() -> str | None:
    """None when torch-tensorrt and a CUDA GPU are both here, else why the compile cannot run here."""
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError as exc:
        return f"torch_tensorrt is not importable here ({exc})"
    if not torch.cuda.is_available():
        return "there is no CUDA GPU here"
    return None


def placeholder_weights(graphs: Mapping[str, Graph], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the graphs' parameter types (integer ones, the shuffles, are permutations): what the
    structure check runs on when the build has no weights."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for param in {p.name: p for graph in graphs.values() for p in graph.params}.values():
        shape, dtype = evaluate_shape(param.type.shape, {}), torch_dtype(param.type.dtype)
        weights[param.name] = (torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point
                               else torch.randperm(shape[0], generator=generator))
    return weights


def load_script(path: Path) -> ModuleType:
    """The written ``compile_trt.py`` as a module (so the export runs the very code it ships)."""
    spec = importlib.util.spec_from_file_location("umc_compile_trt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_graph(graph: Graph, weights, spec, max_batch: int) -> dict:
    """Export one graph module and compare it with the graph backend at ``CHECK_SIZES``: what the README reports
    (RuntimeError, a umc bug, when they differ)."""
    ranges = size_ranges(spec, max_batch)
    program = export_graph(graph_module(graph, weights), ranges, spec.model.vocab_size)
    worst = max(difference_from_graph_backend(program.module(), graph, weights, sizes, spec.model.vocab_size)
                for sizes in CHECK_SIZES)
    if worst > TOLERANCE:
        raise RuntimeError(f"umc bug: the exported {graph.name} program differs from the graph backend by {worst:.3g} "
                           f"of an output's magnitude (allowed: {TOLERANCE})")
    fused = sum(1 for node in graph.nodes if node.op in FAKES)
    counts = custom_op_counts(program)
    if sum(counts.values()) != fused:
        raise RuntimeError(f"umc bug: the exported {graph.name} program has {sum(counts.values())} umc custom-op "
                           f"nodes, the graph {fused} fused ops")
    symbols = sorted({s for value in graph.inputs for d in value.type.shape if isinstance(d, Sym) for s in d.symbols})
    return {"counts": counts, "worst": worst, "ranges": {s: ranges[s] for s in symbols},
            "sizes": [{s: sizes[s] for s in symbols} for sizes in CHECK_SIZES]}


def _readme(build, checks: dict, placeholder: bool, compiled: list[Path], reason: str | None) -> str:
    """The README: what was run when these files were written, and what was not."""
    lines = [f"# {build.spec.name}: Torch-TensorRT export", "",
             f"Written by `umc export --format torch-tensorrt` (umc {umc.__version__}).", "",
             "## Run when this was written", ""]
    for kind, check in checks.items():
        ranges = ", ".join(f"{s} in [{low}, {high}]" for s, (low, high) in check["ranges"].items())
        counts = ", ".join(f"{n} umc::{op}" for op, n in sorted(check["counts"].items())) or "no umc custom ops"
        sizes = " and ".join(", ".join(f"{k}={v}" for k, v in at.items()) for at in check["sizes"])
        lines.append(f"- `{kind}`: the graph as a torch module (`umc.export.torch_module.graph_module`) exported with "
                     f"`torch.export.export`, sizes dynamic ({ranges}); the exported program calls {counts}, "
                     f"one node per fused op. Run against umc's graph backend at {sizes}: largest difference "
                     f"{check['worst']:.3g} of an output's magnitude (allowed {TOLERANCE}; integer outputs equal).")
    lines.append("- Weights: " + ("none in the build, so random placeholder weights of the right types: the check "
                                  "covers the structure; compile_trt.py takes the real ones with --weights."
                                  if placeholder else "the weights the export was given."))
    lines += ["", "## Torch-TensorRT compile", ""]
    if compiled:
        lines.append(f"Run here with {SCRIPT_NAME}: wrote " + ", ".join(f"`{p.name}`" for p in compiled) + ".")
    else:
        lines.append(f"Not run here: {reason}. There, with umc installed, run")
    lines += ["", f"    python {SCRIPT_NAME} [--weights FILE] [--max-batch N]", "",
              f"({SCRIPT_NAME}'s docstring lists its steps.) When `../tensorrt/umc_plugins.py` is there "
              "(`umc export --format tensorrt` writes it: the TensorRT plugin for `umc::lookup_pool`), it registers "
              "that plugin for the GPU and binds it with "
              "`generate_plugin_converter(\"umc::lookup_pool\", ..., use_aot_if_available=True)`; "
              "`umc::coarse_topm` and `umc::grid_topm` have no TensorRT plugin and run in PyTorch between TensorRT "
              "engines. It writes `prefill.trt.ep` and `decode.trt.ep` (`torch_tensorrt.save`).", ""]
    return "\n".join(lines)


@export_format("torch-tensorrt", SUBDIR)
def write_torch_tensorrt(ctx: ExportContext) -> None:
    """Torch-TensorRT: the graphs as torch modules (one torch.ops.umc node per fused op) and compile_trt.py.

    The modules are exported with torch.export and checked against the graph backend here; compile_trt.py compiles
    them with torch-tensorrt (the TensorRT plugin for umc::lookup_pool, its ahead-of-time kernel) on a machine with
    TensorRT and a GPU, or here when both are present."""
    unavailable = compile_unavailable()
    reason = (f"{unavailable}; {NEEDS}" if unavailable else None if ctx.weights is not None
              else f"no weights were given and the build has none (run {SCRIPT_NAME} --weights FILE)")
    if reason and ctx.options.get("build_engine"):
        raise ExportError(f"cannot build the engine: {reason}")
    placeholder = ctx.weights is None
    weights = placeholder_weights(ctx.build.graphs) if placeholder else ctx.weights
    checks = {kind: check_graph(graph, weights, ctx.build.spec, DEFAULT_MAX_BATCH)
              for kind, graph in ctx.build.graphs.items()}
    script = ctx.out / SCRIPT_NAME
    script.write_text(SCRIPT)
    compiled = [] if reason else load_script(script).compile_build(ctx.build, weights, ctx.out, DEFAULT_MAX_BATCH)
    (ctx.out / "README.md").write_text(_readme(ctx.build, checks, placeholder, compiled, reason))
    for kind, check in checks.items():
        ctx.say(f"{SUBDIR}: exported {kind} with torch.export ({sum(check['counts'].values())} umc custom-op nodes); "
                f"equal to the graph backend (largest difference {check['worst']:.3g})")
    if reason:
        ctx.say(f"{SUBDIR}: not compiled: {reason}; the files to do it are in {SUBDIR}/ ({SCRIPT_NAME}, README.md)")
    else:
        ctx.say(f"{SUBDIR}: compiled with torch-tensorrt: {', '.join(p.name for p in compiled)}")
