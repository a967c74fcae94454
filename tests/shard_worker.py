"""One rank of the sharding tests, run as its own process: ``python tests/shard_worker.py JOB.json RANK``.

The job names the sharded builds, the world size, a rendezvous file and an output directory. The rank joins a
gloo group, loads every build with ``world=`` and, per build:

- ``equality``: prefills its own tokens (a batch size that differs per rank) and decodes two steps; saves the
  logits and selection taps.
- ``volume``: decodes ``volume_steps`` steps of ``volume_batch`` sequences per rank and records the bytes it sent
  per step, by what was sent.

Outputs are safetensors (logits) and JSON (bytes, table sizes): the test compares them with the unsharded build.
With ``"fault": "wrong_core"`` the rank pools its value columns with the wrong core's scores (an injected bug the
comparison must catch).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from umc.runtime import distributed, load
from umc.runtime.distributed import World


def inject_wrong_core() -> None:
    """Make every sharded lookup scale value columns by the next core's score."""
    right = distributed.pool_columns

    def wrong(values, column_core, scores, block, blocks):
        return right(values, (column_core + 1) % scores.shape[-1], scores, block, blocks)

    distributed.pool_columns = wrong


def rank_tokens(seed: int, rank: int, batch: int, length: int, vocab: int) -> torch.Tensor:
    """The tokens a rank runs (seeded by rank: ranks hold different sequences)."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed * 100 + rank))


def main(job_path: str, rank: int) -> None:
    job = json.loads(Path(job_path).read_text())
    size, out = job["world"], Path(job["out"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{job['rendezvous']}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=job["timeout_s"]))
    world = World(rank, size, job["timeout_s"])
    if job.get("fault") == "wrong_core":
        inject_wrong_core()
    for name, build in job["builds"].items():
        session = load(build, backend=job["backend"], world=world)
        vocab = session.spec.model.vocab_size
        tokens = rank_tokens(1, rank, job["batches"][rank], job["prompt"] + 2, vocab)
        logits, state, taps = session.trace_prefill(tokens[:, :job["prompt"]])
        saved = {"prefill": logits, **{f"prefill.tap{u}.{k}": t for u, d in taps.items() for k, t in d.items()}}
        for step in range(2):
            at = job["prompt"] + step
            logits, state, _ = session.trace_decode(tokens[:, at:at + 1], state)
            saved[f"decode{step}"] = logits
        save_file({k: v.contiguous() for k, v in saved.items()}, str(out / f"{name}.rank{rank}.safetensors"))

        batch = job["volume_batch"]
        tokens = rank_tokens(2, rank, batch, job["volume_steps"] + 1, vocab)
        _, state = session.prefill(tokens[:, :1])
        steps = []
        for step in range(job["volume_steps"]):
            world.log.reset()
            _, state = session.decode(tokens[:, step + 1:step + 2], state)
            steps.append(dict(world.log.sent))
        record = {"steps": steps, "table_bytes": session.table_bytes}
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
