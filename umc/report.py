"""Cost of IR graphs from the op registry's cost rules: FLOPs and bytes per token, per memory unit.

Costs are evaluated on the decode graph (one new token per sequence) at a given batch,
with an empty KV cache (attention over the context is excluded, as in ``umc check``).
Value bytes are the rows a gather reads: ``min(B*H*m, N)`` rows per layer and step
(DESIGN.md §6), so per token they fall as the batch grows and rows are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from umc.ir.core import Graph
from umc.ir.dims import evaluate_shape
from umc.ir.ops import OPS, Concrete
from umc.passes.partition_memory import lookup_shape
from umc.sharding import PARTITIONS, exchange_volume, per_token_bytes, shard_ranges

VALUE_GATHERS = ("gather_values", "gather_pool", "lookup_pool", "sharded_lookup_pool")
BATCHES = (1, 8, 64, 512)


@dataclass(frozen=True)
class Cost:
    """FLOPs, bytes of weights read (values included), and bytes of value rows read."""

    flops: float = 0.0
    weight_bytes: float = 0.0
    value_bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.weight_bytes + other.weight_bytes, self.value_bytes + other.value_bytes)

    def per(self, tokens: int) -> "Cost":
        """Divided by a token count."""
        return Cost(self.flops / tokens, self.weight_bytes / tokens, self.value_bytes / tokens)

    def to_dict(self) -> dict[str, float]:
        """Plain data, rounded for stable JSON."""
        return {"flops": round(self.flops, 3), "weight_bytes": round(self.weight_bytes, 3),
                "value_bytes": round(self.value_bytes, 3)}


def node_costs(graph: Graph, env: dict[str, int]) -> list[tuple[int | None, Cost]]:
    """(memory unit or None, cost) of every per-call node with symbolic dims bound by ``env``.

    Values computed from weights alone count as weights (their readers read weight bytes),
    whether they are computed at load time or, unoptimized, on every call.
    """
    weights = {v.id for v in graph.params} | {v.id for n in graph.init_nodes for v in n.outputs}

    def operand(v) -> Concrete:
        return Concrete(evaluate_shape(v.type.shape, env), v.type.itemsize, v.id in weights)

    out = []
    for node in graph.nodes:
        if node.inputs and all(v.id in weights for v in node.inputs):
            weights.update(v.id for v in node.outputs)  # recomputed from weights on every call
        flops, nbytes = OPS[node.op].cost(tuple(map(operand, node.inputs)), tuple(map(operand, node.outputs)),
                                          dict(node.attrs))
        out.append((node.scope.unit, Cost(flops, nbytes, nbytes if node.op in VALUE_GATHERS else 0)))
    return out


def decode_cost(graph: Graph, batch: int = 1) -> tuple[Cost, dict[int, Cost]]:
    """Per-token cost of one decode step at ``batch``: the whole graph and each memory unit."""
    env = {"B": batch, "T": 1, "S_past": 0}
    total, units = Cost(), {}
    for unit, cost in node_costs(graph, env):
        total = total + cost
        if unit is not None:
            units[unit] = units.get(unit, Cost()) + cost
    return total.per(batch), {j: c.per(batch) for j, c in sorted(units.items())}


def node_count(graph: Graph) -> dict[str, int]:
    """Per-call and load-time node counts."""
    return {"nodes": len(graph.nodes), "init_nodes": len(graph.init_nodes)}


def sharded_lookups(graph: Graph) -> list:
    """The graph's sharded lookups, in order."""
    return [n for n in graph.nodes if n.op == "sharded_lookup_pool"]


def build_shards(graph: Graph) -> int:
    """How many ranks a graph's value tables are split over (1: not sharded)."""
    return max((n.attr("shards") for n in sharded_lookups(graph)), default=1)


def sharding_report(graph: Graph, batches: tuple[int, ...] = BATCHES) -> dict | None:
    """Per sharded memory unit: the partitioning, both partitionings' bytes sent per token, the bytes moved per
    decode step (all ranks, each rank decoding ``batch`` sequences) by collective, and the table bytes the
    largest shard holds against the whole table's. None for an unsharded graph."""
    nodes = sharded_lookups(graph)
    if not nodes:
        return None
    units = []
    for node in nodes:
        shape, shards, chosen = lookup_shape(node), node.attr("shards"), node.attr("partition")
        split = shape.rows if chosen == "number" else shape.vdim
        largest = max(stop - start for start, stop in shard_ranges(split, shards))
        whole = shape.rows * shape.vdim * shape.value_bytes
        units.append({
            "unit": node.scope.unit, "partition": chosen, "shape": shape.to_dict(),
            "bytes_per_token": {p: round(per_token_bytes(p, shape, shards), 3) for p in PARTITIONS},
            "decode_step_bytes": {str(b): {k: round(v, 3) for k, v in exchange_volume(chosen, shape, shards, b).items()}
                                  for b in batches},
            "table_bytes": {"whole": whole, "largest_shard": whole // split * largest},
        })
    return {"shards": build_shards(graph), "units": units}
