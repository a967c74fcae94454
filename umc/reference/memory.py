"""Eager memory layers: UltraMem V1 (DESIGN.md §2.1) and PKM (§2.2), written for clarity.

Both kinds share one module: they differ only in how a token's query scores a key
(one score per Tucker rank, combined by the cores, vs one additive score per side).
Everything after the selection (activation, implicit value expansion, multi-core
pooling, output projection) is common. Parameter names follow the authors'
checkpoints so an official state dict loads as it is.

Compute dtype: every module here computes in the dtype of its input activations and
casts its weights where it uses them, so a low-precision model can be run in float64
(the verification oracle) without a float64 copy of its weights. The value table is
never cast whole: only the gathered rows are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from umc.spec import MemorySpec


@dataclass(frozen=True)
class Retrieval:
    """What one lookup chose: grid addresses (before the shuffle) and per-core scores, head-major."""

    indices: torch.Tensor  # (tokens, H*m) int64
    scores: torch.Tensor  # (tokens, H*m, h) after the score activation
    output: torch.Tensor  # (tokens, D)


class Linear(nn.Linear):
    """nn.Linear computing in the dtype of its input: the weight is cast where it is used."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T (+ bias), in x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computing in the dtype of its input: weight and bias are cast where they are used."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm over the trailing ``normalized_shape`` dims, in x's dtype."""
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class QueryConv(nn.Module):
    """Causal depthwise conv over time: x'_t = sum_{j<K} weight[:, j] * x_{t-j} + bias."""

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(d_model, kernel))
        self.bias = nn.Parameter(torch.empty(d_model))

    def forward(self, x: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) and the previous K-1 inputs (B, K-1, D) or None (zeros) -> (x', new past), in x's dtype."""
        batch, _, width = x.shape
        if past is None:
            past = x.new_zeros(batch, self.kernel - 1, width)
        window = torch.cat([past, x], dim=1)
        steps = x.shape[1]
        weight = self.weight.to(x.dtype)
        out = self.bias.to(x.dtype).expand_as(x).clone()
        for j in range(self.kernel):  # tap j looks j steps back
            start = self.kernel - 1 - j
            out = out + weight[:, j] * window[:, start:start + steps]
        return out, window[:, window.shape[1] - (self.kernel - 1):]


class MemoryLayer(nn.Module):
    """One sparse memory layer; ``forward(x, conv_state) -> (out, conv_state)`` with x (B, T, D).

    Every public method computes in the wider of x's dtype and the weights' dtype.
    """

    def __init__(self, spec: MemorySpec, d_model: int):
        super().__init__()
        self.spec = spec
        n, kd, heads, rank = spec.keys_per_side, spec.side_dim, spec.heads, spec.tucker_rank
        self.query_conv = QueryConv(d_model, spec.query_conv) if spec.query_conv else None
        self.query_proj = Linear(d_model, spec.query_heads * 2 * kd, bias=False)
        if spec.query_norm != "none":
            self.query_norm = LayerNorm(kd, eps=spec.norm_eps, bias=spec.query_norm == "layernorm_bias")
        if spec.key_norm != "none":
            self.keys_norm = LayerNorm(kd, eps=spec.norm_eps, bias=False)
        if spec.kind == "ultramem":
            self.keys = nn.Parameter(torch.empty(heads, 2, n, kd, rank))
            self.tucker_core = nn.ParameterList(torch.empty(heads, rank, rank) for _ in range(spec.cores))
            self.tucker_core_u = nn.Parameter(torch.empty(1, heads, 1, rank))
            self.tucker_core_v = nn.Parameter(torch.empty(1, heads, 1, rank))
        else:
            self.keys = nn.Parameter(torch.empty(heads, 2, n, kd))
        self.values_for_look_up = nn.Parameter(torch.empty(spec.physical_values, spec.vdim))
        if spec.has_shuffle:
            self.register_buffer("shuffle_index", torch.arange(spec.virtual_values))
        if spec.output_projection:
            self.values_proj = Linear(spec.value_expansion * spec.vdim, d_model, bias=False)

    def _widen(self, x: torch.Tensor) -> torch.Tensor:
        """x in the compute dtype: the wider of its own and the weights' (a float64 x runs the layer in float64)."""
        return x.to(torch.promote_types(x.dtype, self.values_for_look_up.dtype))

    # ------------------------------------------------------------ scoring

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, D) -> normalized row and column queries, each (M, H, kd)."""
        return self._sides(self.query_proj(x))

    def _sides(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A query projection (M, Hq*2*kd) -> normalized row and column queries, each (M, H, kd)."""
        spec = self.spec
        q = projected.view(projected.shape[0], spec.query_heads, 2, spec.side_dim)
        if spec.query_norm != "none":
            q = self.query_norm(q)
        q = q.expand(-1, spec.heads, -1, -1)
        return q[:, :, 0], q[:, :, 1]

    def _query_sides(self, x: torch.Tensor, projected: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column queries from layer inputs x (M, D), or from a query projection when ``projected``."""
        return self._sides(self._widen(x)) if projected else self._queries(self._widen(x))

    def _normed_keys(self, dtype: torch.dtype) -> torch.Tensor:
        """Keys in ``dtype`` with the key LayerNorm applied to every key vector (of every rank)."""
        keys = self.keys.to(dtype)
        if self.spec.key_norm == "none":
            return keys
        if self.spec.kind == "ultramem":  # (H, 2, n, kd, r): normalize over kd
            return self.keys_norm(keys.transpose(-1, -2)).transpose(-1, -2)
        return self.keys_norm(keys)

    def _cores(self, dtype: torch.dtype) -> torch.Tensor:
        """The h Tucker cores stacked per head, (H, h, r, r), in ``dtype``."""
        return torch.stack(list(self.tucker_core), dim=1).to(dtype)

    def _key_scores(self, q_row: torch.Tensor, q_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every key's score on each side (§2.1 step 3): (M, H, n, r), one per Tucker rank, for ultramem;
        (M, H, n) for pkm."""
        keys = self._normed_keys(q_row.dtype)
        pattern = "thd,hndr->thnr" if self.spec.kind == "ultramem" else "thd,hnd->thn"
        return torch.einsum(pattern, q_row, keys[:, 0]), torch.einsum(pattern, q_col, keys[:, 1])

    def _coarse(self, s_row: torch.Tensor, s_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores each side's top-m is taken over, (M, H, n): rank-1 (u, v) combinations for ultramem
        (§2.1 step 4), the key scores themselves for pkm."""
        if self.spec.kind == "pkm":
            return s_row, s_col
        rank = self.spec.tucker_rank
        u = self.tucker_core_u.to(s_row.dtype).reshape(1, -1, 1, rank)
        v = self.tucker_core_v.to(s_col.dtype).reshape(1, -1, 1, rank)
        return (s_row * u).sum(-1), (s_col * v).sum(-1)

    def _grid(self, s_row: torch.Tensor, s_col: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Per-core scores of the rows x cols grid (§2.1 step 6), (M, H, h, m', m') for rows, cols (M, H, m').

        Ultramem: S_row[rows] · C_c · S_col[cols]ᵀ per core; pkm: s_row[rows] + s_col[cols] (h = 1).
        """
        if self.spec.kind == "pkm":
            sel_row, sel_col = s_row.gather(2, rows), s_col.gather(2, cols)
            return (sel_row.unsqueeze(-1) + sel_col.unsqueeze(-2)).unsqueeze(2)
        rank = s_row.shape[-1]
        sel_row = s_row.gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, rank))  # (M, H, m', r)
        sel_col = s_col.gather(2, cols.unsqueeze(-1).expand(-1, -1, -1, rank))
        return torch.einsum("thir,hcrs,thjs->thcij", sel_row, self._cores(s_row.dtype), sel_col)

    def _select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-m rows, top-m columns, then the top m of their m x m grid (§2.1 steps 2-6)
        -> grid addresses (M, H, m) and per-core scores (M, H, m, h), before the activation."""
        m, n = self.spec.topm, self.spec.keys_per_side
        s_row, s_col = self._key_scores(*self._queries(x))
        c_row, c_col = self._coarse(s_row, s_col)
        rows, cols = c_row.topk(m, dim=-1).indices, c_col.topk(m, dim=-1).indices
        per_core = self._grid(s_row, s_col, rows, cols).flatten(-2)  # (M, H, h, m*m)
        best = per_core.sum(2).topk(m, dim=-1).indices  # (M, H, m) into the m*m grid
        scores = per_core.gather(-1, best.unsqueeze(2).expand(-1, -1, per_core.shape[2], -1)).transpose(2, 3)
        address = rows.gather(-1, best // m) * n + cols.gather(-1, best % m)
        return address, scores

    def _activate(self, scores: torch.Tensor) -> torch.Tensor:
        """Score activation over each head's m winners (per core)."""
        kind = self.spec.score_activation
        if kind == "softmax":
            return scores.softmax(dim=2)
        if kind == "relu":
            return F.relu(scores)
        return scores

    # ------------------------------------------------------------ values

    def _pool(self, address: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """IVE + MCS pooling (§2.1 steps 8-10): (M, K) addresses, (M, K, h) scores -> (M, D), in the scores' dtype.

        Only the K gathered value rows are cast to that dtype, never the whole table.
        """
        spec = self.spec
        tokens, picks = address.shape
        virtual = self.shuffle_index[address] if spec.has_shuffle else address
        row, block = virtual % spec.physical_values, virtual // spec.physical_values
        rows = self.values_for_look_up[row].to(scores.dtype).view(tokens, picks, spec.cores, spec.vdim // spec.cores)
        weighted = (rows * scores.unsqueeze(-1)).flatten(-2)  # slice c scaled by core c's score
        pooled = weighted.new_zeros(tokens, spec.value_expansion, spec.vdim)
        pooled.scatter_add_(1, block.unsqueeze(-1).expand(-1, -1, spec.vdim), weighted)
        pooled = pooled.flatten(1)
        return self.values_proj(pooled) if spec.output_projection else pooled

    # ------------------------------------------------------------ verification views

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The query projection (M, Hq*2*kd) of layer inputs x (M, D), after the conv: what the selection's
        scores are computed from. Verification compares a build's with it, then scores the build's own."""
        return self.query_proj(self._widen(x))

    def side_scores(self, x: torch.Tensor, projected: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores each side's top-m is taken over, (M, H, n) each: rank-1 coarse scores for
        ultramem, key scores for pkm. ``x`` is the layer input (M, D), or with ``projected`` a query
        projection (M, Hq*2*kd). Verification uses them to judge a selection up to rounding."""
        return self._coarse(*self._key_scores(*self._query_sides(x, projected)))

    def grid_at(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, projected: bool = False) -> torch.Tensor:
        """Per-core grid scores (M, H, h, m', m'), before the activation, over the given row and column
        key indices (M, H, m') each: ``[t, head, c, i, j]`` scores grid address ``rows[t, head, i] * n +
        cols[t, head, j]``. Verification checks another build's grid top-m over its own rows x columns.
        ``x`` as in ``side_scores``."""
        s_row, s_col = self._key_scores(*self._query_sides(x, projected))
        return self._grid(s_row, s_col, rows, cols)

    def scores_at(self, x: torch.Tensor, address: torch.Tensor, heads: torch.Tensor | None = None,
                  projected: bool = False) -> torch.Tensor:
        """Per-core scores (M, K, h), before the activation, of grid addresses (M, K).

        ``heads`` (K,) names each address column's head; by default K = H*m, head-major. ``x`` as in
        ``side_scores``.
        """
        spec = self.spec
        n = spec.keys_per_side
        q_row, q_col = self._query_sides(x, projected)
        keys = self._normed_keys(q_row.dtype)
        if heads is None:
            heads = torch.arange(spec.heads).repeat_interleave(spec.topm)
        row, col = address // n, address % n
        if spec.kind == "pkm":
            s_row = torch.einsum("tkd,tkd->tk", q_row[:, heads], keys[heads, 0, row])
            s_col = torch.einsum("tkd,tkd->tk", q_col[:, heads], keys[heads, 1, col])
            return (s_row + s_col).unsqueeze(-1)
        s_row = torch.einsum("tkd,tkdr->tkr", q_row[:, heads], keys[heads, 0, row])
        s_col = torch.einsum("tkd,tkdr->tkr", q_col[:, heads], keys[heads, 1, col])
        cores = self._cores(q_row.dtype)[heads]  # (K, h, r, r)
        return torch.einsum("tkr,kcrs,tks->tkc", s_row, cores, s_col)

    def output_at(self, x: torch.Tensor, address: torch.Tensor) -> torch.Tensor:
        """The layer's output (M, D) had it selected ``address`` (M, H*m): the oracle for a given selection."""
        scores = self.scores_at(x, address)
        heads, m = self.spec.heads, self.spec.topm
        scores = self._activate(scores.view(-1, heads, m, scores.shape[-1])).flatten(1, 2)
        return self._pool(address, scores)

    # ------------------------------------------------------------ lookup

    def retrieve(self, x: torch.Tensor) -> Retrieval:
        """Look up memory for already conv-ed tokens x (M, D); returns choices and output."""
        address, scores = self._select(self._widen(x))
        scores = self._activate(scores)
        address, scores = address.flatten(1), scores.flatten(1, 2)
        return Retrieval(address, scores, self._pool(address, scores))

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None = None, select: torch.Tensor | None = None,
                record: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> (memory output (B, T, D), new query-conv state or None).

        For verification: ``select`` (B, T, H*m) forces these grid addresses instead of the layer's
        own top-m (the oracle for another implementation's selection); ``record`` receives the
        query input (B*T, D) after the conv.
        """
        x = self._widen(x)
        if self.query_conv is not None:
            x, conv_state = self.query_conv(x, conv_state)
        flat = x.reshape(-1, x.shape[-1])
        if record is not None:
            record.append(flat)
        if select is None:
            out = self.retrieve(flat).output
        else:
            out = self.output_at(flat, select.reshape(flat.shape[0], -1))
        return out.view(*x.shape[:-1], -1), conv_state
