"""The machine's limits, measured in the run that compares against them, and what the machine is.

- Read bandwidth: ``torch.mv`` of an fp32 matrix far larger than the last-level cache with a vector: it
  streams the matrix once (on the development machine about 10% faster than a plain ``sum`` over the same
  bytes). The bench calls the probe once per round, interleaved with the timed steps, and takes the median.
- GEMM rate: FLOPs per second of one large fp32 ``torch.mm`` (n x n times n x n, 2 n^3 FLOPs), the median
  of a few calls after one warm-up.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from umc.bench.timing import Summary, summarize

MIB = 2 ** 20
PROBE_COLUMNS = 4096  # a row is 16 KiB: long enough to stream, short enough for tiny test probes
CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")


class ReadProbe:
    """One call streams an fp32 matrix of about ``nbytes`` bytes once (``torch.mv`` with a ones vector)."""

    def __init__(self, nbytes: int):
        rows = max(1, nbytes // (4 * PROBE_COLUMNS))
        # written, not zero-allocated: untouched (calloc) pages all map to one shared zero page, which caches
        self.matrix = torch.empty(rows, PROBE_COLUMNS, dtype=torch.float32).fill_(1.0)
        self.vector = torch.ones(PROBE_COLUMNS, dtype=torch.float32)
        self.nbytes = self.matrix.numel() * self.matrix.element_size()

    def __call__(self) -> torch.Tensor:
        """Read the matrix once."""
        return torch.mv(self.matrix, self.vector)

    def describe(self) -> str:
        """What the probe reads, for the printed probe line and the JSON."""
        rows, cols = self.matrix.shape
        return f"torch.mv of an fp32 {rows}x{cols} matrix ({self.nbytes / MIB:.0f} MiB)"


@dataclass(frozen=True)
class GemmRate:
    """The measured fp32 GEMM rate: ``flops`` per call, the durations of the timed calls."""

    n: int
    flops: int
    samples: tuple[float, ...]

    @property
    def summary(self) -> Summary:
        """Median and spread of the calls."""
        return summarize(self.samples)

    @property
    def flops_per_s(self) -> float:
        """FLOPs per second at the median call."""
        return self.flops / self.summary.median

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return {"method": f"torch.mm fp32 {self.n}x{self.n} @ {self.n}x{self.n}", "flops": self.flops,
                "samples_s": list(self.samples), **self.summary.to_dict(), "flops_per_s": self.flops_per_s}


def measure_gemm(n: int, reps: int = 5, clock: Callable[[], float] = time.perf_counter) -> GemmRate:
    """The fp32 GEMM rate of ``torch.mm`` on two n x n matrices: ``reps`` timed calls after one warm-up."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    torch.mm(a, b)
    samples = []
    for _ in range(reps):
        started = clock()
        torch.mm(a, b)
        samples.append(clock() - started)
    return GemmRate(n, 2 * n ** 3, tuple(samples))


def last_level_cache() -> int | None:
    """Bytes of the largest (highest-level) CPU cache as Linux reports it for CPU 0; None where unknown."""
    best: tuple[int, int] | None = None
    for index in sorted(CACHE_SYSFS.glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1024, "M": MIB, "G": 1024 * MIB}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit() and (best is None or level > best[0]):
            best = (level, int(digits) * scale)
    return None if best is None else best[1]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, this one included), None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, load, torch threads, cache size, versions, GPU presence."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": load_average(),
        "torch_threads": torch.get_num_threads(),
        "last_level_cache_bytes": last_level_cache(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
