"""Sharding a memory layer's value table over P processes: which rank holds which rows or columns, and how many
bytes each partitioning moves between ranks per step (the communication-volume model ``partition_memory`` chooses
by and the distributed runtime is checked against).

Every rank serves its own tokens (data parallel) with the dense weights replicated; only value tables are split.

- **number-wise**: rank r holds a contiguous range of physical rows. Each rank tells every other how many of its
  addresses it owns (all-to-all of P int64 counts), sends them those rows' indices (all-to-all, the address dtype)
  and gets the value rows back (all-to-all, vdim values each); scaling by the per-core scores and pooling into the
  E blocks stay on the token's rank, so scores never move.
- **dimension-wise**: rank r holds a contiguous range of the vdim columns of every row. Ranks share their token
  counts (all-gather of one int64) and every token's addresses and h per-core scores (all-gather); each rank pools
  its columns for every rank's tokens and sends each token's pooled columns (E blocks) back to the token's rank
  (all-to-all).

Volumes count the tensors handed to the collectives (every head, every core score, the E blocks, the real dtypes),
each byte once as it leaves one rank for another; what a rank keeps for itself is not counted. Number-wise traffic
depends on where the addresses fall: the model assumes uniformly spread addresses, (P-1)/P of them remote.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTITIONS = ("number", "dimension")
COUNT_BYTES = 8  # the token and address counts are int64
INT32_LIMIT = 2 ** 31


def shard_ranges(total: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each of ``shards`` contiguous, nearly equal pieces of ``total`` (sizes differ by at most
    one, the larger first): rank r holds rows or columns ``range(*shard_ranges(total, P)[r])``."""
    base, extra = divmod(total, shards)
    ranges, start = [], 0
    for rank in range(shards):
        stop = start + base + (rank < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def address_bytes(virtual_rows: int) -> int:
    """Bytes per exchanged address: int32 while every virtual row index fits, else int64."""
    return 4 if virtual_rows < INT32_LIMIT else 8


@dataclass(frozen=True)
class LookupShape:
    """What the volume of one memory lookup depends on: the lookup's sizes and dtypes."""

    heads: int          # H: query heads, each with its own top-m
    topm: int           # m: addresses per head and token
    cores: int          # h: per-core scores per address (multi-core scoring)
    blocks: int         # E: virtual blocks (implicit value expansion) pooled per token
    rows: int           # N: physical rows of the table
    vdim: int           # columns of the table
    value_bytes: int    # bytes per table element
    score_bytes: int    # bytes per score

    @property
    def address_bytes(self) -> int:
        """Bytes per exchanged address."""
        return address_bytes(self.rows * self.blocks)

    def to_dict(self) -> dict:
        """The shape as JSON."""
        return {"heads": self.heads, "topm": self.topm, "cores": self.cores, "blocks": self.blocks, "rows": self.rows,
                "vdim": self.vdim, "value_bytes": self.value_bytes, "score_bytes": self.score_bytes,
                "address_bytes": self.address_bytes}


def exchange_volume(partition: str, shape: LookupShape, shards: int, tokens: float) -> dict[str, float]:
    """Bytes moved between ranks per lookup, summed over all ranks, by collective, when each of the ``shards``
    ranks looks up ``tokens`` tokens (number-wise: expected value for uniformly spread addresses)."""
    p = shards
    entries = tokens * shape.heads * shape.topm  # addresses per rank
    if partition == "number":
        remote = entries * (p - 1)  # over all ranks: each sends (p-1)/p of its entries away
        return {"counts (all_to_all)": p * (p - 1) * COUNT_BYTES,
                "addresses (all_to_all)": remote * shape.address_bytes,
                "value rows (all_to_all)": remote * shape.vdim * shape.value_bytes}
    if partition == "dimension":
        shared = entries * p * (p - 1)  # each rank's entries reach the p-1 others
        return {"counts (all_gather)": p * (p - 1) * COUNT_BYTES,
                "addresses (all_gather)": shared * shape.address_bytes,
                "scores (all_gather)": shared * shape.cores * shape.score_bytes,
                "pooled (all_to_all)": tokens * (p - 1) * shape.blocks * shape.vdim * shape.value_bytes}
    raise ValueError(f"unknown partition {partition!r} (allowed: {', '.join(PARTITIONS)})")


def per_token_bytes(partition: str, shape: LookupShape, shards: int) -> float:
    """Bytes one rank sends per token it looks up, at large batches (the per-step count exchange left out): what
    the partitionings are compared by, independent of the batch."""
    volume = exchange_volume(partition, shape, shards, 1.0)
    return sum(v for k, v in volume.items() if not k.startswith("counts")) / shards


def feasible(partition: str, shape: LookupShape, shards: int) -> str | None:
    """None when ``partition`` can split this table over ``shards`` ranks, else why not."""
    if partition == "number" and shards > shape.rows:
        return f"number-wise needs at least one row per rank ({shape.rows} rows, {shards} ranks)"
    if partition == "dimension" and shards > shape.vdim:
        return f"dimension-wise needs at least one column per rank ({shape.vdim} columns, {shards} ranks)"
    return None


def choose_partition(shape: LookupShape, shards: int) -> str:
    """The feasible partitioning that moves fewer bytes per token (number-wise on a tie)."""
    options = [p for p in PARTITIONS if feasible(p, shape, shards) is None]
    if not options:
        raise ValueError(f"a table of {shape.rows} rows x {shape.vdim} columns cannot be split over {shards} ranks")
    return min(options, key=lambda p: per_token_bytes(p, shape, shards))
