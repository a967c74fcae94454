"""The memory layer's steps (DESIGN.md §2.1-2.2), one op each as lowering emits them, each with its
decomposition into tensor primitives.

Shapes: tokens are (B, T) (any leading dims where the rule says ``...``), H memory heads, n keys per
side, kd key width, r Tucker rank, h cores, m kept per side and per grid, E virtual blocks.
"""

from __future__ import annotations

import math

from umc.ir.core import TensorType
from umc.ir.dims import dim_add, dim_mul
from umc.ir.ops.registry import (Attr, Concrete, decomposition, elementwise, expect, op, selection,
                                 weight_bytes)

KERNEL = Attr("kernel", "int", minimum=1)


@op("query_conv", "x, weight, bias, state?", "out, new_state", (KERNEL,),
    cost=lambda i, o, a: (2 * o[0].numel * a["kernel"], weight_bytes(i[1]) + weight_bytes(i[2])))
def _query_conv(ins, attrs):
    """Causal depthwise conv x'_t = bias + sum_j weight[:, j] * x_{t-j} on x (B,T,D), zeros (or ``state``, the
    last K-1 inputs (B,K-1,D)) before the start; outputs x' and the new state."""
    x, weight, bias, *state = ins
    return x, conv_state_type("query_conv", x, weight, bias, state, attrs["kernel"])


def conv_state_type(name: str, x: TensorType, weight: TensorType, bias: TensorType, state: list, kernel: int) -> TensorType:
    """The conv state type (B, K-1, D), after checking conv weights and the state against x."""
    width = x.shape[-1]
    expect(weight.shape == (width, kernel) and bias.shape == (width,) and weight.dtype == bias.dtype == x.dtype,
           name, f"conv weight {weight}, bias {bias} for {x}")
    state_type = x.with_shape(x.shape[0], kernel - 1, width)
    expect(not state or state[0] == state_type, name, f"state {state} (expected {state_type})")
    return state_type


def emit_query_conv(b, x, weight, bias, state, kernel: int):
    """Concatenate the past (state or zeros) with x, sum the K shifted taps, add the bias; also the new state."""
    batch, steps, width = x.type.shape
    past = state if state is not None else b.one("zeros", shape=(batch, kernel - 1, width), dtype=x.type.dtype)
    padded = b.one("concat", past, x, axis=1)
    out = bias
    for j in range(kernel):
        start = kernel - 1 - j
        tap = b.one("slice", padded, axis=1, start=start, stop=dim_add(steps, start))
        column = b.one("reshape", b.one("slice", weight, axis=1, start=j, stop=j + 1), shape=(width,))
        out = b.one("add", out, b.one("mul", tap, column))
    new_state = b.one("slice", padded, axis=1, start=steps, stop=dim_add(steps, kernel - 1))
    return out, new_state


@decomposition("query_conv")
def _query_conv_parts(b, ins, attrs):
    x, weight, bias, *state = ins
    return emit_query_conv(b, x, weight, bias, state[0] if state else None, attrs["kernel"])


@op("split_query", "q", "row, col", (Attr("query_heads", "int", minimum=1), Attr("heads", "int", minimum=1),
                                      Attr("side_dim", "int", minimum=1)))
def _split_query(ins, attrs):
    """(...,Hq*2*kd) -> row and column queries (...,H,kd) each; a shared query (Hq=1) is broadcast to H heads."""
    q = ins[0]
    hq, heads, kd = attrs["query_heads"], attrs["heads"], attrs["side_dim"]
    expect(q.shape[-1] == hq * 2 * kd and hq in (1, heads), "split_query", f"{q} with {attrs}")
    side = q.with_shape(*q.shape[:-1], heads, kd)
    return side, side


@decomposition("split_query")
def _split_query_parts(b, ins, attrs):
    (q,) = ins
    lead, hq, heads, kd = q.type.shape[:-1], attrs["query_heads"], attrs["heads"], attrs["side_dim"]
    grouped = b.one("reshape", q, shape=(*lead, hq, 2, kd))
    sides = []
    for side in (0, 1):
        picked = b.one("reshape", b.one("slice", grouped, axis=-2, start=side, stop=side + 1), shape=(*lead, hq, kd))
        sides.append(picked if hq == heads else b.one("expand", picked, shape=(*lead, heads, kd)))
    return tuple(sides)


@op("norm_keys", "keys, weight", "out", (Attr("eps", "float"),),
    cost=lambda i, o, a: (5 * o[0].numel, weight_bytes(i[0]) + weight_bytes(i[1])))
