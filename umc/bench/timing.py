"""Round-robin timing: every contender is called once per round, so slow drifts of a noisy machine (another
process starting, the CPU clocking down) fall on all of them alike instead of on whichever ran last.

Each round starts one contender further along (round r runs contenders r, r+1, ..., wrapping around), so no
contender always runs right after the same neighbour (whose cache footprint or frequency boost it would
inherit). Statistics are medians and percentiles of the timed calls; nothing here judges speed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

Step = Callable[[], object]


def round_order(count: int, round_index: int) -> list[int]:
    """The order in which ``count`` contenders run in round ``round_index``: rotated by the round's index."""
    return [(round_index + k) % count for k in range(count)]


def round_robin(contenders: Sequence[tuple[str, Step]], reps: int, warmup: int = 0,
                clock: Callable[[], float] = time.perf_counter,
                tick: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Call every contender ``warmup`` rounds untimed, then ``reps`` timed rounds, interleaved (``round_order``).

    Returns name -> its ``reps`` durations in seconds. ``tick`` is called after every call (a progress bar).
    """
    names = [name for name, _ in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be distinct: {names}")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + reps):
        for k in round_order(len(contenders), r):
            name, step = contenders[k]
            started = clock()
            step()
            elapsed = clock() - started
            if r >= warmup:
                samples[name].append(elapsed)
            if tick is not None:
                tick()
    return samples


def timed_call(step: Step, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one call of ``step`` takes: used alone for a contender's first call (a compile, a lazy setup)."""
    started = clock()
    step()
    return clock() - started


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the two nearest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """The median of repeated timings and their spread (10th-90th percentile, min, max), in seconds."""

    n: int
    median: float
    p10: float
    p90: float
    min: float
    max: float

    def to_dict(self) -> dict:
        """Plain data for JSON, in seconds."""
        return {"n": self.n, "median_s": self.median, "p10_s": self.p10, "p90_s": self.p90,
                "min_s": self.min, "max_s": self.max}


def summarize(values: Sequence[float]) -> Summary:
    """Median and spread of a list of durations."""
    return Summary(len(values), percentile(values, 50), percentile(values, 10), percentile(values, 90),
                   min(values), max(values))
