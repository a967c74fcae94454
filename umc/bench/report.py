"""What ``umc bench`` shows: one row per contender, batch and past, the probes, the limits, and the plot.

Every figure is derived from medians: a contender's latency is the median of its interleaved timed calls; its
fraction of a limit is (the limit's time) / (its median), 1.0 meaning it runs at the limit; its ratio against
eager is (eager's median) / (its median), above 1 meaning faster than eager.
"""

from __future__ import annotations

from dataclasses import dataclass

from umc.bench.limits import StepWork
from umc.bench.timing import Summary, summarize
from umc.resources import format_bytes

MATPLOTLIB_PIN = "matplotlib==3.11.2"


@dataclass(frozen=True)
class Row:
    """One contender at one batch and past: its timings and what they mean against the limits and eager."""

    backend: str
    batch: int
    past: int
    samples: tuple[float, ...]
    first_call_s: float
    work: StepWork
    bandwidth_limit_s: float
    compute_limit_s: float
    vs_eager: float | None
    layer: bool

    @property
    def summary(self) -> Summary:
        """Median and spread of the timed calls."""
        return summarize(self.samples)

    @property
    def tokens_per_s(self) -> float:
        """Tokens decoded per second at the median: one per sequence per step."""
        return self.batch / self.summary.median

    @property
    def bandwidth_fraction(self) -> float:
        """The bandwidth limit's time over the median (1.0: the step ran as fast as its reads allow)."""
        return self.bandwidth_limit_s / self.summary.median

    @property
    def compute_fraction(self) -> float:
        """The compute limit's time over the median."""
        return self.compute_limit_s / self.summary.median

    @property
    def value_row_bytes_per_s(self) -> float:
        """Effective bandwidth of the value-row reads: the rows' bytes over the median step."""
        return self.work.value_row_bytes / self.summary.median

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        out = {"backend": self.backend, "batch": self.batch, "past": self.past, "samples_s": list(self.samples),
               **self.summary.to_dict(), "first_call_s": self.first_call_s, "tokens_per_s": self.tokens_per_s,
               "bandwidth_limit_s": self.bandwidth_limit_s, "bandwidth_fraction": self.bandwidth_fraction,
               "compute_limit_s": self.compute_limit_s, "compute_fraction": self.compute_fraction,
               "vs_eager": self.vs_eager}
        if self.layer:
            out["value_row_bytes_per_s"] = self.value_row_bytes_per_s
        return out


def make_rows(samples: dict[tuple[str, int, int], list[float]], first: dict[tuple[str, int, int], float],
              work: dict[tuple[int, int], StepWork], bytes_per_s: float, flops_per_s: float, eager: str,
              layer: bool) -> list[Row]:
    """Rows for every timed (contender, batch, past), with limits from the measured rates and ratios to eager."""
    rows = []
    for (name, batch, past), values in samples.items():
        step = work[(batch, past)]
        reference = samples.get((eager, batch, past))
        ratio = summarize(reference).median / summarize(values).median if reference else None
        rows.append(Row(name, batch, past, tuple(values), first[(name, batch, past)], step,
                        step.bandwidth_limit(bytes_per_s), step.compute_limit(flops_per_s), ratio, layer))
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def _rate(count: float, unit: str) -> str:
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {prefix}{unit}"
    return f"{count:.3g} {unit}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def machine_text(machine: dict) -> str:
    """One line: the CPU, its cores, the torch threads and how busy the machine was when the bench started."""
    load = machine["load_average_1min"]
    busy = ""
    if load is not None and load >= machine["cpu_count"] / 2:
        busy = (" (busy: other processes compete for the cores; with several torch threads that adds waits at every "
                "parallel op: --threads 1 measures more steadily)")
    shown = "unknown" if load is None else f"{load:.2f}"
    return (f"machine: {machine['cpu']}, {machine['cpu_count']} cores, torch {machine['torch']} with "
            f"{machine['torch_threads']} threads, load average {shown} at the start{busy}")


def probes_text(bandwidth: dict, gemm: dict, cache: int | None) -> str:
    """The two probe lines: what was measured, how, and the figure the limits use."""
    spread = f"p10-p90 {_rate(bandwidth['nbytes'] / bandwidth['p90_s'], 'B/s')}-" \
             f"{_rate(bandwidth['nbytes'] / bandwidth['p10_s'], 'B/s')}"
    small = ""
    if cache is not None and bandwidth["nbytes"] < 4 * cache:
        small = f"; NOTE: not far larger than the {format_bytes(cache)} last-level cache, so this is not a DRAM figure"
    return "\n".join([
        f"probe: read bandwidth {_rate(bandwidth['bytes_per_s'], 'B/s')} ({bandwidth['method']}, median of "
        f"{bandwidth['n']} runs interleaved with the timed steps, {spread}{small})",
        f"probe: fp32 GEMM {_rate(gemm['flops_per_s'], 'FLOP/s')} ({gemm['method']}, median of {gemm['n']} after one "
        f"warm-up)",
    ])


