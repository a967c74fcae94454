"""Torch implementation of every IR op, keyed by op name (the graph backend's registry).

Written independently of ``umc.reference`` (which it must not import): the two are
compared against each other, so neither may borrow the other's code.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

TorchImpl = Callable[..., tuple[torch.Tensor, ...]]
TORCH_IMPLS: dict[str, TorchImpl] = {}


def impl(name: str):
    """Register a torch implementation: fn(attrs, *inputs) -> tuple of outputs."""

    def wrap(fn: TorchImpl) -> TorchImpl:
        TORCH_IMPLS[name] = fn
        return fn

    return wrap


def one(fn: Callable[..., torch.Tensor]) -> TorchImpl:
    """Adapt a single-output function."""
    return lambda attrs, *xs: (fn(attrs, *xs),)


# ---------------------------------------------------------------- generic

impl("add")(one(lambda a, x, y: x + y))
impl("mul")(one(lambda a, x, y: x * y))
impl("silu")(one(lambda a, x: F.silu(x)))
impl("gelu")(one(lambda a, x: F.gelu(x)))
impl("relu")(one(lambda a, x: F.relu(x)))
impl("softmax")(one(lambda a, x: torch.softmax(x, dim=a["axis"])))


@impl("reshape")
def _reshape(attrs, x):
    """Symbolic target dims (B, T) are x's leading dims, in order."""
    leading = iter(x.shape)
    return (x.reshape([d if isinstance(d, int) else next(leading) for d in attrs["shape"]]),)


# ---------------------------------------------------------------- dense


impl("embedding")(one(lambda a, tokens, w: w[tokens]))
impl("linear")(one(lambda a, x, w: x @ w.T))


@impl("rms_norm")
def _rms_norm(attrs, x, w):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + attrs["eps"]) * w,)


@impl("rms_normalize")
def _rms_normalize(attrs, x):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + attrs["eps"]),)


@impl("layer_norm")
def _layer_norm(attrs, x, w, b=None):
    return (F.layer_norm(x, x.shape[-1:], w, b, attrs["eps"]),)


