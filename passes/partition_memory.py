"""Partition memory: split every memory unit's value table over P ranks (``umc compile --shard P``).

Each ``lookup_pool`` becomes a ``sharded_lookup_pool`` saying how its table is split: by rows (number-wise) or by
columns (dimension-wise), chosen per unit by the communication-volume model (``umc.sharding``) when the partition
is ``auto``. The graph computes the same thing (the op's decomposition is the lookup itself); what changes is
which rank holds which piece of the table and which collectives the runtime runs. The table must be a parameter
read by the lookup alone, so each rank can load only its piece from the weights file.
"""

from __future__ import annotations

from umc.dtypes import BY_IR
from umc.ir.core import Graph, IRError, Node
from umc.passes.editor import Editor
from umc.sharding import PARTITIONS, LookupShape, choose_partition, feasible, per_token_bytes

CHOICES = ("auto", *PARTITIONS)


def lookup_shape(node: Node) -> LookupShape:
    """The sizes and dtypes one lookup's exchange volume depends on, from its operand types."""
    table, address, scores = (v.type for v in node.inputs[:3])
    return LookupShape(heads=address.shape[2], topm=address.shape[3], cores=scores.shape[-1], blocks=node.attr("E"),
                       rows=table.shape[0], vdim=table.shape[1], value_bytes=BY_IR[table.dtype].itemsize,
                       score_bytes=BY_IR[scores.dtype].itemsize)


def partition_memory(shards: int, partition: str = "auto"):
    """The pass for ``shards`` ranks and a partitioning (auto, number or dimension); IRError when a table cannot be
    split so (a fixed partitioning with fewer rows or columns than ranks, a table that is not a parameter read by
    its lookup alone, no lookup_pool to shard)."""
    if partition not in CHOICES:
        raise IRError(f"unknown partition {partition!r} (allowed: {', '.join(CHOICES)})")

    def run(graph: Graph) -> tuple[Graph, list[str]]:
        params = {p.id for p in graph.params}
        readers = graph.users()
        editor = Editor(graph)
        notes = []
        for node in graph.nodes:
            if node.op != "lookup_pool":
                editor.keep(node)
                continue
            table = node.inputs[0]
            if table.id not in params or len(readers.get(table.id, [])) != 1:
                raise IRError(f"{node.scope}: the value table is not a parameter read by this lookup alone, so it "
                              "cannot be loaded a shard per rank")
            shape = lookup_shape(node)
            chosen = choose_partition(shape, shards) if partition == "auto" else partition
            reason = feasible(chosen, shape, shards)
            if reason:
                raise IRError(f"{node.scope}: {reason}")
            pooled = editor.one("sharded_lookup_pool", *node.inputs, scope=node.scope, stream=node.stream,
                                N=node.attr("N"), E=node.attr("E"), shards=shards, partition=chosen)
            editor.replace(node.outputs[0], pooled)
            volumes = ", ".join(f"{p} {per_token_bytes(p, shape, shards):.0f}" for p in PARTITIONS)
            notes.append(f"{node.scope}: {chosen}-wise over {shards} ranks (bytes sent per token: {volumes})")
        if not notes:
            raise IRError("no lookup_pool to shard (--shard needs the kernel_fusion pass)")
        return editor.finish(), notes

    return run
