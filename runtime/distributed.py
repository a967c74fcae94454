"""Running a sharded build on torch.distributed: the world a rank belongs to, the collectives (each one's bytes
counted, since gloo keeps no byte counters), and the two distributed implementations of ``sharded_lookup_pool``.

Every rank runs the whole graph on its own tokens (data parallel; dense weights replicated) and holds one piece
of each value table: a range of rows (number-wise) or of columns (dimension-wise), as ``umc.sharding`` assigns
and describes. Only the lookup talks to other ranks; all ranks must run the same steps in the same order (each
lookup is a collective), each with its own number of sequences (tested with batch sizes that differ by rank).
"""

from __future__ import annotations

import datetime
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from umc.ir.core import Node
from umc.runtime.torch_ops import TORCH_IMPLS, column_cores, pool_columns
from umc.sharding import address_bytes, shard_ranges

DEFAULT_TIMEOUT_S = 120.0
GLOO_LOCATION = re.compile(r"\[[^\]]*\.cc:\d+\]\s*")  # "[.../pair.cc:553] " before gloo's messages


class DistributedError(RuntimeError):
    """A collective failed: another rank died or did not answer within the timeout."""


@dataclass
class ExchangeLog:
    """Bytes this rank sent to other ranks, by what was sent (as ``umc.sharding.exchange_volume`` names it)."""

    sent: Counter = field(default_factory=Counter)

    def add(self, what: str, nbytes: int) -> None:
        """Count ``nbytes`` sent to other ranks as ``what``."""
        self.sent[what] += nbytes

    def total(self) -> int:
        """All bytes sent since the last reset."""
        return sum(self.sent.values())

    def reset(self) -> None:
        """Start counting again."""
        self.sent.clear()


@dataclass
class World:
    """This process's place in a distributed run: its rank, the number of ranks, the collective timeout, the
    process group (None: the default group) and what it has sent."""

    rank: int
    size: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: object = None
    log: ExchangeLog = field(default_factory=ExchangeLog)

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> "World":
        """Join the run torch.distributed's launcher (torchrun) started: the gloo process group from its
        environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), timeout_s)

    def all_to_all(self, what: str, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """``send``'s dim-0 pieces to each rank in turn; the pieces each rank sent here, concatenated by rank."""
        received = send.new_empty((sum(recv_splits), *send.shape[1:]))
        row_bytes = send.element_size() * math.prod(send.shape[1:])
        self.log.add(what, row_bytes * (sum(send_splits) - send_splits[self.rank]))
        self._wait(what, lambda: dist.all_to_all_single(received, send.contiguous(), recv_splits, send_splits,
                                                         group=self.group))
        return received

    def all_gather(self, what: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self.log.add(what, tensor.nbytes * (self.size - 1))
        self._wait(what, lambda: dist.all_gather(parts, tensor.contiguous(), group=self.group))
        return parts

    def _wait(self, what: str, collective: Callable[[], None]) -> None:
        try:
            collective()
        except RuntimeError as exc:
            cause = GLOO_LOCATION.sub("", str(exc).splitlines()[0]).split(". ")[0][:160]
            raise DistributedError(f"rank {self.rank}: the {what} exchange failed (another rank died or did not "
                                   f"answer within {self.timeout_s:g} s): {cause}") from None


def shard_of(node: Node, rank: int) -> tuple[int, int, int]:
    """(axis, start, stop): the rows (axis 0, number-wise) or columns (axis 1) of ``node``'s table rank holds."""
    table = node.inputs[0].type
    axis = 0 if node.attr("partition") == "number" else 1
    start, stop = shard_ranges(table.shape[axis], node.attr("shards"))[rank]
    return axis, start, stop


def table_slices(graphs, rank: int) -> dict[str, tuple[int, int, int]]:
    """Per sharded value table (parameter name): the (axis, start, stop) rank holds."""
    return {node.inputs[0].name: shard_of(node, rank) for graph in graphs.values() for node in graph.nodes
            if node.op == "sharded_lookup_pool"}


def _addresses(attrs, address, perm):
    """The virtual addresses (n,H,m) (through the shuffle when there is one), their rows and blocks."""
    virtual = (address if perm is None else perm[address]).reshape(-1, *address.shape[2:])
    return (virtual, *TORCH_IMPLS["ive_split"](attrs, virtual))


def _wire(node: Node) -> torch.dtype:
    """The dtype addresses travel in: int32 while every virtual row index fits (``umc.sharding.address_bytes``)."""
    return torch.int32 if address_bytes(node.attr("N") * node.attr("E")) == 4 else torch.int64


def number_wise(world: World, node: Node) -> Callable:
    """The lookup for a table split by rows: addresses go to the rows' owners, value rows come back."""
    _, start, _ = shard_of(node, world.rank)
    table_type = node.inputs[0].type
    starts = torch.tensor([s for s, _ in shard_ranges(table_type.shape[0], world.size)[1:]])
    wire = _wire(node)

    def lookup(attrs, table, address, scores, perm=None):
        batch, steps = address.shape[:2]
        _, row, block = _addresses(attrs, address, perm)
        flat = row.reshape(-1)
        owner = torch.bucketize(flat, starts, right=True)
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=world.size)
        recv_counts = world.all_to_all("counts (all_to_all)", send_counts, [1] * world.size, [1] * world.size)
        sends, recvs = send_counts.tolist(), recv_counts.tolist()
        wanted = world.all_to_all("addresses (all_to_all)", flat[order].to(wire), sends, recvs)
        rows = world.all_to_all("value rows (all_to_all)", table[wanted.long() - start], recvs, sends)
        values = torch.empty_like(rows)
        values[order] = rows
        vdim, cores = table_type.shape[1], scores.shape[-1]
        pooled = pool_columns(values.view(*row.shape, vdim), column_cores(vdim, cores, 0, vdim, table.device),
                              scores.reshape(*row.shape, cores), block, attrs["E"])
        return (pooled.reshape(batch, steps, -1),)

    return lookup


