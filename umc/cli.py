"""The ``umc`` command line. User mistakes exit 2 with one clear message, never a traceback."""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from functools import wraps
from pathlib import Path

import click

from umc.cost import MemoryNeeds, SpecCost, human, memory_needs, spec_cost
from umc.fsutil import check_new_file, safetensors_metadata, write_new_file
from umc.launch import nproc_options, record_result, redirect_rank_output, world_for
from umc.resources import require_memory
from umc.spec import INT_MAX, SpecError, load_spec

# `umc eager`: decoding token by token against one full-sequence forward of the same eager model, relative to
# max |logit| (the same computation in another order: tighter than DESIGN.md §7's build-vs-eager 1e-4)
DECODE_TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 5e-2}


def _user_error_types() -> tuple[type, ...]:
    """The exceptions that mean a user mistake (exit 2), imported only when a command has failed."""
    from safetensors import SafetensorError

    from umc.compiler import BuildError
    from umc.export import ExportError
    from umc.kernels import KernelFileError
    from umc.manifest import BuildDirError
    from umc.reference.weights import WeightsError
    from umc.resources import ResourceError
    from umc.runtime.backends import BackendError
    from umc.runtime.checks import BindError, InputError
    from umc.verify import VerifyError

    return (SpecError, WeightsError, BuildError, BuildDirError, BindError, InputError, BackendError, ResourceError,
            VerifyError, KernelFileError, ExportError, SafetensorError, OSError)


def _distributed_error_type() -> type:
    """The exception of a failed distributed run (another rank died or timed out), imported only on failure."""
    from umc.runtime.distributed import DistributedError

    return DistributedError


def _internal_error(exc: BaseException) -> None:
    """Report a bug in umc: one line, the traceback written to a file (and printed with UMC_DEBUG=1)."""
    trace = traceback.format_exc()
    path = Path(tempfile.gettempdir()) / f"umc-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        path.write_text(trace, encoding="utf-8")
        where = f"traceback in {path}"
    except OSError:
        where = "the traceback could not be written; run with UMC_DEBUG=1 to see it"
    if os.environ.get("UMC_DEBUG") == "1":
        click.echo(trace, err=True)
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    click.echo(f"internal error (a bug in umc): {type(exc).__name__}: {first}; {where}", err=True)


