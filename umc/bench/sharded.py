"""``umc bench DIR --nproc P``: decode-step latency of a sharded build, every rank stepping in lockstep, and the
bytes each step moved between ranks against the communication-volume model.

Every rank decodes its own ``batch`` sequences from a one-token past; the backends take turns step by step
(round-robin, after a barrier, so noise hits all alike). Rank 0 prints per backend and batch the median step time
and its p10–p90 spread (rank 0's clock: each step ends with the last lookup's collective, so the ranks finish it
together), tokens/s over all ranks, and the bytes sent per step summed over ranks (from the tensors handed to
the collectives) next to ``umc.sharding``'s prediction. The bandwidth and GEMM limits of the single-process bench
are not measured here.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch
import torch.distributed as dist

from umc.bench.timing import summarize
from umc.report import sharding_report


def predicted_step_bytes(graph, batch: int) -> float:
    """Bytes one decode step moves between ranks (all ranks, all units) by the model, ``batch`` sequences each:
    the sum of ``umc.report.sharding_report``'s per-unit figures."""
    return sum(sum(unit["decode_step_bytes"][str(batch)].values())
               for unit in sharding_report(graph, batches=(batch,))["units"])


def bench_sharded(source: Path, names: list[str], batches: list[int], reps: int, warmup: int, world) -> None:
    """Time decode steps of the sharded build ``source`` on this rank (see the module doc); rank 0 prints."""
    from umc.runtime import load

    sessions = {name: load(source, backend=name, world=world) for name in names}
    spec = next(iter(sessions.values())).spec
    graph = next(iter(sessions.values())).graphs["decode"]
    say = click.echo if world.rank == 0 else (lambda *_: None)
    say(f"{spec.name}: {world.size} ranks, {', '.join(names)}; decode from a 1-token past, {reps} steps after "
        f"{warmup} warm-up rounds, round-robin")
    say(f"{'backend':<10} {'batch/rank':>10} {'median ms':>10} {'p10-p90 ms':>15} {'tokens/s':>10} "
        f"{'bytes/step':>12} {'predicted':>12}")
    generator = torch.Generator().manual_seed(world.rank)
    for batch in batches:
        tokens = torch.randint(0, spec.model.vocab_size, (batch, 2), generator=generator)
        pasts = {name: session.prefill(tokens[:, :1])[1] for name, session in sessions.items()}
        times: dict[str, list[float]] = {name: [] for name in names}
        sent: dict[str, list[int]] = {name: [] for name in names}
        for rep in range(warmup + reps):
            for name in names:
                dist.barrier()
                world.log.reset()
                started = time.perf_counter()
                sessions[name].decode(tokens[:, 1:2], pasts[name])
                elapsed = time.perf_counter() - started
                if rep >= warmup:
                    times[name].append(elapsed)
                    sent[name].append(world.log.total())
        for name in names:
            total = torch.tensor(sent[name], dtype=torch.float64)
            dist.all_reduce(total)
            stats = summarize(times[name])
            say(f"{name:<10} {batch:>10} {stats.median * 1e3:>10.2f} "
                f"{f'{stats.p10 * 1e3:.2f}-{stats.p90 * 1e3:.2f}':>15} {world.size * batch / stats.median:>10.1f} "
                f"{total.median().item():>12.0f} {predicted_step_bytes(graph, batch):>12.0f}")
