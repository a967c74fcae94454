"""Kernel-sized ops: each memory-layer retrieval chain the ``kernel_fusion`` pass groups into one op, which a
backend with kernels (``umc.kernels``) runs as one GPU kernel. Each one's decomposition is exactly the chain it
replaces, so the graph backend, exporters and kernels agree on the boundary; the selection taps stay outputs.
"""

from __future__ import annotations

from umc.ir.core import TensorType
from umc.ir.ops.memory import N_KEYS, gather_bytes, grid_select_candidates
from umc.ir.ops.registry import Attr, decomposition, expect, op, selection, weight_bytes


def _coarse_cost(ins, outs, attrs) -> tuple[int, int]:
    """Scoring every key (2 FLOPs per multiply-add) plus a pass of the top-k; the coarse keys are read once."""
    q, keys = ins
    scores = q.numel // q.shape[-1] * keys.shape[1]
    return 2 * scores * q.shape[-1] + scores, weight_bytes(keys)


@op("coarse_topm", "q, keys", "values, indices", (Attr("k", "int", minimum=1),), cost=_coarse_cost)
def _coarse_topm(ins, attrs):
    """The k largest of q[...,h,:] . K[h,n,:] over the n keys per (token, head), descending: values and i64 key
    indices (q (...,H,kd), keys (H,n,kd)). A kernel streams over the keys with a running top-k."""
    q, keys = ins
    k = attrs["k"]
    expect(keys.rank == 3 and q.shape[-2:] == (keys.shape[0], keys.shape[2]) and q.dtype == keys.dtype
           and k <= keys.shape[1], "coarse_topm", f"{q}, {keys}, k={k}")
    return q.with_shape(*q.shape[:-1], k), TensorType("i64", (*q.shape[:-1], k))


@decomposition("coarse_topm")
def _coarse_topm_parts(b, ins, attrs):
    return b.emit("topm", b.one("key_scores", *ins), k=attrs["k"])


@selection("coarse_topm", chosen=1)
def _coarse_topm_candidates(b, ins, attrs):
    scores = b.one("key_scores", *ins)
    return scores, b.one("iota", shape=scores.type.shape, axis=scores.type.rank - 1)


def _grid_topm_cost(ins, outs, attrs) -> tuple[int, int]:
    """The winners' rank scores and the per-core grids; the winners' key rows and the cores are read."""
    q_row, _, keys_row, _, i_row, _, cores = ins
    rows = i_row.numel
    rank, m = keys_row.shape[3], i_row.shape[-1]
    heads_tokens = rows // m
    flops = 2 * 2 * rows * q_row.shape[-1] * rank + heads_tokens * cores.shape[1] * (2 * m * rank * rank + 2 * m * m * rank)
    rows_bytes = 2 * min(rows, keys_row.shape[0] * keys_row.shape[1]) * (keys_row.nbytes // (keys_row.shape[0] * keys_row.shape[1]))
    return flops, rows_bytes + weight_bytes(cores)


@op("grid_topm", "q_row, q_col, keys_row, keys_col, i_row: distinct index n, i_col: distinct index n, cores",
    "address, scores", (N_KEYS,), cost=_grid_topm_cost)
def _grid_topm(ins, attrs):
    """Tucker scoring of the m x m grid over the kept rows i_row and columns i_col, per head, and its top m:
    rank scores of the winners only (q (...,H,kd) against keys (H,n,kd,r) at the indices (...,H,m)), the grid
    sum_c S_row C_c S_colᵀ over cores (H,h,r,r), top m of the core-summed grid -> grid addresses (...,H,m) and
    per-core scores (...,H,m,h)."""
    q_row, q_col, keys_row, keys_col, i_row, i_col, cores = ins
    m = i_row.shape[-1]
    expect(q_row == q_col and keys_row == keys_col and keys_row.rank == 4 and i_row == i_col
           and i_row.dtype == "i64" and i_row.shape[:-1] == q_row.shape[:-1]
           and q_row.shape[-2:] == (keys_row.shape[0], keys_row.shape[2]) and cores.rank == 4
           and cores.shape[0] == keys_row.shape[0] and cores.shape[2:] == (keys_row.shape[3],) * 2
           and q_row.dtype == keys_row.dtype == cores.dtype, "grid_topm", f"{ins}")
    return i_row, q_row.with_shape(*i_row.shape, cores.shape[1])


def _grid(b, ins):
    """The per-core Tucker grid over the kept rows and columns, from the winners' rank scores."""
    q_row, q_col, keys_row, keys_col, i_row, i_col, cores = ins
    rows = b.one("gathered_rank_scores", q_row, keys_row, i_row)
    cols = b.one("gathered_rank_scores", q_col, keys_col, i_col)
    return b.one("tucker_grid", rows, cols, cores)


@decomposition("grid_topm")
def _grid_topm_parts(b, ins, attrs):
    return b.emit("grid_select", _grid(b, ins), ins[4], ins[5], n=attrs["n"])


@selection("grid_topm", chosen=0)
def _grid_topm_candidates(b, ins, attrs):
    return grid_select_candidates(b, (_grid(b, ins), ins[4], ins[5]), attrs)


@op("lookup_pool", "table, address: index N*E, scores, perm?: permutation", "pooled",
    (Attr("N", "int", minimum=1), Attr("E", "int", minimum=1)),
    cost=lambda i, o, a: (2 * i[1].numel * i[0].shape[1], gather_bytes(i[0], i[1].numel)))
def _lookup_pool(ins, attrs):
    """IVE lookup and pooling of grid addresses (B,T,H,m): through the shuffle ``perm`` when given, to physical
    row p mod N and virtual block p div N; value rows scaled per core slice by scores (B,T,H,m,h) and summed
    into the E blocks -> (B,T,E*vdim)."""
    table, address, scores, *perm = ins
    rows, blocks = attrs["N"], attrs["E"]
    expect(table.rank == 2 and table.shape[0] == rows and address.rank == 4 and address.dtype == "i64"
           and scores.shape[:-1] == address.shape and scores.dtype == table.dtype
           and table.shape[1] % scores.shape[-1] == 0
           and all(p.shape == (rows * blocks,) and p.dtype == "i64" for p in perm), "lookup_pool",
           f"{ins} with N={rows}, E={blocks}")
    return (table.with_shape(*address.shape[:2], attrs["E"] * table.shape[1]),)


@decomposition("lookup_pool")
def _lookup_pool_parts(b, ins, attrs):
    table, address, scores, *perm = ins
    virtual = b.one("shuffle", address, perm[0]) if perm else address
    row, block = b.emit("ive_split", virtual, N=attrs["N"])
    return (b.one("gather_pool", table, row, block, scores, E=attrs["E"]),)
