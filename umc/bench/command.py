"""``umc bench BUILD_OR_SPEC``: decode-step latency per backend against the limits measured in the same run.

For each batch and past length, every contender decodes the same step from the same past (``contenders``),
called round-robin with the read-bandwidth probe (``timing``, ``probes``); the table gives medians and their
spread, tokens/s, each median as a fraction of the bandwidth and compute limits (``limits``) and its ratio
against eager. Peak RSS is measured per contender in a process of its own (``peak``).
"""

from __future__ import annotations

import contextlib
import os
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Callable

import click
import torch

from umc import __version__
from umc.bench.contenders import (COMPILED, EAGER, LAYER_227M, BenchInputError, Contender, check_untouched,
                                  contender_reasons, eager_layer, eager_model, layer_contender, layer_inputs,
                                  model_contender, model_inputs, open_layer, open_model, versions)
from umc.bench.limits import StepWork, layer_step, model_step
from umc.bench.peak import MEASURED_STEPS, WARMUP_STEPS, measure_peak, process_peak_rss
from umc.bench.probes import MIB, GemmRate, ReadProbe, machine_info, measure_gemm
from umc.bench.sharded import bench_sharded
from umc.bench.report import (limits_text, machine_text, make_rows, matplotlib_missing, peaks_text, plot,
                              probes_text, results_text, skipped_text)
from umc.bench.timing import round_robin, summarize, timed_call
from umc.cost import memory_needs
from umc.launch import launched_rank, nproc_options, world_for
from umc.resources import available_memory, format_bytes, require_memory

PROBE = "read-bandwidth probe"
DEFAULT_PAST = 2000  # the paper's decode setting; clipped to leave room for the steps in a spec's max_seq_len
PEAK_STEPS = WARMUP_STEPS + MEASURED_STEPS
MIN_REPS = 9  # every median and ratio the bench reports rests on at least this many interleaved runs


def user_errors(command):
    """``umc.cli.user_errors`` (exit codes 2 and 3 with one line), looked up when the command runs: ``umc.cli``
    imports this module to register the command, so importing it back here at import time would be a cycle
    whenever this module is imported first."""

    @wraps(command)
    def run(*args, **kwargs):
        from umc.cli import user_errors as exit_codes

        return exit_codes(command)(*args, **kwargs)

    return run


def _fail(message: str) -> None:
    """A user mistake found by the bench itself: one line on stderr, exit 2 (as ``umc.cli.user_errors`` does)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def calls_per_config(reps: int, warmup: int) -> int:
    """The most decode calls one contender makes from one past: its first call, the warm-up and timed rounds,
    and the peak-RSS process's steps (``umc.bench.peak``)."""
    return max(1 + warmup + reps, PEAK_STEPS) + 1


def _int_list(text: str, option: str, minimum: int) -> list[int]:
    """A comma-separated list of integers >= ``minimum`` (sorted, without repeats); BadParameter otherwise."""
    try:
        values = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers (e.g. 1,8,64)",
                                 param_hint=option) from None
    if values[0] < minimum:
        raise click.BadParameter(f"{values[0]} is below {minimum}", param_hint=option)
    return values


def _backend_list(text: str | None, reasons: dict[str, str | None]) -> list[str]:
    """The contenders ``--backends`` names (default: all of them), each known; BadParameter naming an unknown one."""
    if text is None:
        return list(reasons)
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise click.BadParameter("is empty", param_hint="--backends")
    for name in names:
        if name not in reasons:
            raise click.BadParameter(f"unknown backend {name!r} (allowed: {', '.join(reasons)})",
                                     param_hint="--backends")
    return names


@dataclass
class Plan:
    """What one bench run times: its configurations (batch, past), how to build each contender, the shared inputs
    of a configuration, the work of its step, and the request that rebuilds a contender in a fresh process."""

    title: str
    target: dict
    configs: list[tuple[int, int]]
    build: Callable[[str], Contender]
    inputs: Callable[[int, int], tuple]
    work: Callable[[int, int], StepWork]
    peak_request: Callable[[str, int, int], dict]