def _norm_keys(ins, attrs):
    """LayerNorm (weight, no bias) over the kd axis of keys (H,2,n,kd[,r]), every rank separately."""
    keys, weight = ins
    expect(keys.rank in (4, 5) and weight.shape == (keys.shape[3],) and weight.dtype == keys.dtype, "norm_keys",
           f"{weight} for {keys}")
    return (keys,)


@decomposition("norm_keys")
def _norm_keys_parts(b, ins, attrs):
    keys, weight = ins
    if keys.type.rank == 4:
        return (b.one("layer_norm", keys, weight, eps=attrs["eps"]),)
    perm = (0, 1, 2, 4, 3)
    normed = b.one("layer_norm", b.one("transpose", keys, perm=perm), weight, eps=attrs["eps"])
    return (b.one("transpose", normed, perm=perm),)


@op("key_side", "keys", "out", (Attr("side", "int", choices=(0, 1)),))
def _key_side(ins, attrs):
    """keys[:, side] -> (H,n,kd[,r])."""
    keys = ins[0]
    expect(keys.rank >= 3 and keys.shape[1] == 2, "key_side", f"{keys}")
    return (keys.with_shape(keys.shape[0], *keys.shape[2:]),)


@decomposition("key_side")
def _key_side_parts(b, ins, attrs):
    (keys,) = ins
    side = attrs["side"]
    picked = b.one("slice", keys, axis=1, start=side, stop=side + 1)
    return (b.one("reshape", picked, shape=(keys.type.shape[0], *keys.type.shape[2:])),)


def _scores_cost(ins, outs, attrs) -> tuple[int, int]:
    return 2 * outs[0].numel * ins[0].shape[-1], weight_bytes(ins[1])


@op("rank_scores", "q, keys", "out", cost=_scores_cost)
def _rank_scores(ins, attrs):
    """S[...,h,k,r] = q[...,h,:] . K[h,k,:,r] for q (...,H,kd), keys (H,n,kd,r)."""
    q, keys = ins
    expect(keys.rank == 4 and q.shape[-2:] == (keys.shape[0], keys.shape[2]) and q.dtype == keys.dtype,
           "rank_scores", f"{q}, {keys}")
    return (q.with_shape(*q.shape[:-1], keys.shape[1], keys.shape[3]),)


@decomposition("rank_scores")
def _rank_scores_parts(b, ins, attrs):
    q, keys = ins
    heads, n, kd, rank = keys.type.shape
    lead = q.type.shape[:-2]
    flat_keys = b.one("reshape", b.one("transpose", keys, perm=(0, 2, 1, 3)), shape=(heads, kd, n * rank))
    scores = b.one("matmul", b.one("reshape", q, shape=(*lead, heads, 1, kd)), flat_keys)
    return (b.one("reshape", scores, shape=(*lead, heads, n, rank)),)


@op("key_scores", "q, keys", "out", cost=_scores_cost)
def _key_scores(ins, attrs):
    """s[...,h,k] = q[...,h,:] . K[h,k,:] (product keys, or coarse scores against rank-folded keys) for
    q (...,H,kd), keys (H,n,kd)."""
    q, keys = ins
    expect(keys.rank == 3 and q.shape[-2:] == (keys.shape[0], keys.shape[2]) and q.dtype == keys.dtype,
           "key_scores", f"{q}, {keys}")
    return (q.with_shape(*q.shape[:-1], keys.shape[1]),)


@decomposition("key_scores")
def _key_scores_parts(b, ins, attrs):
    q, keys = ins
    heads, n, kd = keys.type.shape
    lead = q.type.shape[:-2]
    scores = b.one("matmul", b.one("reshape", q, shape=(*lead, heads, 1, kd)), b.one("transpose", keys, perm=(0, 2, 1)))
    return (b.one("reshape", scores, shape=(*lead, heads, n)),)


@op("coarse_scores", "scores, u", "out", cost=lambda i, o, a: (2 * i[0].numel, 0))
def _coarse(ins, attrs):
    """s[...,k] = sum_r S[...,h,k,r] * u[0,h,0,r]: the rank-1 score, u (1,H,1,r)."""
    scores, u = ins
    expect(u.shape == (1, scores.shape[-3], 1, scores.shape[-1]) and u.dtype == scores.dtype, "coarse_scores",
           f"{scores}, {u}")
    return (scores.with_shape(*scores.shape[:-1]),)


@decomposition("coarse_scores")
def _coarse_parts(b, ins, attrs):
    scores, u = ins
    _, heads, _, rank = u.type.shape
    weighted = b.one("mul", scores, b.one("reshape", u, shape=(heads, 1, rank)))
    return (b.one("sum", weighted, axes=(-1,), keepdim=False),)