def limits_text(work: dict[tuple[int, int], StepWork], bytes_per_s: float, flops_per_s: float) -> str:
    """Per batch and past: bytes the step must read, FLOPs, and the time each takes at the measured rates."""
    lines = [[str(b), str(p), format_bytes(w.total_bytes), _ms(w.bandwidth_limit(bytes_per_s)), f"{w.flops:.3g}",
              _ms(w.compute_limit(flops_per_s))] for (b, p), w in sorted(work.items())]
    return _table(["batch", "past", "bytes/step", "bw limit ms", "FLOPs/step", "compute limit ms"], lines)


def results_text(rows: list[Row]) -> str:
    """The main table: one line per contender, batch and past."""
    layer = any(r.layer for r in rows)
    header = ["backend", "batch", "past", "median ms", "p10-p90 ms", "tokens/s", "of bw limit", "of compute limit",
              "vs eager", *(["value rows"] if layer else []), "first call s"]
    lines = []
    for r in sorted(rows, key=lambda r: (r.past, r.batch, r.backend)):
        s = r.summary
        lines.append([r.backend, str(r.batch), str(r.past), _ms(s.median), f"{_ms(s.p10)}-{_ms(s.p90)}",
                      f"{r.tokens_per_s:.4g}", f"{r.bandwidth_fraction:.1%}", f"{r.compute_fraction:.1%}",
                      "-" if r.vs_eager is None else f"{r.vs_eager:.2f}x",
                      *([_rate(r.value_row_bytes_per_s, "B/s")] if layer else []), f"{r.first_call_s:.3g}"])
    return _table(header, lines)


def peaks_text(peaks: dict[str, dict], where: str) -> str:
    """Peak RSS per contender (each measured in a process of its own), what its setup and its decode steps added,
    or why it was not measured."""
    lines = []
    for name, peak in peaks.items():
        if "error" in peak:
            lines.append([name, "-", "-", "-", peak["error"]])
            continue
        imports, ready, top = peak["rss_after_imports_bytes"], peak["rss_before_steps_bytes"], peak["peak_rss_bytes"]
        lines.append([name, format_bytes(top), "-" if None in (imports, ready) else format_bytes(ready - imports),
                      "-" if ready is None else format_bytes(max(0, top - ready)), peak["method"]])
    return f"peak RSS during decode, {where}, each contender in a fresh process of its own:\n" + \
        _table(["backend", "peak RSS", "setup over imports", "steps over setup", "how"], lines)


def skipped_text(skipped: dict[str, str]) -> str:
    """One line per contender that did not run, with the reason."""
    return "\n".join(f"skipped: {name}: {reason}" for name, reason in skipped.items())


def matplotlib_missing() -> str | None:
    """None when matplotlib can be imported, else the one-line reason ``--plot`` cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"--plot needs matplotlib, which is not installed (pip install '{MATPLOTLIB_PIN}')"
    return None


def plot(path: str, rows: list[Row], title: str) -> None:
    """Latency against batch per contender, log-log, one panel per past length (the paper's Figure 7), with the
    limit (the larger of the bandwidth and compute limits) drawn as a dashed line; bars span p10-p90."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    pasts = sorted({r.past for r in rows})
    fig, axes = plt.subplots(1, len(pasts), figsize=(5.5 * len(pasts) + 2.5, 4.5), squeeze=False, layout="constrained")
    for ax, past in zip(axes[0], pasts):
        here = [r for r in rows if r.past == past]
        for name in sorted({r.backend for r in here}):
            mine = sorted((r for r in here if r.backend == name), key=lambda r: r.batch)
            median = [r.summary.median * 1e3 for r in mine]
            low = [m - r.summary.p10 * 1e3 for m, r in zip(median, mine)]
            high = [r.summary.p90 * 1e3 - m for m, r in zip(median, mine)]
            ax.errorbar([r.batch for r in mine], median, yerr=[low, high], marker="o", capsize=3, label=name)
        limit = sorted({(r.batch, max(r.bandwidth_limit_s, r.compute_limit_s) * 1e3) for r in here})
        ax.plot([b for b, _ in limit], [t for _, t in limit], "k--", label="limit (max of bandwidth, compute)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({r.batch for r in here})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("batch")
        ax.set_ylabel("decode step latency (ms)")
        ax.set_title(f"{title}, past {past}" if len(pasts) > 1 or past else title)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
