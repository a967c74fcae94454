"""``umc.compile``: spec -> lowered graphs -> pass pipeline -> a build directory.

The build directory holds everything a runtime needs, the weights optional (big models
compile from shapes alone): the spec, the final graphs as JSON, IR text before and
after each pass, a Graphviz view, a cost report, and a manifest with the sha256 of
every file. It is written into a temporary sibling and renamed into place, so an
interrupted compile never leaves a directory that looks complete. Output is
byte-identical for the same spec and options.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from umc import __version__
from umc.cost import human, memory_needs, spec_cost
from umc.ir.core import Graph, IRError
from umc.ir.verify import verify
from umc.ir.printer import format_graph
from umc.ir.serialize import graph_to_json
from umc.ir.view import to_dot
from umc.kernels import kernel_sources
from umc.kernels.aot import AOTError, compile_kernels
from umc.lower import GRAPH_KINDS, lower
from umc.dtypes import BY_IR
from umc.fsutil import exclusive_lock, rename_noreplace
from umc.manifest import BUILD_FORMAT, BuildDirError, file_sha256, parse_manifest, present_files, unlisted_files
from umc.passes import PIPELINE, PASSES, PassResult, apply_pass
from umc.passes.partition_memory import CHOICES, partition_memory
from umc.resources import format_bytes
from umc.report import BATCHES, decode_cost, node_count, sharding_report
from umc.spec import Spec, load_spec


class BuildError(ValueError):
    """A compile request that cannot be carried out (bad option, existing directory): a user mistake."""


@dataclass(frozen=True)
class Build:
    """A finished build directory and what went into it."""

    path: Path
    spec: Spec
    passes: tuple[str, ...]
    graphs: dict[str, Graph]
    report: dict


def spec_digest(spec: Spec) -> str:
    """sha256 of the spec's canonical JSON (what the build depends on, not the file's formatting)."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()