@op("gather_rank_rows", "scores, index: index scores -2", "out")
def _gather_rank_rows(ins, attrs):
    """S (...,n,r) at indices (...,m) -> (...,m,r)."""
    scores, index = ins
    expect(index.dtype == "i64" and index.shape[:-1] == scores.shape[:-2], "gather_rank_rows", f"{scores}, {index}")
    return (scores.with_shape(*index.shape, scores.shape[-1]),)


@decomposition("gather_rank_rows")
def _gather_rank_rows_parts(b, ins, attrs):
    scores, index = ins
    shape = (*index.type.shape, scores.type.shape[-1])
    spread = b.one("expand", b.one("reshape", index, shape=(*index.type.shape, 1)), shape=shape)
    return (b.one("take_along", scores, spread, axis=-2),)


@op("stack_cores", "cores*", "out")
def _stack_cores(ins, attrs):
    """h core tensors (H,r,r) -> (H,h,r,r)."""
    first = ins[0]
    expect(first.rank == 3 and all(c == first for c in ins), "stack_cores", f"cores differ: {ins}")
    return (first.with_shape(first.shape[0], len(ins), *first.shape[1:]),)


@decomposition("stack_cores")
def _stack_cores_parts(b, ins, attrs):
    heads, rank = ins[0].type.shape[0], ins[0].type.shape[1]
    return (b.one("concat", *(b.one("reshape", c, shape=(heads, 1, rank, rank)) for c in ins), axis=1),)


def _grid_cost(ins, outs, attrs) -> tuple[int, int]:
    rows, _, cores = ins
    m, r = rows.shape[-2], rows.shape[-1]
    tokens_heads = math.prod(rows.shape[:-2])
    return tokens_heads * cores.shape[1] * (2 * m * r * r + 2 * m * m * r), weight_bytes(cores)


@op("tucker_grid", "rows, cols, cores", "grid", cost=_grid_cost)
def _tucker_grid(ins, attrs):
    """G[...,c,i,j] = S_row[...,i,:] . C_c . S_col[...,j,:] for rows/cols (...,H,m,r), cores (H,h,r,r)."""
    rows, cols, cores = ins
    expect(rows == cols and cores.rank == 4 and cores.shape[0] == rows.shape[-3]
           and cores.shape[2:] == (rows.shape[-1],) * 2 and cores.dtype == rows.dtype,
           "tucker_grid", f"{rows}, {cols}, {cores}")
    m = rows.shape[-2]
    return (rows.with_shape(*rows.shape[:-2], cores.shape[1], m, m),)


@decomposition("tucker_grid")
def _tucker_grid_parts(b, ins, attrs):
    rows, cols, cores = ins
    *lead, m, rank = rows.type.shape
    left = b.one("matmul", b.one("reshape", rows, shape=(*lead, 1, m, rank)), cores)
    right = b.one("reshape", cols, shape=(*lead, 1, m, rank))
    n_lead = len(lead) + 1
    right_t = b.one("transpose", right, perm=(*range(n_lead), n_lead + 1, n_lead))
    return (b.one("matmul", left, right_t),)


N_KEYS = Attr("n", "int", minimum=1)


@op("grid_select", "grid, i_row: distinct index n, i_col: distinct index n", "address, scores", (N_KEYS,),
    cost=lambda i, o, a: (2 * i[0].numel, 0))
def _grid_select(ins, attrs):
    """Top m of the core-summed m*m grid per head -> grid addresses I_r*n+I_c (...,H,m) and per-core scores
    (...,H,m,h) of grid (...,H,h,m,m) over rows i_row and columns i_col (...,H,m)."""
    grid, i_row, i_col = ins
    m = grid.shape[-1]
    expect(grid.rank >= 4 and i_row == i_col and i_row.dtype == "i64" and i_row.shape == (*grid.shape[:-3], m)
           and grid.shape[-2] == m, "grid_select", f"{grid}, {i_row}")
    return i_row, grid.with_shape(*grid.shape[:-3], m, grid.shape[-3])


def _grid_address(b, i_row, i_col, position, m: int, n: int):
    """Grid address I_r[position // m] * n + I_c[position % m]."""
    row = b.one("take_along", i_row, b.one("floordiv_scalar", position, value=m), axis=-1)
    col = b.one("take_along", i_col, b.one("mod_scalar", position, value=m), axis=-1)
    return b.one("add", b.one("mul_scalar", row, value=n), col)


