"""Torch implementation of every IR op, keyed by op name (the graph backend's registry).

Written independently of ``umc.reference`` (which it must not import) and of the ops'
decompositions: the three are compared against each other, so none may borrow another's code.
Shape-valued attributes arrive evaluated (concrete ints). Selection ops also have a *forced*
variant: given the chosen indices (e.g. another graph's selection), it returns the outputs the
op would give had it chosen them, which is how a verifier compares two graphs for the same
selection.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from umc.dtypes import torch_dtype
from umc.registry import registrar

TorchImpl = Callable[..., tuple[torch.Tensor, ...]]
ForcedImpl = Callable[[dict[str, Any], list[torch.Tensor], dict[int, torch.Tensor]], tuple[torch.Tensor, ...]]
TORCH_IMPLS: dict[str, TorchImpl] = {}
FORCED_IMPLS: dict[str, ForcedImpl] = {}


impl = registrar(TORCH_IMPLS, "torch implementations")  # @impl(op): fn(attrs, *inputs) -> tuple of outputs
forced = registrar(FORCED_IMPLS, "forced implementations")  # @forced(op): fn(attrs, inputs, {output index: chosen})


def one(fn: Callable[..., torch.Tensor]) -> TorchImpl:
    """Adapt a single-output function."""
    return lambda attrs, *xs: (fn(attrs, *xs),)


def accumulate_in_float32(fn: TorchImpl) -> TorchImpl:
    """Run ``fn`` on float16/bfloat16 inputs upcast to float32 and round each float output once to the input
    dtype (DESIGN.md §5: scores accumulate in fp32, as the fused kernels do)."""

    def wide(attrs, *xs):
        low = next((x.dtype for x in xs if x.dtype in (torch.float16, torch.bfloat16)), None)
        if low is None:
            return fn(attrs, *xs)
        outs = fn(attrs, *(x.float() if x.is_floating_point() else x for x in xs))
        return tuple(o.to(low) if o.is_floating_point() else o for o in outs)

    return wide


# ---------------------------------------------------------------- tensor primitives

impl("add")(one(lambda a, x, y: x + y))
impl("mul")(one(lambda a, x, y: x * y))
impl("add_scalar")(one(lambda a, x: x + a["value"]))
impl("mul_scalar")(one(lambda a, x: x * a["value"]))
impl("floordiv_scalar")(one(lambda a, x: torch.div(x, a["value"], rounding_mode="floor")))
impl("mod_scalar")(one(lambda a, x: torch.remainder(x, a["value"])))
impl("rsqrt")(one(lambda a, x: torch.rsqrt(x)))
impl("sigmoid")(one(lambda a, x: torch.sigmoid(x)))
impl("relu")(one(lambda a, x: F.relu(x)))
impl("gelu")(one(lambda a, x: F.gelu(x)))
impl("silu")(one(lambda a, x: F.silu(x)))
impl("softmax")(one(lambda a, x: torch.softmax(x, dim=a["axis"])))
impl("sum")(one(lambda a, x: x.sum(dim=a["axes"], keepdim=a["keepdim"])))
impl("mean")(one(lambda a, x: x.mean(dim=a["axes"], keepdim=a["keepdim"])))
impl("reshape")(one(lambda a, x: x.reshape(a["shape"])))
impl("transpose")(one(lambda a, x: x.permute(a["perm"])))
impl("expand")(one(lambda a, x: x.expand(a["shape"])))
impl("slice")(one(lambda a, x: x.narrow(a["axis"], a["start"], a["stop"] - a["start"])))
impl("concat")(one(lambda a, *xs: torch.cat(xs, dim=a["axis"])))
impl("cast")(one(lambda a, x: x.to(torch_dtype(a["to"]))))
impl("matmul")(one(lambda a, x, y: torch.matmul(x, y)))
impl("gather")(one(lambda a, data, index: data.index_select(a["axis"], index.flatten()).reshape(
    *data.shape[:a["axis"] % data.dim()], *index.shape, *data.shape[a["axis"] % data.dim() + 1:])))
impl("take_along")(one(lambda a, data, index: torch.gather(data, a["axis"], index)))
impl("one_hot")(one(lambda a, index: F.one_hot(index, a["depth"]).to(torch_dtype(a["dtype"]))))
impl("zeros")(one(lambda a: torch.zeros(a["shape"], dtype=torch_dtype(a["dtype"]))))


@impl("iota")
def _iota(attrs, *_):
    shape, axis = attrs["shape"], attrs["axis"] % len(attrs["shape"])
    steps = torch.arange(shape[axis]).view(*[-1 if i == axis else 1 for i in range(len(shape))])
    return (steps.expand(shape),)


@impl("topm")
def _topm(attrs, x):
    values, indices = torch.topk(x, attrs["k"], dim=-1)
    return values, indices


@forced("topm")
def _topm_forced(attrs, inputs, chosen):
    (x,), indices = inputs, chosen[1]
    return torch.take_along_dim(x, indices, dim=-1), indices


impl("fork")(one(lambda a, x: x))
impl("join_add")(one(lambda a, x, y: x + y))

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


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE for x (B, heads, T, hd) at integer positions (T,) or, per sequence, (B, T)."""
    hd = x.shape[3]
    inv = torch.pow(theta, -torch.arange(0, hd // 2, dtype=torch.float32, device=x.device) / (hd // 2))
    phase = positions.to(torch.float32).unsqueeze(-1) * inv  # (..., T, hd/2)
    if phase.dim() == 3:
        phase = phase.unsqueeze(1)  # per sequence: broadcast over heads
    cos = torch.cat([phase.cos(), phase.cos()], -1).to(x.dtype)
    sin = torch.cat([phase.sin(), phase.sin()], -1).to(x.dtype)
    half = hd // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


@impl("attention")
def _attention(attrs, q, k, v, past_k=None, past_v=None, past_len=None):
    heads, kv_heads, hd = attrs["n_heads"], attrs["n_kv_heads"], attrs["head_dim"]
    batch, steps = q.shape[:2]
    start = 0 if past_k is None else past_k.shape[2]
    new = torch.arange(steps, device=q.device)
    positions = start + new if past_len is None else past_len.unsqueeze(1) + new  # (T,) or (B, T)
    split = lambda t, n: t.view(batch, steps, n, hd).permute(0, 2, 1, 3)
    q = _rope(split(q, heads), positions, attrs["rope_theta"])
    k = _rope(split(k, kv_heads), positions, attrs["rope_theta"])
    v = split(v, kv_heads)
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    key_at = torch.arange(k.shape[2], device=q.device)
    mask = key_at <= (start + new).unsqueeze(1)  # (T, S): causal
    if past_len is not None:  # and a ragged batch's padding (the first start - past_len[b] positions) hidden
        mask = mask & (key_at >= (start - past_len).view(batch, 1, 1))
        mask = mask.view(batch, 1, 1, steps, k.shape[2])
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
def _key_scores(q, keys):
    return torch.einsum("...hd,hkd->...hk", q, keys)


impl("rank_scores")(accumulate_in_float32(one(lambda a, q, k: torch.einsum("...hd,hkdr->...hkr", q, k))))
impl("key_scores")(accumulate_in_float32(one(lambda a, q, k: _key_scores(q, k))))
impl("coarse_scores")(accumulate_in_float32(one(lambda a, s, u: torch.einsum("...hkr,hr->...hk", s, u[0, :, 0]))))
impl("stack_cores")(one(lambda a, *cores: torch.stack(cores, 1)))


@impl("gather_rank_rows")
def _gather_rank_rows(attrs, s, index):
    return (torch.take_along_dim(s, index.unsqueeze(-1), dim=-2),)


def _tucker_grid(rows, cols, cores):
    return torch.einsum("...hir,hcrs,...hjs->...hcij", rows, cores, cols)


impl("tucker_grid")(accumulate_in_float32(one(lambda a, rows, cols, cores: _tucker_grid(rows, cols, cores))))


def _address(i_row, i_col, winners, m: int, n: int) -> torch.Tensor:
    return torch.take_along_dim(i_row, winners // m, -1) * n + torch.take_along_dim(i_col, winners % m, -1)


def _grid_scores(grid: torch.Tensor, winners: torch.Tensor) -> torch.Tensor:
    per_core = grid.flatten(-2)  # (...,H,h,m*m)
    return torch.take_along_dim(per_core, winners.unsqueeze(-2), dim=-1).transpose(-1, -2)


@impl("grid_select")
def _grid_select(attrs, grid, i_row, i_col):
    m = grid.shape[-1]
    winners = torch.topk(grid.flatten(-2).float().sum(-2), m, dim=-1).indices  # (...,H,m), cores summed in fp32
    return _address(i_row, i_col, winners, m, attrs["n"]), _grid_scores(grid, winners)


def _positions(i_row, i_col, address, n: int) -> torch.Tensor:
    """Where each chosen address sits in the m*m grid over rows i_row x columns i_col (ValueError if absent)."""
    m = i_row.shape[-1]
    row_hit = i_row.unsqueeze(-2) == (address // n).unsqueeze(-1)  # (..., chosen, m)
    col_hit = i_col.unsqueeze(-2) == (address % n).unsqueeze(-1)
    if not (row_hit.any(-1).all() and col_hit.any(-1).all()):
        raise ValueError("a forced address is not in the grid of this graph's rows and columns")
    return row_hit.int().argmax(-1) * m + col_hit.int().argmax(-1)


@forced("grid_select")
def _grid_select_forced(attrs, inputs, chosen):
    grid, i_row, i_col = inputs
    address = chosen[0]
    return address, _grid_scores(grid, _positions(i_row, i_col, address, attrs["n"]))


@impl("additive_select")
def _additive_select(attrs, v_row, i_row, v_col, i_col):
    m = v_row.shape[-1]
    total = (v_row.float()[..., :, None] + v_col.float()[..., None, :]).flatten(-2)
    values, winners = torch.topk(total, m, dim=-1)
    return _address(i_row, i_col, winners, m, attrs["n"]), values.to(v_row.dtype).unsqueeze(-1)


@forced("additive_select")
def _additive_select_forced(attrs, inputs, chosen):
    v_row, i_row, v_col, i_col = inputs
    address = chosen[0]
    total = (v_row.float()[..., :, None] + v_col.float()[..., None, :]).flatten(-2).to(v_row.dtype)
    return address, torch.take_along_dim(total, _positions(i_row, i_col, address, attrs["n"]), -1).unsqueeze(-1)


impl("shuffle")(one(lambda a, address, perm: perm[address]))


@impl("ive_split")
def _ive_split(attrs, p):
    return p % attrs["N"], torch.div(p, attrs["N"], rounding_mode="floor")


impl("gather_values")(one(lambda a, table, rows: table[rows]))


@impl("mcs_scale")
def _mcs_scale(attrs, rows, scores):
    cores = scores.shape[-1]
    sliced = rows.unflatten(-1, (cores, rows.shape[-1] // cores))
    return ((sliced * scores.unsqueeze(-1)).flatten(-2),)


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


def _winner_rank_scores(q, keys, index):
    heads = torch.arange(keys.shape[0], device=keys.device).view(*[1] * (index.dim() - 2), -1, 1)
    return torch.einsum("...hd,...hmdr->...hmr", q, keys[heads, index])  # keys gathered: (...,H,m,kd,r)


impl("gathered_rank_scores")(accumulate_in_float32(one(lambda a, q, keys, i: _winner_rank_scores(q, keys, i))))


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


def column_cores(vdim: int, cores: int, start: int, stop: int, device=None) -> torch.Tensor:
    """The scoring core each value column start..stop-1 belongs to (column slice c of vdim/cores is core c's)."""
    return torch.div(torch.arange(start, stop, device=device), vdim // cores, rounding_mode="floor")


def pool_columns(values: torch.Tensor, column_core: torch.Tensor, scores: torch.Tensor, block: torch.Tensor,
                 blocks: int) -> torch.Tensor:
    """Value columns (n,...,c) scaled by the score of the core each column belongs to (scores (n,...,h),
    ``column_core`` (c,)) and summed into their blocks (block (n,...)) -> (n,E,c): gather_pool's arithmetic on any
    set of columns (all of them here; a rank's slice when a table is split by columns)."""
    n, c = values.shape[0], values.shape[-1]
    weighted = (values * scores.index_select(-1, column_core)).reshape(n, -1, c)
    pooled = values.new_zeros(n, blocks, c)
    pooled.scatter_add_(1, block.reshape(n, -1, 1).expand(-1, -1, c), weighted)
    return pooled


@impl("gather_pool")
def _gather_pool(attrs, table, row, block, scores):
    # written apart from mcs_scale/scatter_blocks (per-column weights, scatter_add) for the same reason
    batch, steps = row.shape[:2]
    vdim = table.shape[1]
    tokens = lambda t: t.reshape(batch * steps, *t.shape[2:])
    pooled = pool_columns(tokens(table[row]), column_cores(vdim, scores.shape[-1], 0, vdim, table.device),
                          tokens(scores), tokens(block), attrs["E"])
    return (pooled.reshape(batch, steps, attrs["E"] * vdim),)

# ---------------------------------------------------------------- kernel-sized


@impl("coarse_topm")
def _coarse_topm(attrs, q, keys):
    values, indices = torch.topk(_key_scores(q.float(), keys.float()), attrs["k"], dim=-1)
    return values.to(q.dtype), indices


@forced("coarse_topm")
def _coarse_topm_forced(attrs, inputs, chosen):
    q, keys = inputs
    return torch.take_along_dim(_key_scores(q.float(), keys.float()), chosen[1], dim=-1).to(q.dtype), chosen[1]


def winner_grid(q_row, q_col, keys_row, keys_col, i_row, i_col, cores):
    """Per-core Tucker grid (...,H,h,m,m) in float32 over the rows and columns kept."""
    rows = _winner_rank_scores(q_row.float(), keys_row.float(), i_row)
    cols = _winner_rank_scores(q_col.float(), keys_col.float(), i_col)
    return _tucker_grid(rows, cols, cores.float())


def top_of_grid(grid: torch.Tensor, i_row: torch.Tensor, i_col: torch.Tensor, n: int):
    """The top m of a per-core grid (...,H,h,m,m) summed over cores: grid addresses (...,H,m) and each core's score
    at them (...,H,m,h), in the grid's dtype."""
    m = grid.shape[-1]
    winners = torch.topk(grid.flatten(-2).sum(-2), m, dim=-1).indices
    return _address(i_row, i_col, winners, m, n), _grid_scores(grid, winners)


@impl("grid_topm")
def _grid_topm(attrs, q_row, q_col, keys_row, keys_col, i_row, i_col, cores):
    grid = winner_grid(q_row, q_col, keys_row, keys_col, i_row, i_col, cores)
    address, scores = top_of_grid(grid, i_row, i_col, attrs["n"])
    return address, scores.to(q_row.dtype)


@forced("grid_topm")
def _grid_topm_forced(attrs, inputs, chosen):
    grid = winner_grid(*inputs)
    address, i_row, i_col = chosen[0], inputs[4], inputs[5]
    return address, _grid_scores(grid, _positions(i_row, i_col, address, attrs["n"])).to(inputs[0].dtype)


@impl("lookup_pool")
def _lookup_pool(attrs, table, address, scores, perm=None):
    virtual = address if perm is None else perm[address]
    row, block = _ive_split(attrs, virtual)
    return _gather_pool(attrs, table, row, block, scores)


impl("sharded_lookup_pool")(_lookup_pool)  # without a distributed world: the whole table, as its decomposition
