"""Eager decoder language model with memory units (DESIGN.md §2), nanoGPT style.

``model(tokens, state=None) -> (logits, state)``: with no state the tokens are a
prompt; with a state they continue it (one or more tokens per call). Decoding
token by token gives the same logits as one full-sequence forward.

Every module computes in the dtype of its activations and casts its weights where it
uses them: ``model(tokens, compute_dtype=torch.float64)`` runs a bfloat16 model in
float64 (the verification oracle) without a float64 copy of its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from umc.reference.memory import LayerNorm, Linear, MemoryLayer
from umc.spec import ModelSpec, Spec


@dataclass(frozen=True)
class DecodeState:
    """Everything a continuation needs: tokens seen, per-block KV cache, per-unit query-conv inputs."""

    length: int
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per block: (B, n_kv_heads, S, head_dim) each
    conv: tuple[torch.Tensor | None, ...]  # per memory unit: last K-1 conv inputs (B, K-1, D) or None


class RMSNorm(nn.Module):
    """x / rms(x) * weight."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize over the last dim, in x's dtype."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


def make_norm(model: ModelSpec) -> nn.Module:
    """The spec's norm over d_model (RMSNorm, or LayerNorm with bias)."""
    if model.norm == "rmsnorm":
        return RMSNorm(model.d_model, model.norm_eps)
    return LayerNorm(model.d_model, eps=model.norm_eps)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE, rotate-half convention: x (B, heads, T, hd) at absolute positions (T,)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE and a KV cache."""

    def __init__(self, model: ModelSpec):
        super().__init__()
        self.spec = model
        hd = model.head_dim
        self.q_proj = Linear(model.d_model, model.n_heads * hd, bias=False)
        self.k_proj = Linear(model.d_model, model.n_kv_heads * hd, bias=False)
        self.v_proj = Linear(model.d_model, model.n_kv_heads * hd, bias=False)
        self.o_proj = Linear(model.n_heads * hd, model.d_model, bias=False)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None, start: int):
        """x (B, T, D) at positions start..start+T-1 -> (out, (k, v) including x's)."""
        s = self.spec
        batch, steps, _ = x.shape
        positions = torch.arange(start, start + steps, device=x.device)
        q = self.q_proj(x).view(batch, steps, s.n_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, steps, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = rotate(q, positions, s.rope_theta), rotate(k, positions, s.rope_theta)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        group = s.n_heads // s.n_kv_heads
        keys, vals = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        att = (q @ keys.transpose(-1, -2)) * s.head_dim ** -0.5
        key_pos = torch.arange(k.shape[2], device=x.device)
        att = att.masked_fill(key_pos[None, :] > positions[:, None], float("-inf"))
        out = att.softmax(dim=-1) @ vals
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1)), (k, v)


class FeedForward(nn.Module):
    """SwiGLU (down(silu(gate x) * up x)) or GELU MLP (down(gelu(up x)))."""

    def __init__(self, model: ModelSpec):
        super().__init__()
        self.kind = model.ffn
        if model.ffn == "swiglu":
            self.gate_proj = Linear(model.d_model, model.ffn_hidden, bias=False)
        self.up_proj = Linear(model.d_model, model.ffn_hidden, bias=False)
        self.down_proj = Linear(model.ffn_hidden, model.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Position-wise MLP."""
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm block; ``forward`` also returns h = Norm_ffn(x), what memory units read."""

    def __init__(self, model: ModelSpec):
        super().__init__()
        self.attn_norm = make_norm(model)
        self.attn = Attention(model)
        self.ffn_norm = make_norm(model)
        self.ffn = FeedForward(model)

    def forward(self, x: torch.Tensor, past, start: int):
        """-> (x after attention and FFN, h, present KV)."""
        attn_out, present = self.attn(self.attn_norm(x), past, start)
        x = x + attn_out
        h = self.ffn_norm(x)
        return x + self.ffn(h), h, present


class MemoryLM(nn.Module):
    """Embedding -> blocks with memory units added after their write block -> final norm -> LM head."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        model = spec.model
        self.embed = nn.Embedding(model.vocab_size, model.d_model)
        self.blocks = nn.ModuleList(Block(model) for _ in range(model.n_layers))
        self.memories = nn.ModuleList(MemoryLayer(spec.memory, model.d_model) for _ in spec.memory.units)
        self.norm = make_norm(model)
        if not model.tie_embeddings:
            self.lm_head = Linear(model.d_model, model.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, state: DecodeState | None = None,
                select: Mapping[int, torch.Tensor] | None = None,
                memory_inputs: dict[int, torch.Tensor] | None = None,
                compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, DecodeState]:
        """tokens (B, T) int64 -> logits (B, T, vocab) and the state after these tokens.

        For verification: ``select`` maps a unit index to grid addresses (B, T, H*m) it must use
        (see MemoryLayer.forward); ``memory_inputs`` is filled with each unit's query input;
        ``compute_dtype`` (default: the weights' dtype) is the dtype of every activation, logits
        and returned state included; a state passed in must be in that dtype too.
        """
        units = self.spec.memory.units
        start = 0 if state is None else state.length
        if start + tokens.shape[1] > self.spec.model.max_seq_len:
            raise ValueError(f"sequence length {start + tokens.shape[1]} exceeds max_seq_len {self.spec.model.max_seq_len}")
        x = self.embed(tokens).to(compute_dtype or self.embed.weight.dtype)  # gather rows, then cast them
        read_inputs: dict[int, torch.Tensor] = {}
        kv, conv = [], [None] * len(units)
        for i, block in enumerate(self.blocks):
            x, h, present = block(x, None if state is None else state.kv[i], start)
            kv.append(present)
            if any(u.read == i for u in units):
                read_inputs[i] = h
            for j, unit in enumerate(units):
                if unit.write == i:
                    record: list[torch.Tensor] = []
                    out, conv[j] = self.memories[j](read_inputs[unit.read], None if state is None else state.conv[j],
                                                    None if select is None else select.get(j), record)
                    if memory_inputs is not None:
                        memory_inputs[j] = record[0]
                    x = x + out
        x = self.norm(x)
        logits = x @ self.embed.weight.to(x.dtype).T if self.spec.model.tie_embeddings else self.lm_head(x)
        return logits, DecodeState(start + tokens.shape[1], tuple(kv), tuple(conv))