def user_errors(command):
    """Exit codes scripts can rely on: 0 success, 1 a verification mismatch (the command exits 1 itself),
    2 a user mistake (one line on stderr, no traceback), 3 an internal error (one line, traceback in a file) or
    a failed distributed run (another rank died or timed out; one line). A rank of a ``--nproc`` launch also
    records its code for the launcher."""

    @wraps(command)
    def run(*args, **kwargs):
        try:
            result = command(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit) as exc:
            code = getattr(exc, "code", getattr(exc, "exit_code", 1))
            record_result(code if isinstance(code, int) else 1)
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            record_result(130, "interrupted")
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - every failure gets its exit code
            try:
                user_mistake = isinstance(exc, _user_error_types())
                distributed = isinstance(exc, _distributed_error_type())
            except Exception:  # noqa: BLE001 - umc itself cannot import: a bug, whatever the first error was
                user_mistake = distributed = False
            if user_mistake or distributed:
                click.echo(f"error: {exc}", err=True)
                record_result(2 if user_mistake else 3, str(exc))
                sys.exit(2 if user_mistake else 3)
            _internal_error(exc)
            record_result(3, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            sys.exit(3)
        record_result(0)
        return result

    return run


def format_cost(cost: SpecCost, needs: MemoryNeeds) -> str:
    """Human-readable summary of a spec's size, per-token work and the memory one sequence needs."""
    from umc.resources import format_bytes

    lines = [
        f"{cost.name} ({cost.dtype})",
        f"  parameters      {human(cost.params_total):>9}  total",
        f"                  {human(cost.params_dense):>9}  dense (all but value tables)",
        f"                  {human(cost.params_values):>9}  value tables",
        f"  FLOPs/token     {human(cost.flops_per_token):>9}  (+{human(cost.attention_flops_per_context_token)} per context token for attention)",
        f"  value bytes/token {human(cost.value_bytes_per_token):>7}  (value rows read, batch 1)",
        f"  memory          {format_bytes(needs.weight_bytes):>9}  weights (dense {format_bytes(needs.dense_weight_bytes)}, "
        f"value tables {format_bytes(needs.value_table_bytes)}, shuffle indices {format_bytes(needs.shuffle_bytes)})",
        f"                  {format_bytes(needs.kv_cache_bytes):>9}  KV cache at max_seq_len {needs.seq_len}, batch {needs.batch}",
        f"                  {format_bytes(needs.prefill_bytes):>9}  working set of a {needs.seq_len}-token prefill "
        f"({format_bytes(needs.decode_bytes)} per decode step)",
        f"  memory units    {len(cost.units)}",
        "    unit     physical   virtual   dense    values  FLOPs/token  row bytes/token",
    ]
    for u in cost.units:
        lines.append(f"    {u.unit:<7} {human(u.physical_slots):>9} {human(u.virtual_slots):>9} {human(u.dense_params):>7}"
                     f" {human(u.value_params):>9} {human(u.flops_per_token):>12} {human(u.value_bytes_per_token):>16}")
    return "\n".join(lines)


class CommandGroup(click.Group):
    """The umc group: commands in modules of their own (``umc run``, ``umc bench``) are imported only when named
    (or listed by ``--help``), so every other command starts without loading torch."""

    ELSEWHERE = {"run": ("umc.generate", "run_command"), "bench": ("umc.bench.command", "bench_command")}

    def list_commands(self, ctx):
        """Every command name, sorted."""
        return sorted({*super().list_commands(ctx), *self.ELSEWHERE})

    def get_command(self, ctx, name):
        """The command called ``name``, importing its module if it lives elsewhere."""
        if name in self.ELSEWHERE:
            module, attribute = self.ELSEWHERE[name]
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="umc")
def main():
    """umc: the UltraMem model compiler."""
    redirect_rank_output()


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def check(spec_path: str, as_json: bool):
    """Validate a spec; print parameters, FLOPs, value bytes, and the memory a run needs.

    Exit 0 on a valid spec; exit 2 with the problem (file, line, key) on an invalid one.
    """
    spec = load_spec(spec_path)
    cost, needs = spec_cost(spec), memory_needs(spec)
    if as_json:
        click.echo(json.dumps({"spec": spec.to_dict(), "cost": cost.to_dict(), "memory": needs.to_dict()}, indent=2))
    else:
        click.echo(format_cost(cost, needs))


WEIGHTS_FILE = "a umc weights file"