def _rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE for x (B, heads, T, hd) at positions start..start+T-1."""
    steps, hd = x.shape[2], x.shape[3]
    inv = torch.pow(theta, -torch.arange(0, hd // 2, dtype=torch.float32) / (hd // 2))
    phase = torch.outer(torch.arange(start, start + steps, dtype=torch.float32), inv)
    cos = torch.cat([phase.cos(), phase.cos()], -1).to(x.dtype)
    sin = torch.cat([phase.sin(), phase.sin()], -1).to(x.dtype)
    half = hd // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


@impl("attention")
def _attention(attrs, q, k, v, past_k=None, past_v=None):
    heads, kv_heads, hd = attrs["n_heads"], attrs["n_kv_heads"], attrs["head_dim"]
    batch, steps = q.shape[:2]
    start = 0 if past_k is None else past_k.shape[2]
    split = lambda t, n: t.view(batch, steps, n, hd).permute(0, 2, 1, 3)
    q = _rope(split(q, heads), start, attrs["rope_theta"])
    k = _rope(split(k, kv_heads), start, attrs["rope_theta"])
    v = split(v, kv_heads)
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    mask = torch.ones(steps, k.shape[2], dtype=torch.bool).tril(diagonal=start)
    grouped_q = q.view(batch, kv_heads, heads // kv_heads, steps, hd)
    logits = torch.einsum("bgqtd,bgsd->bgqts", grouped_q, k) / hd ** 0.5
    weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    out = torch.einsum("bgqts,bgsd->bgqtd", weights, v).reshape(batch, heads, steps, hd)
    return out.permute(0, 2, 1, 3).reshape(batch, steps, heads * hd), k, v


# ---------------------------------------------------------------- memory, primitive steps


def _causal_taps(x: torch.Tensor, state: torch.Tensor | None, kernel: int):
    """Windows of the last K inputs: list over taps j of x_{t-j} (B,T,D), plus the new state."""
    if state is None:
        state = x.new_zeros(x.shape[0], kernel - 1, x.shape[2])
    padded = torch.cat([state, x], 1)
    steps = x.shape[1]
    taps = [padded[:, kernel - 1 - j: kernel - 1 - j + steps] for j in range(kernel)]
    return taps, padded[:, padded.shape[1] - kernel + 1:]


@impl("query_conv")
def _query_conv(attrs, x, weight, bias, state=None):
    taps, new_state = _causal_taps(x, state, attrs["kernel"])
    return sum(weight[:, j] * tap for j, tap in enumerate(taps)) + bias, new_state


@impl("split_query")
def _split_query(attrs, q):
    q = q.unflatten(-1, (attrs["query_heads"], 2, attrs["side_dim"]))
    q = q.expand(*q.shape[:-3], attrs["heads"], 2, attrs["side_dim"])
    return q[..., 0, :], q[..., 1, :]


@impl("norm_keys")
def _norm_keys(attrs, keys, w):
    moved = keys.movedim(3, -1)
    return (F.layer_norm(moved, moved.shape[-1:], w, None, attrs["eps"]).movedim(-1, 3),)


impl("key_side")(one(lambda a, keys: keys[:, a["side"]]))
impl("rank_scores")(one(lambda a, q, k: torch.einsum("bthd,hkdr->bthkr", q, k)))
impl("key_scores")(one(lambda a, q, k: torch.einsum("bthd,hkd->bthk", q, k)))
impl("coarse_scores")(one(lambda a, s, u: torch.einsum("bthkr,hr->bthk", s, u[0, :, 0])))
impl("stack_cores")(one(lambda a, *cores: torch.stack(cores, 1)))


@impl("topm")
def _topm(attrs, x):
    values, indices = torch.topk(x, attrs["k"], dim=-1)
    return values, indices


@impl("gather_rank_rows")
def _gather_rank_rows(attrs, s, index):
    return (torch.take_along_dim(s, index.unsqueeze(-1), dim=-2),)


impl("tucker_grid")(one(lambda a, rows, cols, cores: torch.einsum("bthir,hcrs,bthjs->bthcij", rows, cores, cols)))


@impl("grid_select")
def _grid_select(attrs, grid, i_row, i_col):
    m = grid.shape[-1]
    per_core = grid.flatten(-2)  # (B,T,H,h,m*m)
    winners = torch.topk(per_core.sum(3), m, dim=-1).indices  # (B,T,H,m)
    scores = torch.take_along_dim(per_core, winners.unsqueeze(3), dim=-1).transpose(-1, -2)
    address = torch.take_along_dim(i_row, winners // m, -1) * attrs["n"] + torch.take_along_dim(i_col, winners % m, -1)
    return address, scores


@impl("additive_select")
def _additive_select(attrs, v_row, i_row, v_col, i_col):
    m = v_row.shape[-1]
    total = (v_row[..., :, None] + v_col[..., None, :]).flatten(-2)
    values, winners = torch.topk(total, m, dim=-1)
    address = torch.take_along_dim(i_row, winners // m, -1) * attrs["n"] + torch.take_along_dim(i_col, winners % m, -1)
    return address, values.unsqueeze(-1)


impl("shuffle")(one(lambda a, address, perm: perm[address]))


@impl("ive_split")
def _ive_split(attrs, p):
    return p % attrs["N"], torch.div(p, attrs["N"], rounding_mode="floor")


impl("gather_values")(one(lambda a, table, rows: table[rows]))


@impl("mcs_scale")
def _mcs_scale(attrs, rows, scores):
    cores = scores.shape[-1]
    sliced = rows.unflatten(-1, (cores, rows.shape[-1] // cores))
    return ((sliced * scores.unsqueeze(-1).to(rows.dtype)).flatten(-2),)


@impl("scatter_blocks")
def _scatter_blocks(attrs, rows, block):
    batch, steps, vdim = rows.shape[0], rows.shape[1], rows.shape[-1]
    flat_rows = rows.reshape(batch, steps, -1, vdim)
    one_hot = F.one_hot(block.reshape(batch, steps, -1), attrs["E"]).to(rows.dtype)  # (B,T,H*m,E)
    return (torch.einsum("btke,btkv->btev", one_hot, flat_rows),)


impl("select_block")(one(lambda a, pooled: pooled[..., a["index"], :]))
impl("slice_cols")(one(lambda a, w: w[:, a["start"]:a["stop"]]))

# ---------------------------------------------------------------- fused / folded


impl("fold_rank")(one(lambda a, keys, u: torch.einsum("hkdr,hr->hkd", keys, u[0, :, 0])))


@impl("gathered_rank_scores")
def _gathered_rank_scores(attrs, q, keys, index):
    heads = torch.arange(keys.shape[0]).view(1, 1, -1, 1)
    picked = keys[heads, index]  # (B,T,H,m,kd,r)
    return (torch.einsum("bthd,bthmdr->bthmr", q, picked),)


impl("scale_columns")(one(lambda a, w, s: w * s))


@impl("conv_query_proj")
def _conv_query_proj(attrs, h, conv, bias, wq, state=None):
    # written apart from query_conv (grouped conv1d, not a tap loop) so the pass tests compare two codes
    kernel = attrs["kernel"]
    past = h.new_zeros(h.shape[0], kernel - 1, h.shape[2]) if state is None else state
    padded = torch.cat([past, h], 1)
    convolved = F.conv1d(padded.transpose(1, 2), conv.flip(-1).unsqueeze(1), bias, groups=h.shape[2]).transpose(1, 2)
    return convolved @ wq.T, padded[:, padded.shape[1] - kernel + 1:]


@impl("norm_conv_query_proj")
def _norm_conv_query_proj(attrs, x, scale, conv, bias, wq, state=None):
    return _conv_query_proj(attrs, _rms_norm(attrs, x, scale)[0], conv, bias, wq, state)


@impl("gather_pool")
def _gather_pool(attrs, table, row, block, scores):
    # written apart from mcs_scale/scatter_blocks (per-column weights, scatter_add) for the same reason
    batch, steps = row.shape[:2]
    vdim, cores = table.shape[1], scores.shape[-1]
    weights = scores.to(table.dtype).repeat_interleave(vdim // cores, dim=-1)  # (B,T,H,m,vdim)
    weighted = (table[row] * weights).reshape(batch * steps, -1, vdim)
    pooled = table.new_zeros(batch * steps, attrs["E"], vdim)
    pooled.scatter_add_(1, block.reshape(batch * steps, -1, 1).expand(-1, -1, vdim), weighted)
    return (pooled.reshape(batch, steps, attrs["E"] * vdim),)


impl("fork")(one(lambda a, x: x))
impl("join_add")(one(lambda a, x, y: x + y))


def run_op(op: str, attrs: dict[str, Any], inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Execute one op; KeyError names an op without a torch implementation."""
    if op not in TORCH_IMPLS:
        raise KeyError(f"op {op!r} has no torch implementation")
    return TORCH_IMPLS[op](attrs, *inputs)