@decomposition("grid_select")
def _grid_select_parts(b, ins, attrs):
    grid, i_row, i_col = ins
    *lead, cores, m, _ = grid.type.shape
    total = b.one("reshape", b.one("sum", grid, axes=(-3,), keepdim=False), shape=(*lead, m * m))
    _, winners = b.emit("topm", total, k=m)
    per_core = b.one("reshape", grid, shape=(*lead, cores, m * m))
    spread = b.one("expand", b.one("reshape", winners, shape=(*lead, 1, m)), shape=(*lead, cores, m))
    picked = b.one("take_along", per_core, spread, axis=-1)
    n_lead = len(lead)
    scores = b.one("transpose", picked, perm=(*range(n_lead), n_lead + 1, n_lead))
    return _grid_address(b, i_row, i_col, winners, m, attrs["n"]), scores


def _grid_ids(b, i_row, i_col, n: int):
    """Address of every (i, j) of the m*m grid, flattened row-major: (...,m*m)."""
    *lead, m = i_row.type.shape
    rows = b.one("mul_scalar", b.one("reshape", i_row, shape=(*lead, m, 1)), value=n)
    return b.one("reshape", b.one("add", rows, b.one("reshape", i_col, shape=(*lead, 1, m))), shape=(*lead, m * m))


@selection("grid_select", chosen=0)
def grid_select_candidates(b, ins, attrs):
    """The core-summed grid (...,H,m*m) and each cell's grid address: what grid_select chooses among."""
    grid, i_row, i_col = ins
    *lead, _, m, _ = grid.type.shape
    total = b.one("reshape", b.one("sum", grid, axes=(-3,), keepdim=False), shape=(*lead, m * m))
    return total, _grid_ids(b, i_row, i_col, attrs["n"])


@op("additive_select", "v_row, i_row: distinct index n, v_col, i_col: distinct index n", "address, scores", (N_KEYS,),
    cost=lambda i, o, a: (2 * i[0].numel * i[0].shape[-1], 0))
def _additive_select(ins, attrs):
    """Product keys: top m of s_row[i] + s_col[j] over the row and column winners (...,m) -> addresses (...,m)
    and scores (...,m,1)."""
    v_row, i_row, v_col, i_col = ins
    expect(v_row == v_col and i_row == i_col and i_row.dtype == "i64" and i_row.shape == v_row.shape,
           "additive_select", f"{ins}")
    return i_row, v_row.with_shape(*v_row.shape, 1)


def _additive_total(b, v_row, v_col):
    *lead, m = v_row.type.shape
    total = b.one("add", b.one("reshape", v_row, shape=(*lead, m, 1)), b.one("reshape", v_col, shape=(*lead, 1, m)))
    return b.one("reshape", total, shape=(*lead, m * m))


@decomposition("additive_select")
def _additive_select_parts(b, ins, attrs):
    v_row, i_row, v_col, i_col = ins
    m = v_row.type.shape[-1]
    values, winners = b.emit("topm", _additive_total(b, v_row, v_col), k=m)
    scores = b.one("reshape", values, shape=(*values.type.shape, 1))
    return _grid_address(b, i_row, i_col, winners, m, attrs["n"]), scores


@selection("additive_select", chosen=0)
def _additive_candidates(b, ins, attrs):
    v_row, i_row, v_col, i_col = ins
    return _additive_total(b, v_row, v_col), _grid_ids(b, i_row, i_col, attrs["n"])


@op("shuffle", "address: index perm 0, perm: permutation", "out", cost=lambda i, o, a: (0, o[0].numel * 8))
def _shuffle(ins, attrs):
    """IVE permutation: perm[address]."""
    address, perm = ins
    expect(address.dtype == perm.dtype == "i64" and perm.rank == 1, "shuffle", f"{ins}")
    return (address,)


@decomposition("shuffle")
def _shuffle_parts(b, ins, attrs):
    address, perm = ins
    return (b.one("gather", perm, address, axis=0),)


@op("ive_split", "p: nonnegative", "row, block", (Attr("N", "int", minimum=1),), cost=lambda i, o, a: (2 * i[0].numel, 0))
def _ive_split(ins, attrs):
    """Virtual address p -> physical row p mod N and virtual block p div N."""
    expect(ins[0].dtype == "i64", "ive_split", f"{ins[0]} is not i64")
    return ins[0], ins[0]


@decomposition("ive_split")
def _ive_split_parts(b, ins, attrs):
    (p,) = ins
    return b.one("mod_scalar", p, value=attrs["N"]), b.one("floordiv_scalar", p, value=attrs["N"])