def _model_plan(path: Path, workdir: Path, batches: list[int], pasts: list[int] | None, probe_bytes: int,
                threads: int | None, say: Callable[[str], None], calls: int) -> Plan:
    """A whole model (a build directory, or a spec compiled into ``workdir``) at every batch and past, each
    contender called ``calls`` times per configuration."""
    if not path.is_dir():
        say(f"compiling {path} into a temporary build")
    target = open_model(path, workdir)
    spec = target.spec
    limit = spec.model.max_seq_len - calls  # a session's decode loop adds one position per call
    if pasts is None:
        pasts = sorted({0, min(DEFAULT_PAST, limit)})
    elif pasts[-1] > limit:
        raise click.BadParameter(f"{pasts[-1]} leaves no room for {calls} decode steps: {spec.name}'s max_seq_len "
                                 f"is {spec.model.max_seq_len} (allowed: 0..{limit})", param_hint="--past")
    needs = memory_needs(spec, batch=batches[-1], seq_len=pasts[-1] + 1)
    parts = {"weights": needs.weight_bytes, "past KV cache and one step's copy": 2 * needs.kv_cache_bytes,
             "decode working set": needs.decode_bytes, "bandwidth probe": probe_bytes}
    require_memory(sum(parts.values()), f"umc bench {spec.name}", parts=parts, hint="use a smaller --batch or --past")
    say(f"building the eager reference of {spec.name}")
    model = eager_model(target)
    return Plan(
        title=f"{spec.name} ({spec.dtype}) decode step",
        target={"kind": "model", "name": spec.name, "dtype": spec.dtype, "source": str(path),
                "weights": str(target.weights_file) if target.weights_file else f"seeded (seed {spec.seed})"},
        configs=[(b, p) for p in pasts for b in batches],
        build=lambda name: model_contender(name, target, model, workdir),
        inputs=lambda b, p: model_inputs(spec, b, p),
        work=lambda b, p: model_step(spec, b, p),
        peak_request=lambda name, b, p: {
            "mode": "model", "contender": name, "batch": b, "past": p, "build_dir": str(target.build_dir),
            "weights_file": str(target.weights_file) if target.weights_file else None, "workdir": str(workdir),
            "torch_threads": threads},
    )


