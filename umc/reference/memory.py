"""Eager memory layers: UltraMem V1 (DESIGN.md §2.1) and PKM (§2.2), written for clarity.

Both kinds share one module: they differ only in how a token's query scores the
product grid (``_tucker_grid`` vs ``_additive_grid``). Everything after the
selection (activation, implicit value expansion, multi-core pooling, output
projection) is common. Parameter names follow the authors' checkpoints so an
official state dict loads as it is.
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


class QueryConv(nn.Module):
    """Causal depthwise conv over time: x'_t = sum_{j<K} weight[:, j] * x_{t-j} + bias."""

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(d_model, kernel))
        self.bias = nn.Parameter(torch.empty(d_model))

    def forward(self, x: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) and the previous K-1 inputs (B, K-1, D) or None (zeros) -> (x', new past)."""
        batch, _, width = x.shape
        if past is None:
            past = x.new_zeros(batch, self.kernel - 1, width)
        window = torch.cat([past, x], dim=1)
        steps = x.shape[1]
        out = self.bias.expand_as(x).clone()
        for j in range(self.kernel):  # tap j looks j steps back
            start = self.kernel - 1 - j
            out = out + self.weight[:, j] * window[:, start:start + steps]
        return out, window[:, window.shape[1] - (self.kernel - 1):]


class MemoryLayer(nn.Module):
    """One sparse memory layer; ``forward(x, conv_state) -> (out, conv_state)`` with x (B, T, D)."""

    def __init__(self, spec: MemorySpec, d_model: int):
        super().__init__()
        self.spec = spec
        n, kd, heads, rank = spec.keys_per_side, spec.side_dim, spec.heads, spec.tucker_rank
        self.query_conv = QueryConv(d_model, spec.query_conv) if spec.query_conv else None
        self.query_proj = nn.Linear(d_model, spec.query_heads * 2 * kd, bias=False)
        if spec.query_norm != "none":
            self.query_norm = nn.LayerNorm(kd, eps=spec.norm_eps, bias=spec.query_norm == "layernorm_bias")
        if spec.key_norm != "none":
            self.keys_norm = nn.LayerNorm(kd, eps=spec.norm_eps, bias=False)
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
            self.values_proj = nn.Linear(spec.value_expansion * spec.vdim, d_model, bias=False)

    # ------------------------------------------------------------ scoring

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, D) -> normalized row and column queries, each (M, H, kd)."""
        spec = self.spec
        q = self.query_proj(x).view(x.shape[0], spec.query_heads, 2, spec.side_dim)
        if spec.query_norm != "none":
            q = self.query_norm(q)
        q = q.expand(-1, spec.heads, -1, -1)
        return q[:, :, 0], q[:, :, 1]

    def _normed_keys(self) -> torch.Tensor:
        """Keys with the key LayerNorm applied to every key vector (of every rank)."""
        if self.spec.key_norm == "none":
            return self.keys
        if self.spec.kind == "ultramem":  # (H, 2, n, kd, r): normalize over kd
            return self.keys_norm(self.keys.transpose(-1, -2)).transpose(-1, -2)
        return self.keys_norm(self.keys)

    def _tucker_grid(self, q_row: torch.Tensor, q_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TDQKR + MCS (§2.1 steps 3-6) -> grid addresses (M, H, m) and per-core scores (M, H, m, h)."""
        m, n = self.spec.topm, self.spec.keys_per_side
        keys = self._normed_keys()
        s_row = torch.einsum("thd,hndr->thnr", q_row, keys[:, 0])  # rank scores
        s_col = torch.einsum("thd,hndr->thnr", q_col, keys[:, 1])
        u = self.tucker_core_u.reshape(1, -1, 1, self.spec.tucker_rank)
        v = self.tucker_core_v.reshape(1, -1, 1, self.spec.tucker_rank)
        i_row = ((s_row * u).sum(-1)).topk(m, dim=-1).indices  # coarse rank-1 scores
        i_col = ((s_col * v).sum(-1)).topk(m, dim=-1).indices
        rank = s_row.shape[-1]
        sel_row = s_row.gather(2, i_row.unsqueeze(-1).expand(-1, -1, -1, rank))  # (M, H, m, r)
        sel_col = s_col.gather(2, i_col.unsqueeze(-1).expand(-1, -1, -1, rank))
        cores = torch.stack(list(self.tucker_core), dim=1)  # (H, h, r, r)
        per_core = torch.einsum("thir,hcrs,thjs->thcij", sel_row, cores, sel_col)  # (M, H, h, m, m)
        flat = per_core.flatten(-2)
        best = flat.sum(2).topk(m, dim=-1).indices  # (M, H, m) into the m*m grid
        scores = flat.gather(-1, best.unsqueeze(2).expand(-1, -1, flat.shape[2], -1)).transpose(2, 3)
        address = i_row.gather(-1, best // m) * n + i_col.gather(-1, best % m)
        return address, scores

    def _additive_grid(self, q_row: torch.Tensor, q_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Product keys (§2.2): s_row[i] + s_col[j] over the m x m candidates -> addresses, scores (M, H, m, 1)."""
        m, n = self.spec.topm, self.spec.keys_per_side
        keys = self._normed_keys()
        top_row = torch.einsum("thd,hnd->thn", q_row, keys[:, 0]).topk(m, dim=-1)
        top_col = torch.einsum("thd,hnd->thn", q_col, keys[:, 1]).topk(m, dim=-1)
        grid = (top_row.values.unsqueeze(-1) + top_col.values.unsqueeze(-2)).flatten(-2)
        best = grid.topk(m, dim=-1)
        address = top_row.indices.gather(-1, best.indices // m) * n + top_col.indices.gather(-1, best.indices % m)
        return address, best.values.unsqueeze(-1)

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
        """IVE + MCS pooling (§2.1 steps 8-10): (M, K) addresses, (M, K, h) scores -> (M, D)."""
        spec = self.spec
        tokens, picks = address.shape
        virtual = self.shuffle_index[address] if spec.has_shuffle else address
        row, block = virtual % spec.physical_values, virtual // spec.physical_values
        rows = self.values_for_look_up[row].view(tokens, picks, spec.cores, spec.vdim // spec.cores)
        weighted = (rows * scores.unsqueeze(-1).to(rows.dtype)).flatten(-2)  # slice c scaled by core c's score
        pooled = weighted.new_zeros(tokens, spec.value_expansion, spec.vdim)
        pooled.scatter_add_(1, block.unsqueeze(-1).expand(-1, -1, spec.vdim), weighted)
        pooled = pooled.flatten(1)
        return self.values_proj(pooled) if spec.output_projection else pooled

    def side_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores each side's top-m is taken over, (M, H, n) each: rank-1 coarse scores for
        ultramem, key scores for pkm. Verification uses them to recognise rounding-level ties."""
        q_row, q_col = self._queries(x)
        keys = self._normed_keys()
        if self.spec.kind == "pkm":
            return (torch.einsum("thd,hnd->thn", q_row, keys[:, 0]), torch.einsum("thd,hnd->thn", q_col, keys[:, 1]))
        rank = self.spec.tucker_rank
        u = self.tucker_core_u.reshape(1, -1, 1, rank)
        v = self.tucker_core_v.reshape(1, -1, 1, rank)
        s_row = torch.einsum("thd,hndr->thnr", q_row, keys[:, 0])
        s_col = torch.einsum("thd,hndr->thnr", q_col, keys[:, 1])
        return (s_row * u).sum(-1), (s_col * v).sum(-1)

    def scores_at(self, x: torch.Tensor, address: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """Per-core scores (M, K, h), before the activation, of grid addresses (M, K).

        ``heads`` (K,) names each address column's head; by default K = H*m, head-major.
        """
        spec = self.spec
        n = spec.keys_per_side
        q_row, q_col = self._queries(x)
        keys = self._normed_keys()
        if heads is None:
            heads = torch.arange(spec.heads).repeat_interleave(spec.topm)
        row, col = address // n, address % n
        if spec.kind == "pkm":
            s_row = torch.einsum("tkd,tkd->tk", q_row[:, heads], keys[heads, 0, row])
            s_col = torch.einsum("tkd,tkd->tk", q_col[:, heads], keys[heads, 1, col])
            return (s_row + s_col).unsqueeze(-1)
        s_row = torch.einsum("tkd,tkdr->tkr", q_row[:, heads], keys[heads, 0, row])
        s_col = torch.einsum("tkd,tkdr->tkr", q_col[:, heads], keys[heads, 1, col])
        cores = torch.stack(list(self.tucker_core), dim=1)[heads]  # (K, h, r, r)
        return torch.einsum("tkr,kcrs,tks->tkc", s_row, cores, s_col)

    def output_at(self, x: torch.Tensor, address: torch.Tensor) -> torch.Tensor:
        """The layer's output (M, D) had it selected ``address`` (M, H*m): the oracle for a given selection."""
        scores = self.scores_at(x, address)
        heads, m = self.spec.heads, self.spec.topm
        scores = self._activate(scores.view(-1, heads, m, scores.shape[-1])).flatten(1, 2)
        return self._pool(address, scores)

    def retrieve(self, x: torch.Tensor) -> Retrieval:
        """Look up memory for already conv-ed tokens x (M, D); returns choices and output."""
        q_row, q_col = self._queries(x)
        grid = self._tucker_grid if self.spec.kind == "ultramem" else self._additive_grid
        address, scores = grid(q_row, q_col)
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