def gather_bytes(table: Concrete, picks: int) -> int:
    """Bytes of value rows a gather reads: ``min(picks, rows)`` rows (DESIGN.md §6)."""
    row_bytes = table.nbytes // table.shape[0]
    return min(picks, table.shape[0]) * row_bytes


@op("gather_values", "table, rows: index table 0", "out", cost=lambda i, o, a: (0, gather_bytes(i[0], i[1].numel)))
def _gather_values(ins, attrs):
    """Value rows V[row] for rows (...) -> (..., vdim)."""
    table, rows = ins
    expect(table.rank == 2 and rows.dtype == "i64", "gather_values", f"{ins}")
    return (table.with_shape(*rows.shape, table.shape[1]),)


@decomposition("gather_values")
def _gather_values_parts(b, ins, attrs):
    table, rows = ins
    return (b.one("gather", table, rows, axis=0),)


@op("mcs_scale", "rows, scores", "out", cost=elementwise)
def _mcs_scale(ins, attrs):
    """Multi-core scoring: column slice c (vdim/h wide) of each row (...,vdim) times that core's score (...,h)."""
    rows, scores = ins
    expect(scores.shape[:-1] == rows.shape[:-1] and isinstance(scores.shape[-1], int)
           and rows.shape[-1] % scores.shape[-1] == 0 and rows.dtype == scores.dtype, "mcs_scale", f"{ins}")
    return (rows,)


@decomposition("mcs_scale")
def _mcs_scale_parts(b, ins, attrs):
    rows, scores = ins
    *lead, vdim = rows.type.shape
    cores = scores.type.shape[-1]
    sliced = b.one("reshape", rows, shape=(*lead, cores, vdim // cores))
    weighted = b.one("mul", sliced, b.one("reshape", scores, shape=(*lead, cores, 1)))
    return (b.one("reshape", weighted, shape=rows.type.shape),)


@op("scatter_blocks", "rows, block: index E", "out", (Attr("E", "int", minimum=1),), cost=lambda i, o, a: (i[0].numel, 0))
def _scatter_blocks(ins, attrs):
    """Sum weighted rows (B,T,H,m,vdim) into their virtual blocks (B,T,H,m) -> (B,T,E,vdim)."""
    rows, block = ins
    expect(rows.rank == 5 and block.dtype == "i64" and block.shape == rows.shape[:-1], "scatter_blocks", f"{ins}")
    return (rows.with_shape(*rows.shape[:2], attrs["E"], rows.shape[-1]),)


@decomposition("scatter_blocks")
def _scatter_blocks_parts(b, ins, attrs):
    rows, block = ins
    batch, steps, heads, m, vdim = rows.type.shape
    picks = dim_mul(heads, m)
    flat_rows = b.one("reshape", rows, shape=(batch, steps, picks, vdim))
    hot = b.one("one_hot", b.one("reshape", block, shape=(batch, steps, picks)), depth=attrs["E"], dtype=rows.type.dtype)
    return (b.one("matmul", b.one("transpose", hot, perm=(0, 1, 3, 2)), flat_rows),)


@op("select_block", "pooled", "out", (Attr("index", "int", minimum=0),))
def _select_block(ins, attrs):
    """P[..., e, :] of pooled blocks (..., E, vdim) -> (..., vdim)."""
    pooled = ins[0]
    expect(pooled.rank >= 2 and attrs["index"] < pooled.shape[-2], "select_block", f"block {attrs['index']} of {pooled}")
    return (pooled.with_shape(*pooled.shape[:-2], pooled.shape[-1]),)


@decomposition("select_block")
def _select_block_parts(b, ins, attrs):
    (pooled,) = ins
    e = attrs["index"]
    picked = b.one("slice", pooled, axis=-2, start=e, stop=e + 1)
    return (b.one("reshape", picked, shape=(*pooled.type.shape[:-2], pooled.type.shape[-1])),)


@op("slice_cols", "weight", "out", (Attr("start", "int", minimum=0), Attr("stop", "int", minimum=1)))
def _slice_cols(ins, attrs):
    """W[:, start:stop] of a matrix."""
    w = ins[0]
    expect(w.rank == 2 and attrs["start"] < attrs["stop"] <= w.shape[1], "slice_cols", f"{attrs} of {w}")
    return (w.with_shape(w.shape[0], attrs["stop"] - attrs["start"]),)


@decomposition("slice_cols")
def _slice_cols_parts(b, ins, attrs):
    return (b.one("slice", ins[0], axis=1, start=attrs["start"], stop=attrs["stop"]),)
