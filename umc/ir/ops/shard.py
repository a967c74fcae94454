"""Sharded ops: a memory lookup whose value table is split over the ranks of a distributed run.

``sharded_lookup_pool`` means exactly ``lookup_pool`` (its decomposition): the sharding is where the table's
pieces live and which collectives bring the values to the tokens (``umc.sharding``), not what is computed. A
process without a distributed world runs it as the whole-table lookup; the distributed runtime
(``umc.runtime.distributed``) is tested against that decomposition.
"""

from __future__ import annotations

from umc.ir.ops.kernels import _lookup_pool
from umc.ir.ops.memory import gather_bytes
from umc.ir.ops.registry import Attr, decomposition, op
from umc.sharding import PARTITIONS

SHARD_ATTRS = (Attr("N", "int", minimum=1), Attr("E", "int", minimum=1), Attr("shards", "int", minimum=2),
               Attr("partition", "str", choices=PARTITIONS))


@op("sharded_lookup_pool", "table, address: index N*E, scores, perm?: permutation", "pooled", SHARD_ATTRS,
    cost=lambda i, o, a: (2 * i[1].numel * i[0].shape[1], gather_bytes(i[0], i[1].numel)))
def _sharded_lookup_pool(ins, attrs):
    """lookup_pool of a table split over ``shards`` ranks, by rows (``partition`` number) or by columns
    (dimension); the types are the whole table's: (B,T,H,m) addresses -> (B,T,E*vdim) pooled."""
    return _lookup_pool(ins, {"N": attrs["N"], "E": attrs["E"]})


@decomposition("sharded_lookup_pool")
def _sharded_lookup_pool_parts(b, ins, attrs):
    return (b.one("lookup_pool", *ins, N=attrs["N"], E=attrs["E"]),)
