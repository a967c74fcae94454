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
from umc.cost import spec_cost
from umc.ir.core import Graph
from umc.ir.printer import format_graph
from umc.ir.serialize import graph_to_json
from umc.ir.view import to_dot
from umc.lower import lower
from umc.manifest import BuildDirError, file_sha256, read_manifest
from umc.passes import PIPELINE, PASSES, PassResult, apply_pass
from umc.report import BATCHES, decode_cost, node_count
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
    """The pipeline with ``passes`` (default: all, in order) minus ``disabled``; unknown names are errors."""
    chosen = tuple(passes) if passes is not None else PIPELINE
    for name in (*chosen, *disabled):
        if name not in PASSES:
            raise BuildError(f"unknown pass {name!r} (allowed: {', '.join(PIPELINE)})")
    return tuple(p for p in chosen if p not in disabled)


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
        "spec": spec.name, "dtype": spec.dtype,
        "params": {"total": cost.params_total, "dense": cost.params_dense, "values": cost.params_values},
        "units": units,
        "passes": passes,
        "decode_cost_batch1": {"initial": decode_cost(initial["decode"])[0].to_dict(),
                               "final": decode_cost(final_decode)[0].to_dict()},
    }


def _fmt(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def report_markdown(report: dict) -> str:
    """The report as a Markdown page."""
    p = report["params"]
    lines = [f"# umc build report: {report['spec']} ({report['dtype']})", "",
             f"Parameters: {_fmt(p['total'])} total, {_fmt(p['dense'])} dense, {_fmt(p['values'])} value tables.", "",
             "## Memory units (decode, per token)", "",
             "| unit | dense params | value params | batch | FLOPs | weight bytes | value-row bytes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for u in report["units"]:
        for batch, c in u["per_token"].items():
            lines.append(f"| {u['unit']} | {_fmt(u['params_dense'])} | {_fmt(u['params_values'])} | {batch} | "
                         f"{_fmt(c['flops'])} | {_fmt(c['weight_bytes'])} | {_fmt(c['value_bytes'])} |")
    lines += ["", "## Passes", "",
              "| pass | prefill nodes | decode nodes | decode FLOPs/token (B=1) | decode weight bytes/token (B=1) |",
              "| --- | --- | --- | --- | --- |"]
    for entry in report["passes"]:
        pre, dec, cost = entry["prefill"], entry["decode"], entry["decode_cost_batch1"]
        count = lambda c: f"{c['nodes']}+{c['init_nodes']} load-time"
        lines.append(f"| {entry['name']} | {count(pre['before'])} → {count(pre['after'])} | "
                     f"{count(dec['before'])} → {count(dec['after'])} | "
                     f"{_fmt(cost['before']['flops'])} → {_fmt(cost['after']['flops'])} | "
                     f"{_fmt(cost['before']['weight_bytes'])} → {_fmt(cost['after']['weight_bytes'])} |")
    lines += ["", "## What each pass changed", ""]
    for entry in report["passes"]:
        lines.append(f"- **{entry['name']}**: " + ("; ".join(entry["notes"]) if entry["notes"] else "nothing to do"))
    return "\n".join(lines) + "\n"


def _write_tree(root: Path, spec: Spec, passes: tuple[str, ...], initial: dict[str, Graph],
                results: dict[str, list[PassResult]], dump_after: str | None, report: dict) -> None:
    files: dict[str, str] = {"spec.json": _json(spec.to_dict())}
    for kind in ("prefill", "decode"):
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
    artifacts = {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = {"umc_version": __version__, "spec": spec.name, "spec_sha256": spec_digest(spec),
                "passes": list(passes), "artifacts": artifacts}
    (root / "manifest.json").write_text(_json(manifest), encoding="utf-8")


def _check_weights(path: Path, graphs: dict[str, Graph]) -> None:
    """Every parameter the graphs read is in the safetensors file with its shape and dtype (BuildError otherwise)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
            for graph in graphs.values():
                for p in graph.params:
                    if p.name not in names:
                        raise BuildError(f"{path}: no tensor {p.name} (the graph needs {p.type})")
                    meta = f.get_slice(p.name)
                    shape, dtype = tuple(meta.get_shape()), meta.get_dtype()
                    wanted = {"f32": "F32", "f16": "F16", "bf16": "BF16", "i64": "I64"}[p.type.dtype]
                    if shape != p.type.shape or dtype != wanted:
                        raise BuildError(f"{path}: tensor {p.name} is {dtype}{list(shape)}, the graph needs {p.type}")
    except (OSError, SafetensorError) as exc:
        raise BuildError(f"{path}: cannot read safetensors weights: {exc}") from None


def _check_replaceable(out: Path) -> None:
    """--force replaces an empty directory or a umc build holding nothing but its manifest's files."""
    if not out.is_dir():
        raise BuildError(f"{out} is not a directory; --force replaces only umc build directories")
    present = {str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir()}
    if not present:
        return
    try:
        listed = set(read_manifest(out, check_hashes=False)["artifacts"]) | {"manifest.json"}
    except BuildDirError:
        raise BuildError(f"{out} is not a umc build directory (no valid manifest.json); "
                         "--force replaces only builds") from None
    extra = sorted(present - listed)
    if extra:
        raise BuildError(f"{out} holds files the build did not write ({', '.join(extra[:3])}); "
                         "move them away or choose another directory")


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging directory to ``out``. An old build there is moved aside first and
    put back if anything (an error, Ctrl-C) stops the swap; it is deleted only after success."""
    if not out.exists():
        os.replace(staging, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old = trash / "build"
    try:
        os.replace(out, old)
    except OSError as exc:
        shutil.rmtree(trash, ignore_errors=True)
        raise BuildError(f"cannot replace {out}: {exc.strerror}") from None
    try:
        os.replace(staging, out)
    except BaseException as exc:
        try:
            os.replace(old, out)
        except OSError:
            raise BuildError(f"cannot replace {out}, and the old build could not be put back: it is in {old}") from None
        shutil.rmtree(trash, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BuildError(f"cannot replace {out}: {exc.strerror}") from None
        raise
    shutil.rmtree(trash, ignore_errors=True)


def compile(spec_or_path: Spec | str | os.PathLike, out_dir: str | os.PathLike, *, passes: tuple[str, ...] | None = None,
            disable: tuple[str, ...] = (), dump_after: str | None = None, force: bool = False,
            weights: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None) -> Build:
    """Compile a spec (or spec file) into ``out_dir``; see the module docstring for what is written.

    ``weights``: a safetensors file checked against the graphs' parameters (names, shapes, dtypes,
    read from its header only) and copied into the build as ``weights.safetensors``.
    """
    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    chosen = select_passes(passes, disable)
    if dump_after not in (None, "all") and dump_after not in chosen:
        raise BuildError(f"--dump-after {dump_after!r} is not in the pipeline (allowed: all, {', '.join(chosen)})")
    out = Path(out_dir).resolve()
    if out.exists():
        if not force:
            raise BuildError(f"{out} exists (use --force to replace it)")
        _check_replaceable(out)
    say = progress or (lambda _: None)
    say(f"lowering {spec.name}")
    initial = lower(spec)
    results: dict[str, list[PassResult]] = {kind: [] for kind in initial}
    for i, name in enumerate(chosen):
        counts = []
        for kind, graph in initial.items():
            before = results[kind][-1].graph if results[kind] else graph
            results[kind].append(apply_pass(name, before))
            counts.append(f"{kind} {len(before.nodes)}→{len(results[kind][-1].graph.nodes)}")
        say(f"[{i + 1}/{len(chosen)}] {name}: {', '.join(counts)} nodes")
    report = _report(spec, initial, results)
    finals = {k: (results[k][-1].graph if results[k] else initial[k]) for k in initial}
    if weights is not None:
        _check_weights(Path(weights), finals)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        staging.chmod(0o755)
        if weights is not None:
            shutil.copyfile(weights, staging / "weights.safetensors")
        _write_tree(staging, spec, chosen, initial, results, dump_after, report)
        _swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    say(f"wrote {out}")
    return Build(out, spec, chosen, finals, report)

