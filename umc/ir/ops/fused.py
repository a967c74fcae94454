"""Fused and folded ops the passes create. Each one's decomposition is exactly the chain it replaces,
so every backend (and every test) agrees on what it computes."""

from __future__ import annotations

from umc.ir.ops.dense import EPS
from umc.ir.ops.memory import KERNEL, conv_state_type, gather_bytes
from umc.ir.ops.registry import Attr, CostRule, decomposition, expect, op, weight_bytes


@op("fold_rank", "keys, u", "out", cost=lambda i, o, a: (2 * i[0].numel, 0))
def _fold_rank(ins, attrs):
    """K_u[h,k,:] = sum_r u[0,h,0,r] K[h,k,:,r]: one coarse key matrix per side (keys (H,n,kd,r), u (1,H,1,r))."""
    keys, u = ins
    expect(keys.rank == 4 and u.shape == (1, keys.shape[0], 1, keys.shape[3]) and u.dtype == keys.dtype, "fold_rank",
           f"{ins}")
    return (keys.with_shape(*keys.shape[:3]),)


@decomposition("fold_rank")
def _fold_rank_parts(b, ins, attrs):
    keys, u = ins
    heads, rank = keys.type.shape[0], keys.type.shape[3]
    weighted = b.one("mul", keys, b.one("reshape", u, shape=(heads, 1, 1, rank)))
    return (b.one("sum", weighted, axes=(-1,), keepdim=False),)


def _gathered_keys_cost(ins, outs, attrs) -> tuple[int, int]:
    q, keys, index = ins
    rows = keys.shape[0] * keys.shape[1]
    return 2 * outs[0].numel * q.shape[-1], min(index.numel, rows) * (keys.nbytes // rows)


@op("gathered_rank_scores", "q, keys, index: index keys 1", "out", cost=_gathered_keys_cost)
def _gathered_rank_scores(ins, attrs):
    """S[...,h,i,r] = q[...,h,:] . K[h, index[...,h,i], :, r]: rank scores of the m winners only
    (q (...,H,kd), keys (H,n,kd,r), index (...,H,m))."""
    q, keys, index = ins
    expect(keys.rank == 4 and index.dtype == "i64" and index.shape[:-1] == q.shape[:-1]
           and q.shape[-2:] == (keys.shape[0], keys.shape[2]) and q.dtype == keys.dtype,
           "gathered_rank_scores", f"{ins}")
    return (q.with_shape(*index.shape, keys.shape[3]),)


@decomposition("gathered_rank_scores")
def _gathered_rank_scores_parts(b, ins, attrs):
    q, keys, index = ins
    return (b.one("gather_rank_rows", b.one("rank_scores", q, keys), index),)


@op("scale_columns", "weight, scale", "out", cost=lambda i, o, a: (i[0].numel, 0))
def _scale_columns(ins, attrs):
    """W diag(s): a norm's scale folded into the projection after it (W (N,K), s (K))."""
    w, scale = ins
    expect(w.rank == 2 and scale.shape == w.shape[1:] and scale.dtype == w.dtype, "scale_columns", f"{ins}")
    return (w,)


@decomposition("scale_columns")
def _scale_columns_parts(b, ins, attrs):
    return (b.one("mul", *ins),)


def _conv_proj_cost(wq_index: int) -> CostRule:
    """Conv (2*D*K per token, plus a norm's ~5*D) and one projection (2*Q*D per token)."""

    def cost(ins, outs, attrs) -> tuple[int, int]:
        x, wq = ins[0], ins[wq_index]
        tokens = x.numel // x.shape[-1]
        return tokens * (2 * x.shape[-1] * (attrs["kernel"] + 4) + 2 * wq.numel), sum(weight_bytes(w) for w in ins[1:])

    return cost


@op("conv_query_proj", "h, conv, bias, wq, state?", "q, new_state", (KERNEL,), cost=_conv_proj_cost(3))
def _conv_query_proj(ins, attrs):
    """q = Wq (bias + sum_j conv[:, j] * h_{t-j}): causal depthwise conv and query projection in one op.

    Inputs h (B,T,D), conv (D,K), bias (D), Wq (Q,D), optional state (B,K-1,D) of past h; outputs q and the new state.
    """
    h, conv, bias, wq, *state = ins
    expect(wq.rank == 2 and wq.shape[1] == h.shape[-1] and wq.dtype == h.dtype, "conv_query_proj", f"Wq {wq} for {h}")
    return h.with_shape(*h.shape[:-1], wq.shape[0]), conv_state_type("conv_query_proj", h, conv, bias, state, attrs["kernel"])


def _conv_then_project(b, h, conv, bias, wq, state, kernel):
    convolved, new_state = b.emit("query_conv", h, conv, bias, *state, kernel=kernel)
    return b.one("linear", convolved, wq), new_state


@decomposition("conv_query_proj")
def _conv_query_proj_parts(b, ins, attrs):
    h, conv, bias, wq, *state = ins
    return _conv_then_project(b, h, conv, bias, wq, state, attrs["kernel"])


@op("norm_conv_query_proj", "x, scale, conv, bias, wq, state?", "q, new_state", (KERNEL, EPS), cost=_conv_proj_cost(4))
def _norm_conv_query_proj(ins, attrs):
    """conv_query_proj of h = rms_norm(x, scale): the model's norm, the conv and the projection in one op.

    Inputs x (B,T,D), norm weight (D), conv (D,K), bias (D), Wq (Q,D), optional state (B,K-1,D) of past h.
    """
    x, scale, conv, bias, wq, *state = ins
    expect(scale.shape == x.shape[-1:] and scale.dtype == x.dtype, "norm_conv_query_proj", f"norm weight {scale}")
    return _conv_query_proj((x, conv, bias, wq, *state), attrs)


@decomposition("norm_conv_query_proj")
def _norm_conv_query_proj_parts(b, ins, attrs):
    x, scale, conv, bias, wq, *state = ins
    h = b.one("rms_norm", x, scale, eps=attrs["eps"])
    return _conv_then_project(b, h, conv, bias, wq, state, attrs["kernel"])


@op("gather_pool", "table, row: index table 0, block: index E, scores", "pooled", (Attr("E", "int", minimum=1),),
    cost=lambda i, o, a: (2 * i[1].numel * i[0].shape[1], gather_bytes(i[0], i[1].numel)))
def _gather_pool(ins, attrs):
    """IVE pooling with MCS in one op: value rows V[row] (row, block (B,T,H,m)), column slice c of each scaled by
    core c's score (scores (B,T,H,m,h)), summed into their E virtual blocks -> (B,T,E*vdim)."""
    table, row, block, scores = ins
    expect(table.rank == 2 and row.rank == 4 and row.dtype == block.dtype == "i64" and row.shape == block.shape
           and scores.shape[:-1] == row.shape and scores.dtype == table.dtype
           and table.shape[1] % scores.shape[-1] == 0, "gather_pool", f"{ins}")
    return (table.with_shape(*row.shape[:2], attrs["E"] * table.shape[1]),)


@decomposition("gather_pool")
def _gather_pool_parts(b, ins, attrs):
    table, row, block, scores = ins
    scaled = b.one("mcs_scale", b.one("gather_values", table, row), scores)
    pooled = b.one("scatter_blocks", scaled, block, E=attrs["E"])
    batch, steps = row.type.shape[:2]
    return (b.one("reshape", pooled, shape=(batch, steps, attrs["E"] * table.type.shape[1])),)