def select_passes(passes: tuple[str, ...] | None, disabled: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The pipeline with ``passes`` (default: all, in order; ``()`` for an unoptimized build) minus ``disabled``.

    Unknown names are errors, and so is disabling every pass that was asked for: an empty pipeline is
    chosen explicitly (``passes=()``, ``--passes none``), never by accident.
    """
    chosen = tuple(passes) if passes is not None else PIPELINE
    for name in (*chosen, *disabled):
        if name not in PASSES:
            raise BuildError(f"unknown pass {name!r} (allowed: {', '.join(PIPELINE)}, or none)")
    remaining = tuple(p for p in chosen if p not in disabled)
    if chosen and not remaining:
        raise BuildError(f"--disable-pass leaves none of the passes {', '.join(chosen)}; "
                         "for an unoptimized build say --passes none")
    return remaining


def _dump(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _json(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _report(spec: Spec, initial: dict[str, Graph], results: dict[str, list[PassResult]]) -> dict:
    cost = spec_cost(spec)
    final_decode = results["decode"][-1].graph if results["decode"] else initial["decode"]
    units = []
    per_batch = {b: decode_cost(final_decode, b)[1] for b in BATCHES}
    for j, unit in enumerate(cost.units):
        units.append({
            "unit": unit.unit, "params_dense": unit.dense_params, "params_values": unit.value_params,
            "slots_physical": unit.physical_slots, "slots_virtual": unit.virtual_slots,
            "per_token": {str(b): per_batch[b][j].to_dict() for b in BATCHES},
        })
    passes = []
    before = dict(initial)
    for i, name in enumerate(r.name for r in results["prefill"]):
        entry = {"name": name, "notes": list(results["prefill"][i].notes)}
        for kind in ("prefill", "decode"):
            after = results[kind][i].graph
            entry[kind] = {"before": node_count(before[kind]), "after": node_count(after)}
            before[kind] = after
        entry["decode_cost_batch1"] = {
            "before": decode_cost(results["decode"][i - 1].graph if i else initial["decode"])[0].to_dict(),
            "after": decode_cost(results["decode"][i].graph)[0].to_dict(),
        }
        passes.append(entry)
    return {
        "spec": spec.name, "dtype": spec.dtype, "memory": memory_needs(spec).to_dict(),
        "params": {"total": cost.params_total, "dense": cost.params_dense, "values": cost.params_values},
        "units": units,
        "passes": passes,
        "decode_cost_batch1": {"initial": decode_cost(initial["decode"])[0].to_dict(),
                               "final": decode_cost(final_decode)[0].to_dict()},
        "sharding": sharding_report(final_decode),
    }


def memory_line(memory: dict) -> str:
    """What a run needs, in one sentence: weights, KV cache and prefill working set at max_seq_len, batch 1."""
    return (f"Memory: {format_bytes(memory['weight_bytes'])} of weights, {format_bytes(memory['kv_cache_bytes'])} of KV "
            f"cache at max_seq_len {memory['seq_len']} (batch {memory['batch']}), "
            f"{format_bytes(memory['prefill_bytes'])} working set of a full prefill.")


def markdown_text(text: str) -> str:
    """``text`` with Markdown's special characters escaped, so a spec name cannot restyle the report."""
    return "".join("\\" + c if c in "\\`*_[]<>|#" else c for c in text)


def report_markdown(report: dict) -> str:
    """The report as a Markdown page."""
    p = report["params"]
    lines = [f"# umc build report: {markdown_text(report['spec'])} ({report['dtype']})", "",
             f"Parameters: {human(p['total'])} total, {human(p['dense'])} dense, {human(p['values'])} value tables.", "",
             memory_line(report["memory"]), "",
             "## Memory units (decode, per token)", "",
             "| unit | dense params | value params | batch | FLOPs | weight bytes | value-row bytes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for u in report["units"]:
        for batch, c in u["per_token"].items():
            lines.append(f"| {u['unit']} | {human(u['params_dense'])} | {human(u['params_values'])} | {batch} | "
                         f"{human(c['flops'])} | {human(c['weight_bytes'])} | {human(c['value_bytes'])} |")
    lines += ["", "## Passes", "",
              "| pass | prefill nodes | decode nodes | decode FLOPs/token (B=1) | decode weight bytes/token (B=1) |",
              "| --- | --- | --- | --- | --- |"]
    for entry in report["passes"]:
        pre, dec, cost = entry["prefill"], entry["decode"], entry["decode_cost_batch1"]
        count = lambda c: f"{c['nodes']}+{c['init_nodes']} load-time"
        lines.append(f"| {entry['name']} | {count(pre['before'])} → {count(pre['after'])} | "
                     f"{count(dec['before'])} → {count(dec['after'])} | "
                     f"{human(cost['before']['flops'])} → {human(cost['after']['flops'])} | "
                     f"{human(cost['before']['weight_bytes'])} → {human(cost['after']['weight_bytes'])} |")
    lines += ["", "## What each pass changed", ""]
    for entry in report["passes"]:
        lines.append(f"- **{entry['name']}**: " + ("; ".join(entry["notes"]) if entry["notes"] else "nothing to do"))
    lines += sharding_markdown(report.get("sharding"))
    lines += kernels_markdown(report.get("kernels", {}))
    return "\n".join(lines) + "\n"


def sharding_markdown(sharding: dict | None) -> list[str]:
    """The report's sharding section: per unit, the partitioning, both partitionings' bytes per token and the
    largest shard of its table."""
    if not sharding:
        return []
    lines = ["", f"## Sharding ({sharding['shards']} ranks)", "",
             "| unit | partition | bytes sent per token, number-wise | dimension-wise | table | largest shard |",
             "| --- | --- | --- | --- | --- | --- |"]
    for u in sharding["units"]:
        per, table = u["bytes_per_token"], u["table_bytes"]
        lines.append(f"| {u['unit']} | {u['partition']} | {human(per['number'])} | {human(per['dimension'])} | "
                     f"{format_bytes(table['whole'])} | {format_bytes(table['largest_shard'])} |")
    return lines


def kernels_markdown(kernels: dict) -> list[str]:
    """The report's kernel section: each generated kernel, who uses it, and what it uses per compiled target."""
    if not kernels:
        return []
    lines = ["", "## Kernels (kernels/)", "", "| kernel | used by | target | registers | shared bytes | local bytes | warps |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in kernels.items():
        used = markdown_text(", ".join(entry["used_by"]))
        for target, use in (entry.get("targets") or {"—": None}).items():
            numbers = ("—",) * 4 if use is None else (use["registers"], use["shared_bytes"], use["local_bytes"],
                                                      use["num_warps"])
            lines.append(f"| `{name}` | {used} | {target} | " + " | ".join(map(str, numbers)) + " |")
    return lines


def _write_tree(root: Path, spec: Spec, passes: tuple[str, ...], initial: dict[str, Graph],
                results: dict[str, list[PassResult]], dump_after: str | None, report: dict) -> None:
    files: dict[str, str] = {"spec.json": _json(spec.to_dict())}
    for kind in GRAPH_KINDS:
        files[f"ir/{kind}.00-initial.txt"] = format_graph(initial[kind])
        for i, result in enumerate(results[kind], start=1):
            if dump_after in (None, "all", result.name) or i == len(results[kind]):
                files[f"ir/{kind}.{i:02d}-{result.name}.txt"] = format_graph(result.graph)
        final = results[kind][-1].graph if results[kind] else initial[kind]
        files[f"graphs/{kind}.json"] = _json(graph_to_json(final))
    final_prefill = results["prefill"][-1].graph if results["prefill"] else initial["prefill"]
    files["graph.dot"] = to_dot(final_prefill)
    files["report.json"] = _json(report)
    files["report.md"] = report_markdown(report)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_dump(text), encoding="utf-8")
    if shutil.which("dot"):
        drawn = subprocess.run(["dot", "-Tsvg", str(root / "graph.dot"), "-o", str(root / "graph.svg")],
                               capture_output=True, text=True)
        if drawn.returncode != 0:
            raise BuildError(f"Graphviz dot could not draw graph.dot: {drawn.stderr.strip()[:300]}")
    artifacts = {name: file_sha256(root / name) for name in present_files(root)}
    manifest = {"build_format": BUILD_FORMAT, "umc_version": __version__, "spec": spec.name,
                "spec_sha256": spec_digest(spec), "passes": list(passes), "artifacts": artifacts}
    (root / "manifest.json").write_text(_json(manifest), encoding="utf-8")


def _check_weights(path: Path, graphs: dict[str, Graph]) -> None:
    """The safetensors file holds exactly the model's parameters (those of the lowered graphs) with
    their shapes and dtypes: a missing, mismatched or extra tensor is a BuildError at compile time,
    not a failure when the build is loaded. Only the file's header is read."""
    from safetensors import SafetensorError, safe_open

    wanted = {p.name: p.type for graph in graphs.values() for p in graph.params}
    try:
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
            for name, type_ in wanted.items():
                if name not in names:
                    raise BuildError(f"{path}: no tensor {name} (the model needs {type_})")
                meta = f.get_slice(name)
                shape, dtype = tuple(meta.get_shape()), meta.get_dtype()
                if shape != type_.shape or dtype != BY_IR[type_.dtype].safetensors:
                    raise BuildError(f"{path}: tensor {name} is {dtype}{list(shape)}, the model needs {type_}")
    except (OSError, SafetensorError) as exc:
        raise BuildError(f"{path}: cannot read safetensors weights: {exc}") from None
    extra = sorted(names - set(wanted))
    if extra:
        raise BuildError(f"{path}: tensor {extra[0]} is not a parameter of the model ({len(extra)} extra in all); "
                         "the file must hold the model's parameters only")


def _output_path(given: Path) -> Path:
    """The absolute build path: its parent resolved, the last component kept as given, so a symbolic link at
    the target is refused rather than followed (BuildError), as is a path that cannot be resolved."""
    try:
        out = given.resolve() if given.name in ("", ".", "..") else given.parent.resolve() / given.name
    except (OSError, RuntimeError) as exc:
        raise BuildError(f"{given}: cannot resolve the path ({exc})") from None
    if out.is_symlink():
        raise BuildError(f"{given} is a symbolic link; umc compile writes only to a real directory (give its target)")
    return out


def _check_target(out: Path) -> None:
    """Refuse, before anything walks, reads or writes it, a target no build may replace: the
    filesystem root, the home directory, the current directory or any of its ancestors."""
    cwd = Path.cwd().resolve()
    home = Path(os.path.expanduser("~"))
    if out == Path(out.anchor):
        reason = "the filesystem root"
    elif home.is_absolute() and out == home.resolve():
        reason = "your home directory"
    elif out == cwd:
        reason = "the current directory"
    elif out in cwd.parents:
        reason = "an ancestor of the current directory"
    else:
        return
    raise BuildError(f"{out} is {reason}; umc compile writes only to a build directory of its own "
                     "(choose a new or empty directory)")


def _check_replaceable(path: Path, out: Path) -> None:
    """--force replaces an empty directory or a umc build (any build format) holding nothing but
    its manifest's files. ``path`` is checked; errors name ``out``, where the user put it."""
    if path.is_symlink() or not path.is_dir():
        raise BuildError(f"{out} is not a directory; --force replaces only umc build directories")
    if not any(path.iterdir()):
        return
    try:
        manifest = parse_manifest(path)
    except BuildDirError:
        raise BuildError(f"{out} is not a umc build directory (no valid manifest.json); "
                         "--force replaces only builds") from None
    extra = unlisted_files(path, manifest)
    if extra:
        raise BuildError(f"{out} holds files the build did not write ({', '.join(extra[:3])}); "
                         "move them away or choose another directory")


def _swap_into_place(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished staging directory to ``out``, checking and acting in one step.

    Without ``force`` the rename is no-replace: whatever appeared at ``out`` during the compile is
    refused and left untouched. With ``force`` the swap runs under an exclusive lock on the parent
    directory (so concurrent umc compiles take turns), and an existing ``out`` is replaced only
    as ``_replace_build`` allows.
    """
    if not force:
        try:
            rename_noreplace(staging, out)
        except FileExistsError:
            raise BuildError(f"{out} exists (use --force to replace it)") from None
        return
    with exclusive_lock(out.parent):
        if not os.path.lexists(out):
            try:
                rename_noreplace(staging, out)
            except FileExistsError:
                raise BuildError(f"{out} appeared while compiling and was left alone; run again to replace it") from None
            return
        _check_replaceable(out, out)
        _replace_build(staging, out)


def _replace_build(staging: Path, out: Path) -> None:
    """Swap ``staging`` in for the old build at ``out`` (the caller holds the parent's lock and has
    checked ``out``). The old build moves into a fresh private directory, is checked again there
    (a file written into it after the first check is caught, not deleted), and is put back with a
    no-replace rename if that check or anything else (an error, Ctrl-C) stops the swap; it is
    deleted only after success. Both renames are plain renames: the first targets a name in a
    directory created here, and a directory renamed onto an existing path can replace only an
    empty directory, which --force may replace anyway.
    """
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old = trash / "build"
    try:
        os.replace(out, old)
    except OSError as exc:
        shutil.rmtree(trash, ignore_errors=True)
        raise BuildError(f"cannot replace {out}: {exc.strerror}") from None
    try:
        _check_replaceable(old, out)
        os.replace(staging, out)
    except BaseException as exc:
        try:
            rename_noreplace(old, out)
        except OSError:
            raise BuildError(f"cannot replace {out}, and the old build could not be put back: it is in {old}") from None
        shutil.rmtree(trash, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BuildError(f"cannot replace {out}: {exc.strerror}") from None
        raise
    shutil.rmtree(trash, ignore_errors=True)


def compile(spec_or_path: Spec | str | os.PathLike, out_dir: str | os.PathLike, *, passes: tuple[str, ...] | None = None,
            disable: tuple[str, ...] = (), dump_after: str | None = None, force: bool = False,
            weights: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None,
            targets: tuple[int, ...] = (), ptx_version: int | None = None, shards: int = 1,
            partition: str = "auto") -> Build:
    """Compile a spec (or spec file) into ``out_dir``; see the module docstring for what is written.

    ``weights``: a safetensors file checked against the model's parameters (every one present with
    its shape and dtype, nothing else; read from its header only) and copied into the build as
    ``weights.safetensors``. An existing ``out_dir`` is refused unless ``force`` (see
    ``_check_replaceable``); the final rename checks again, so a directory that appears during
    the compile is refused too. The generated Triton kernels are written to ``kernels/``; with
    ``targets`` (compute capabilities, e.g. (80, 90)) they are also compiled ahead of time to PTX and
    cubins there (``ptx_version``: Triton's default per target when None), and what each uses is reported.
    ``shards`` > 1 splits every value table over that many ranks (the ``partition_memory`` pass, after the
    pipeline; ``partition``: auto, number or dimension), for ``umc.runtime.load(..., world=...)``.
    """
    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    chosen = select_passes(passes, disable)
    if not isinstance(shards, int) or shards < 1:
        raise BuildError(f"--shard is {shards!r} (allowed: an integer >= 1; 1 leaves the tables whole)")
    if partition not in CHOICES:
        raise BuildError(f"--partition is {partition!r} (allowed: {', '.join(CHOICES)})")
    if shards > 1 and "kernel_fusion" not in chosen:
        raise BuildError("--shard splits the lookup_pool ops the kernel_fusion pass makes; keep kernel_fusion "
                         "in the pipeline")
    if dump_after not in (None, "all") and dump_after not in chosen:
        raise BuildError(f"--dump-after {dump_after!r} is not in the pipeline (allowed: all, {', '.join(chosen)})")
    out = _output_path(Path(out_dir))
    _check_target(out)
    if os.path.lexists(out):
        if not force:
            raise BuildError(f"{out} exists (use --force to replace it)")
        _check_replaceable(out, out)
    say = progress or (lambda _: None)
    say(f"lowering {spec.name}")
    initial = lower(spec)
    if weights is not None:
        _check_weights(Path(weights), initial)
    results: dict[str, list[PassResult]] = {kind: [] for kind in initial}
    for i, name in enumerate(chosen):
        counts = []
        for kind, graph in initial.items():
            before = results[kind][-1].graph if results[kind] else graph
            results[kind].append(apply_pass(name, before))
            counts.append(f"{kind} {len(before.nodes)}→{len(results[kind][-1].graph.nodes)}")
        say(f"[{i + 1}/{len(chosen)}] {name}: {', '.join(counts)} nodes")
    if shards > 1:
        chosen = (*chosen, "partition_memory")
        sharding = partition_memory(shards, partition)
        for kind, graph in initial.items():
            before = results[kind][-1].graph if results[kind] else graph
            try:
                after, notes = sharding(before)
            except IRError as exc:
                raise BuildError(f"--shard {shards} --partition {partition}: {exc}") from None
            results[kind].append(PassResult("partition_memory", verify(after), tuple(notes)))
        say(f"partition_memory: value tables split over {shards} ranks")
    finals = {k: (results[k][-1].graph if results[k] else initial[k]) for k in initial}
    kernels = kernel_sources(finals)
    report = _report(spec, initial, results)
    report["kernels"] = {name: {"op": source.op, "specialization": source.specialization, "constants": source.constants,
                                "used_by": list(users)} for name, (source, users) in kernels.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        staging.chmod(0o755)
        if weights is not None:
            shutil.copyfile(weights, staging / "weights.safetensors")
        for name, (source, users) in kernels.items():  # written first: the ahead-of-time compile reads them
            (staging / "kernels").mkdir(exist_ok=True)
            (staging / "kernels" / f"{name}.py").write_text(source.text(users), encoding="utf-8")
        if targets:
            say(f"compiling {len(kernels)} kernels for {', '.join(f'sm_{cc}' for cc in targets)}")
            try:
                compiled = compile_kernels(staging / "kernels", targets, ptx_version)
            except AOTError as exc:
                raise BuildError(f"ahead-of-time kernel compile failed: {exc}") from None
            for name, per_target in compiled.items():
                report["kernels"][name]["targets"] = per_target
        _write_tree(staging, spec, chosen, initial, results, dump_after, report)
        _swap_into_place(staging, out, force)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    say(f"wrote {out}")
    return Build(out, spec, chosen, finals, report)