def _layer_plan(path: Path, layer_config: str, batches: list[int], names: list[str], probe_bytes: int,
                threads: int | None, say: Callable[[str], None]) -> Plan:
    """One memory layer (``--layer-config``) at every batch, one token per sequence."""
    say(f"building the memory layer ({layer_config})")
    target = open_layer(layer_config, path)
    weights = sum(t.numel() * t.element_size() for t in target.tensors.values())
    parts = {"weights (the tensors, and a copy per contender at most)": weights * (1 + len(names)),
             "bandwidth probe": probe_bytes}
    require_memory(sum(parts.values()), f"umc bench --layer-only {target.name}", parts=parts)
    eager = eager_layer(target) if {EAGER, COMPILED} & set(names) else None
    mem = target.memory
    return Plan(
        title=target.name,
        target={"kind": "layer", "name": target.name, "dtype": target.dtype, "config": target.config,
                "source": layer_config},
        configs=[(b, 0) for b in batches],
        build=lambda name: layer_contender(name, target, eager),
        inputs=lambda b, p: layer_inputs(target, b),
        work=lambda b, p: layer_step(mem, target.d_model, target.dtype, b),
        peak_request=lambda name, b, p: {
            "mode": "layer", "contender": name, "batch": b, "past": 0, "layer": layer_config, "source": str(path),
            "torch_threads": threads},
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


@dataclass
class Timings:
    """Everything the timing loop measured."""

    samples: dict[tuple[str, int, int], list[float]]
    first: dict[tuple[str, int, int], float]
    probe: list[float]
    skipped: dict[str, str]


def _time_all(plan: Plan, contenders: list[Contender], probe: ReadProbe, reps: int, warmup: int,
              skipped: dict[str, str]) -> Timings:
    """Per configuration: every contender's first call (timed alone: a compile happens here; a torch.compile
    failure skips it), then ``warmup`` untimed and ``reps`` timed rounds of all of them and the probe."""
    samples: dict[tuple[str, int, int], list[float]] = {}
    first: dict[tuple[str, int, int], float] = {}
    probe_samples: list[float] = []
    total = len(plan.configs) * (len(contenders) * (1 + warmup + reps) + warmup + reps)
    with click.progressbar(length=total, label="bench", file=sys.stderr, show_pos=True) as bar:
        for batch, past in plan.configs:
            bar.label = f"bench batch {batch} past {past}"
            inputs = plan.inputs(batch, past)
            steps = []
            for contender in list(contenders):
                step = contender.step(inputs)
                before = versions(inputs)
                try:
                    first[(contender.name, batch, past)] = timed_call(step)
                except Exception as exc:  # noqa: BLE001 - a compile failure is a result, everything else a bug
                    if contender.name != COMPILED:
                        raise
                    skipped[COMPILED] = f"torch.compile failed at batch {batch}, past {past}: {_first_line(exc)}"
                    contenders.remove(contender)
                    continue
                check_untouched(contender.name, inputs, before)
                steps.append((contender.name, step))
                bar.update(1)
            timed = round_robin([(PROBE, probe), *steps], reps, warmup, tick=lambda: bar.update(1))
            probe_samples += timed.pop(PROBE)
            samples.update({(name, batch, past): values for name, values in timed.items()})
        bar.update(max(0, total - bar.pos))
    return Timings(samples, first, probe_samples, skipped)


@click.command(name="bench")
@click.argument("source", metavar="BUILD_OR_SPEC", type=click.Path(exists=True, path_type=Path))
@click.option("--backends", default=None,
              help="Comma-separated contenders (default: all): eager, torch-compile and the registered backends.")
@click.option("--batch", "batch_text", default="1,8,64", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--past", "past_text", default=None,
              help="Past lengths (KV cache) to decode after, comma-separated (default: 0 and 2000, or as much as "
                   "max_seq_len leaves room for the bench's steps). Not with --layer-only.")
@click.option("--layer-only", is_flag=True, help="Bench one memory layer instead of the whole model.")
@click.option("--layer-config", default=LAYER_227M, show_default=True,
              help="With --layer-only: 227m (the released config, seeded float32 tensors), spec (the argument's first "
                   "memory unit, when it is the authors' layer) or a golden .safetensors file.")
@click.option("--reps", type=click.IntRange(MIN_REPS), default=15, show_default=True,
              help="Timed rounds per batch and past (each contender once per round).")
@click.option("--warmup", type=click.IntRange(1), default=2, show_default=True, help="Untimed rounds before them.")
@click.option("--probe-mib", type=click.IntRange(1), default=512, show_default=True,
              help="Size of the read-bandwidth probe's matrix in MiB (keep it far above the last-level cache).")
@click.option("--gemm-size", type=click.IntRange(16), default=2048, show_default=True,
              help="n of the n x n fp32 torch.mm whose rate is the compute limit.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads, which the onnxruntime backend's intra-op pool follows (default: torch's choice). On a busy machine, 1 "
                   "avoids waits at every parallel op.")
@click.option("--peak-memory/--no-peak-memory", default=True, show_default=True,
              help="Measure each contender's peak RSS in a process of its own (at the largest batch and past).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every measurement, the probes and the machine here.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a log-log plot of latency against batch per backend (needs matplotlib).")
@user_errors
@nproc_options
def bench_command(source, backends, batch_text, past_text, layer_only, layer_config, reps, warmup, probe_mib, gemm_size,
                  threads, peak_memory, json_out, plot_out, nproc, timeout):
    """Time a decode step on every backend against the limits measured in the same run.

    Every contender (eager, torch-compile, each backend that runs here) decodes the same step from the same
    past, round-robin with a read-bandwidth probe; the table gives median and spread, tokens/s, the median as a
    fraction of the bandwidth and compute limits, and the ratio against eager. Backends that cannot run here
    are listed as skipped with the reason. A sharded build runs with --nproc (its shard count): its backends
    step in lockstep on every rank, with the bytes each step moves against the model (``umc.bench.sharded``).
    """
    started = time.time()
    batches = _int_list(batch_text, "--batch", 1)
    if nproc > 1 or launched_rank() is not None:
        _bench_ranks(source, backends, batches, reps, warmup, nproc, timeout)
        return
    pasts = None if past_text is None else _int_list(past_text, "--past", 0)
    if layer_only and pasts is not None:
        raise click.BadParameter("does not apply to --layer-only (one memory layer has no past)", param_hint="--past")
    if plot_out is not None and (missing := matplotlib_missing()):
        _fail(missing)
    reasons = contender_reasons()
    names = _backend_list(backends, reasons)
    if threads:
        torch.set_num_threads(threads)
    machine = machine_info()
    say = lambda line: click.echo(line, err=True)
    try:
        with tempfile.TemporaryDirectory(prefix="umc-bench-") as tmp:
            probe_bytes = probe_mib * MIB
            plan = _layer_plan(source, layer_config, batches, names, probe_bytes, threads, say) if layer_only else \
                _model_plan(source, Path(tmp), batches, pasts, probe_bytes, threads, say,
                            calls_per_config(reps, warmup))
            measured = _measure(plan, names, reasons, reps, warmup, probe_bytes, gemm_size, peak_memory, say)
    except BenchInputError as exc:
        _fail(str(exc))
    _report(plan, measured, machine, reps, warmup, started, json_out, plot_out)


def _bench_ranks(source: Path, backends: str | None, batches: list[int], reps: int, warmup: int, nproc: int,
                 timeout: float) -> None:
    """``--nproc``: launch the ranks (or, in one, bench the sharded build on it)."""
    from umc.runtime import read_build
    from umc.runtime.backends import BACKENDS

    if not source.is_dir():
        _fail(f"{source}: --nproc benches a sharded build directory (umc compile --shard {nproc}), not a spec")
    names = [n.strip() for n in (backends or "graph,cpu").split(",") if n.strip()]
    unshardable = [n for n in names if n not in BACKENDS or not BACKENDS[n].shardable]
    if unshardable:
        _fail(f"--backends {unshardable[0]} does not run sharded builds (allowed with --nproc: "
              f"{', '.join(n for n, c in BACKENDS.items() if c.shardable)})")
    world = world_for(nproc, timeout, read_build(source))
    bench_sharded(source, names, batches, reps, warmup, world)


@dataclass
class Measured:
    """A finished run: the timings, the GEMM rate, the read-bandwidth probe's figures and the peak RSS per contender."""

    timings: Timings
    gemm: GemmRate
    bandwidth: dict
    peaks: dict[str, dict]


def _measure(plan: Plan, names: list[str], reasons: dict[str, str | None], reps: int, warmup: int, probe_bytes: int,
             gemm_size: int, peak_memory: bool, say: Callable[[str], None]) -> Measured:
    """Set up the contenders that can run, measure the GEMM rate, time everything with the interleaved probe, then
    measure each contender's peak RSS at the largest batch and past."""
    skipped = {name: reasons[name] for name in names if reasons[name]}
    contenders = []
    for name in names:
        if name not in skipped:
            say(f"setting up {name}")
            contenders.append(plan.build(name))
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if any(c.name == COMPILED for c in contenders):
            import torch._dynamo as dynamo

            # one compile per batch and past may be needed: past the limit torch would silently run eager
            limit = max(dynamo.config.recompile_limit, len(plan.configs) + 1)
            stack.enter_context(dynamo.config.patch(recompile_limit=limit))
        say("measuring the GEMM rate")
        gemm = measure_gemm(gemm_size)
        probe = ReadProbe(probe_bytes)
        timings = _time_all(plan, contenders, probe, reps, warmup, skipped)
    read = summarize(timings.probe)
    bandwidth = {"method": probe.describe(), "nbytes": probe.nbytes, "samples_s": timings.probe, **read.to_dict(),
                 "bytes_per_s": probe.nbytes / read.median}
    del probe  # the children measuring peak RSS need the memory more
    peaks = {}
    if peak_memory and timings.samples:
        batch, past = plan.configs[-1]
        # a child holds one contender, this process held all of them: children that together fit in half the free
        # memory run side by side (one per core), so a small model's peak RSS does not take minutes
        side_by_side = max(1, min(os.cpu_count() or 1, available_memory() // (2 * process_peak_rss())))
        say(f"measuring the peak RSS of {', '.join(c.name for c in contenders)}, each in a fresh process "
            f"({side_by_side} at a time)")
        with ThreadPoolExecutor(max_workers=side_by_side) as pool:
            found = pool.map(lambda c: measure_peak(plan.peak_request(c.name, batch, past)), contenders)
            peaks = {c.name: peak for c, peak in zip(contenders, found)}
    return Measured(timings, gemm, bandwidth, peaks)


def _report(plan: Plan, measured: Measured, machine: dict, reps: int, warmup: int, started: float,
            json_out: Path | None, plot_out: Path | None) -> None:
    """Print the machine, probes, limits, results, skips and peaks; write the JSON and the plot when asked."""
    timings, gemm, bandwidth, peaks = measured.timings, measured.gemm, measured.bandwidth, measured.peaks
    bytes_per_s = bandwidth["bytes_per_s"]
    work = {config: plan.work(*config) for config in plan.configs}
    rows = make_rows(timings.samples, timings.first, work, bytes_per_s, gemm.flops_per_s, EAGER,
                     plan.target["kind"] == "layer")
    compiles = {f"batch {b} past {p}": s for (name, b, p), s in timings.first.items() if name == COMPILED}
    cache = machine["last_level_cache_bytes"]
    click.echo(plan.title)
    click.echo(machine_text(machine))
    click.echo(probes_text(bandwidth, gemm.to_dict(), cache))
    click.echo("\nwhat one step must read and compute, and the time that takes at the measured rates:")
    click.echo(limits_text(work, bytes_per_s, gemm.flops_per_s))
    click.echo(f"\nmedian of {reps} interleaved runs after {warmup} warm-up rounds; of limit = limit time / median; "
               f"vs eager = eager median / median")
    click.echo(results_text(rows))
    if compiles:
        click.echo("torch-compile warm-up (first call, compiling): " +
                   "; ".join(f"{where}: {s:.1f} s" for where, s in compiles.items()))
    if timings.skipped:
        click.echo(skipped_text(timings.skipped))
    batch, past = plan.configs[-1]
    if peaks:
        click.echo("\n" + peaks_text(peaks, f"batch {batch} past {past}"))
    process_peak = process_peak_rss()
    click.echo(f"peak RSS of this bench process (every contender loaded, the probe buffer): "
               f"{format_bytes(process_peak)}")
    if json_out is not None:
        ctx = click.get_current_context()
        data = {
            "umc_version": __version__, "argv": sys.argv,
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in ctx.params.items()},
            "started_unix": started, "duration_s": time.time() - started, "machine": machine,
            "target": plan.target, "settings": {"reps": reps, "warmup": warmup, "configs": plan.configs},
            "probes": {"read_bandwidth": bandwidth, "gemm": gemm.to_dict()},
            "limits": [{"batch": b, "past": p, **w.to_dict(), "bandwidth_limit_s": w.bandwidth_limit(bytes_per_s),
                        "compute_limit_s": w.compute_limit(gemm.flops_per_s)} for (b, p), w in work.items()],
            "results": [row.to_dict() for row in rows], "skipped": timings.skipped,
            "torch_compile_warmup_s": compiles,
            "peak_memory": {"batch": batch, "past": past, "per_backend": peaks},
            "process_peak_rss_bytes": process_peak,
        }
        json_out.write_text(json.dumps(data, indent=2) + "\n")
        click.echo(f"wrote {json_out}")
    if plot_out is not None and rows:
        plot(str(plot_out), rows, plan.title)
        click.echo(f"wrote {plot_out}")