def dimension_wise(world: World, node: Node) -> Callable:
    """The lookup for a table split by columns: every token's addresses and scores go to every rank, each rank
    pools its columns for all tokens, and each token's pooled columns go back to its rank."""
    table_type = node.inputs[0].type
    columns = shard_ranges(table_type.shape[1], world.size)
    wire = _wire(node)

    def lookup(attrs, table, address, scores, perm=None):
        batch, steps, heads, m = address.shape
        tokens, cores, blocks = batch * steps, scores.shape[-1], attrs["E"]
        virtual, _, _ = _addresses(attrs, address, perm)
        counts = world.all_gather("counts (all_gather)", torch.tensor([tokens], dtype=torch.int64))
        sizes = [int(c) for c in counts]
        most = max(sizes)
        padded = virtual.new_zeros(most, heads, m).to(wire)
        padded[:tokens] = virtual
        padded_scores = scores.new_zeros(most, heads, m, cores)
        padded_scores[:tokens] = scores.reshape(tokens, heads, m, cores)
        every = world.all_gather("addresses (all_gather)", padded)
        every_scores = world.all_gather("scores (all_gather)", padded_scores)
        virtual_all = torch.cat([part[:n] for part, n in zip(every, sizes)]).long()
        scores_all = torch.cat([part[:n] for part, n in zip(every_scores, sizes)])
        row, block = TORCH_IMPLS["ive_split"](attrs, virtual_all)
        start, stop = columns[world.rank]
        own = pool_columns(table[row], column_cores(table_type.shape[1], cores, start, stop, table.device),
                           scores_all, block, blocks)  # (all tokens, E, own columns)
        width = stop - start
        back = world.all_to_all("pooled (all_to_all)", own.reshape(-1), [n * blocks * width for n in sizes],
                                [tokens * blocks * (b - a) for a, b in columns])
        pieces = torch.split(back, [tokens * blocks * (b - a) for a, b in columns])
        pooled = torch.cat([p.view(tokens, blocks, b - a) for p, (a, b) in zip(pieces, columns)], dim=-1)
        return (pooled.reshape(batch, steps, -1),)

    return lookup


def sharded_lookup(world: World, node: Node) -> Callable:
    """The distributed implementation of one ``sharded_lookup_pool`` node on this rank."""
    return (number_wise if node.attr("partition") == "number" else dimension_wise)(world, node)