def is_umc_weights_file(path: Path) -> bool:
    """True for a safetensors file umc wrote (its metadata format is umc's): the only kind of file
    ``eager --save-weights --force`` may replace. Unreadable files are not umc's."""
    from umc.reference.weights import FORMAT

    return (safetensors_metadata(path) or {}).get("format") == FORMAT


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--seed", type=int, default=None, help="Weight seed (default: the spec's).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Load weights from a safetensors file.")
@click.option("--save-weights", type=click.Path(dir_okay=False), default=None,
              help="Write the model's weights here (a new file; see --force).")
@click.option("--force", is_flag=True, help="Let --save-weights replace a weights file umc wrote (never any other file).")
@click.option("--batch", type=click.IntRange(1), default=2, show_default=True)
@click.option("--prompt", type=click.IntRange(1), default=8, show_default=True, help="Prompt length.")
@click.option("--steps", type=click.IntRange(0), default=8, show_default=True, help="Decode steps after the prompt.")
@user_errors
def eager(spec_path, seed, weights, save_weights, force, batch, prompt, steps):
    """Run the eager reference model on random tokens.

    Prefill a prompt, decode token by token, and check the logits against one
    full-sequence forward (exit 1 on a mismatch).
    """
    import torch

    from umc.reference import build_model, load_weights
    from umc.reference import save_weights as write_weights

    spec = load_spec(spec_path)
    if save_weights:
        check_new_file(Path(save_weights), force=force, replaceable=is_umc_weights_file, what=WEIGHTS_FILE)
    total = prompt + steps
    if total > spec.model.max_seq_len:
        raise SpecError(spec_path, None, "model.max_seq_len", f"prompt + steps = {total} exceeds {spec.model.max_seq_len}")
    needs = memory_needs(spec, batch=batch, seq_len=total)
    require_memory(needs.weight_bytes + 2 * needs.kv_cache_bytes + needs.prefill_bytes, f"umc eager {spec.name}",
                   parts={"weights": needs.weight_bytes, "KV cache (twice)": 2 * needs.kv_cache_bytes,
                          "working set": needs.prefill_bytes})
    model = build_model(spec, seed=seed)
    if weights:
        load_weights(model, weights)
    if save_weights:
        write_new_file(Path(save_weights), lambda tmp: write_weights(model, tmp), force=force,
                       replaceable=is_umc_weights_file, what=WEIGHTS_FILE)
    tokens = torch.randint(0, spec.model.vocab_size, (batch, total), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        started = time.perf_counter()
        full, _ = model(tokens)
        full_s = time.perf_counter() - started
        started = time.perf_counter()
        logits, state = model(tokens[:, :prompt])
        pieces = [logits]
        for t in range(prompt, total):
            logits, state = model(tokens[:, t:t + 1], state)
            pieces.append(logits)
        decode_s = time.perf_counter() - started
    error = (torch.cat(pieces, dim=1) - full).abs().max().item()
    scale = full.abs().max().item()
    if not torch.isfinite(full).all():
        error = float("nan")
    limit = DECODE_TOLERANCE[spec.dtype] * max(scale, 1.0)
    params = sum(p.numel() for p in model.parameters())
    click.echo(f"{spec.name}: {human(params)} parameters, batch {batch}, prompt {prompt}, {steps} decode steps")
    click.echo(f"  full forward {full_s * 1e3:.1f} ms; prefill + decode {decode_s * 1e3:.1f} ms")
    click.echo(f"  decode vs full-sequence logits: max abs error {error:.3e} (max |logit| {scale:.3f}, limit {limit:.1e})")
    if not error <= limit:  # NaN (non-finite logits) never passes
        click.echo("FAIL: decoding does not reproduce the full-sequence forward (or the logits are not finite)", err=True)
        sys.exit(1)
    click.echo("OK")


def print_checks(checks) -> bool:
    """A table of checks; True when all passed."""
    click.echo(f"{'output':<20} {'step':<30} {'max abs':>10} {'max rel':>10} {'limit':>10}  result")
    for c in checks:
        status = "ok" if c.ok else "FAIL"
        note = f"  ({c.note})" if c.note else ""
        click.echo(f"{c.output:<20} {c.step:<30} {c.max_abs:>10.3g} {c.max_rel:>10.3g} {c.limit:>10.3g}  {status}{note}")
    return all(c.ok for c in checks)


def _pass_list(value: str | None) -> tuple[str, ...] | None:
    """--passes: None (the whole pipeline), "none" (no passes), or comma-separated names; empty is a mistake."""
    if value is None:
        return None
    if value.strip() == "none":
        return ()
    names = tuple(p.strip() for p in value.split(",") if p.strip())
    if not names:
        raise click.BadParameter("is empty (allowed: comma-separated pass names, or none for an unoptimized build)",
                                 param_hint="--passes")
    return names


@main.command(name="compile")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Build directory.")
@click.option("--passes", default=None,
              help="Comma-separated passes to run, in order (default: the whole pipeline; none: no passes).")
@click.option("--disable-pass", "disabled", multiple=True, help="Leave out a pass (repeatable).")
@click.option("--dump-after", default=None, help="Write IR text after this pass only, besides the initial and final IR (default: all).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="A safetensors file to check against the graphs and ship in the build.")
@click.option("--force", is_flag=True, help="Replace an existing build directory.")
@click.option("--target", "targets", default=None,
              help="Also compile the generated Triton kernels ahead of time for these GPUs (e.g. sm_80,sm_90).")
@click.option("--ptx-version", type=click.IntRange(60, 99), default=None,
              help="PTX ISA version to emit, times ten (e.g. 80 for 8.0; default: Triton's for each target).")
@click.option("--shard", "shards", type=click.IntRange(1), default=1, show_default=True,
              help="Split every value table over this many ranks (run with --nproc the same).")
@click.option("--partition", type=click.Choice(["auto", "number", "dimension"]), default="auto", show_default=True,
              help="With --shard: split tables by rows (number), by columns (dimension), or per unit by the "
                   "communication-volume model (auto; both volumes are in report.json).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@user_errors
def compile_command(spec_path, out_dir, passes, disabled, dump_after, weights, force, targets, ptx_version, shards,
                    partition, quiet):
    """Compile a spec into a build directory (IR, graphs, generated kernels, report)."""
    from umc.compiler import compile as compile_spec
    from umc.kernels.aot import AOTError, parse_targets

    try:
        chosen_targets = parse_targets(targets) if targets is not None else ()
    except AOTError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    if ptx_version is not None and not chosen_targets:
        raise click.BadParameter("needs --target (it applies to the ahead-of-time compile)", param_hint="--ptx-version")
    say = (lambda _: None) if quiet else (lambda line: click.echo(line, err=True))
    build = compile_spec(spec_path, out_dir, passes=_pass_list(passes), disable=tuple(disabled),
                         dump_after=dump_after, force=force, weights=weights, progress=say, targets=chosen_targets,
                         ptx_version=ptx_version, shards=shards, partition=partition)
    if not quiet:
        final = build.report["decode_cost_batch1"]
        click.echo(f"{build.spec.name}: passes {', '.join(build.passes) or '(none)'}; "
                   f"prefill {len(build.graphs['prefill'].nodes)} nodes, decode {len(build.graphs['decode'].nodes)} nodes; "
                   f"decode FLOPs/token {human(final['initial']['flops'])} -> {human(final['final']['flops'])}")
        from umc.compiler import memory_line

        click.echo(memory_line(build.report["memory"]))


@main.command(name="export")
@click.argument("build_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--format", "fmt", required=True,
              help="onnx, tensorrt, torch-tensorrt or triton-server (tensorrt and triton-server use the onnx export).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="A safetensors file to export (default: the build's weights.safetensors; none: structure only).")
@click.option("--external-data", is_flag=True, help="onnx: keep weights in weights.bin even when small.")
@click.option("--build-engine", is_flag=True,
              help="tensorrt/torch-tensorrt: also build the engine here (needs TensorRT and a GPU).")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True,
              help="triton-server: model instances per device.")
@click.option("--max-batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="triton-server: the largest prefill batch the server forms (decode runs one sequence at a time).")
@click.option("--sequences", type=click.IntRange(1), default=16, show_default=True,
              help="triton-server: decode sequences in flight per instance.")
@click.option("--gpu", is_flag=True, help="triton-server: instances on GPUs (default: CPU).")
@click.option("--force", is_flag=True, help="Replace the format's directory even if it holds files umc did not write.")
@user_errors
def export_command(build_dir, fmt, weights, external_data, build_engine, instances, max_batch_size, sequences, gpu,
                   force):
    """Export a build for other engines, into DIR/<format>/ (listed in the build's manifest).

    onnx writes DIR/onnx/prefill.onnx and decode.onnx (memory-layer ops as umc-domain nodes with
    their decompositions as local functions). The others build on it: run the onnx export first.
    """
    from umc.export.install import export

    options = {"external_data": external_data, "build_engine": build_engine, "instances": instances,
               "max_batch_size": max_batch_size, "sequences": sequences, "gpu": gpu}
    for line in export(build_dir, fmt, weights=weights, options=options, force=force):
        click.echo(line)


def _indices(text: str | None, name: str) -> tuple[int, ...] | str | None:
    """--units/--blocks: comma-separated indices, or 'all'."""
    if text is None or text.strip() == "all":
        return text and "all"
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of indices (allowed: e.g. 0,2 or all)", param_hint=name) from None


BACKEND_HELP = "Backend to run the build on (default graph; see umc.runtime.list_backends())."


@main.command()
@click.argument("build_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--backend", default="graph", show_default=True, help=BACKEND_HELP)
@click.option("--seed", type=click.IntRange(0, INT_MAX), default=None, help="Weight and token seed (default: the spec's).")
@click.option("--steps", type=click.IntRange(0), default=8, show_default=True, help="Decode steps after the prompt.")
@click.option("--batch", type=click.IntRange(1), default=2, show_default=True)
@click.option("--prompt", type=click.IntRange(1), default=8, show_default=True, help="Prompt length.")
@click.option("--units", default=None, help="Verify these memory units alone, one at a time (e.g. 0,2 or all).")
@click.option("--blocks", default=None, help="Verify these blocks alone, one at a time (e.g. 0,1 or all).")
@nproc_options
@user_errors
def verify(build_dir, backend, seed, steps, batch, prompt, units, blocks, nproc, timeout):
    """Check a build against the eager reference.

    Builds the eager model with SEED (or the build's weights.safetensors), runs a prompt and
    STEPS decode steps through both with the build's memory selections forced on the eager
    side, checks each selection stage-wise (rows, columns, grid: a top-m of float64 scores up
    to the measured rounding), the per-core scores, logits, KV cache and query-conv state at
    every step within the dtype's tolerance. A model too big to hold is refused up front;
    --units/--blocks then verify it a slice at a time. A sharded build verifies with --nproc (its shard
    count): every rank checks its own tokens, rank 0's table is printed. Exit 1 on a mismatch.
    """
    from umc.runtime import read_build
    from umc.verify import build_warnings, verify_build, verify_slices

    unit_list, block_list = _indices(units, "--units"), _indices(blocks, "--blocks")
    world = world_for(nproc, timeout, read_build(build_dir))
    if world is not None and (unit_list is not None or block_list is not None):
        raise click.BadParameter("slices are verified unsharded; drop --nproc", param_hint="--units/--blocks")
    if unit_list is None and block_list is None:
        checks = verify_build(build_dir, backend=backend, seed=seed, steps=steps, batch=batch, prompt=prompt,
                              world=world)
    else:
        checks = verify_slices(build_dir, unit_list or (), block_list or (), backend=backend, seed=seed, steps=steps,
                               batch=batch, prompt=prompt)
    for warning in build_warnings(build_dir):
        click.echo(f"warning: {warning}", err=True)
    if not print_checks(checks):
        click.echo("FAIL: the build does not match the eager reference", err=True)
        sys.exit(1)
    click.echo(f"OK: {len(checks)} checks within tolerance")


@main.command(name="verify-golden")
@click.argument("files", metavar="FILE.safetensors...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--backend", default="graph", show_default=True, help=BACKEND_HELP)
@user_errors
def verify_golden_command(files, backend):
    """Check compiled memory layers against golden files.

    Compiles each file's layer through the full pipeline; exit 1 on a mismatch.
    """
    from umc.verify import verify_golden

    failed = 0
    for path in files:
        click.echo(f"== {path}")
        if not print_checks(verify_golden(path, backend=backend)):
            failed += 1
    if failed:
        click.echo(f"FAIL: {failed} of {len(files)} golden files do not match", err=True)
        sys.exit(1)
    click.echo(f"OK: {len(files)} golden files match")

