"""The "cpu" backend: the graph backend's prepared program with fast implementations of the ops that dominate a
decode step on a CPU.

What it changes, op by op (everything else runs its torch implementation, as in ``graph``):

- ``attention``: RoPE angles from a table computed once per head size (not per call), PyTorch's fused
  scaled-dot-product attention with grouped query heads, and a KV cache that grows in place: the present
  keys/values a call returns are views of a preallocated buffer, and the next call that continues from
  exactly that state appends into it instead of copying the whole cache (``KVCache``). A state continued
  twice (branching) is copied on the second continuation, so no returned state is ever changed.
- ``linear``: float32 and bfloat16 with 1..8 rows through a C++ kernel that reads each weight once for all rows
  (``cpu_kernels``); 9..128 rows as (w @ x.T).T in chunks of weight rows, more by ``F.linear``; bfloat16/float16
  activations above ``MAX_ROWS`` rows in float32 (CPUs without bfloat16 arithmetic compute a bfloat16 GEMM slowly),
  rounded once.
- ``rms_norm``: ``F.rms_norm``.
- ``coarse_topm``: each head's top k in C++ (a bound from disjoint sets' maxima, then an exact ranking, ties to the
  lower index); with up to 8 tokens the scores too, all tokens' from one pass over the keys.
- ``grid_topm``: per token and head in one C++ call: the winners' rank scores, the grid summed over cores, its top m,
  each core's score at the winners only.
- ``lookup_pool``: up to 8 tokens in C++ (rows prefetched, summed in float32); more by one ``embedding_bag``
  (gather, per-core scale and block sum fused, no temporaries).

The C++ kernels are compiled once per machine (``cpu_kernels``); without them (no compiler, no AVX2/FMA) every op
above falls back to PyTorch. Selections rank the same float32 scores as ``graph`` does up to the rounding of the
fused sums, so the two agree on every selection but near-ties; ``umc verify --backend cpu`` checks it tie-aware
against the eager model.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from umc.ir.core import Graph
from umc.runtime.backends import register_backend
from umc.runtime.backends.cpu_kernels import (MAX_ROWS, coarse_topm_small, gather_pool, grid_topm,
                                               kernel, linear_small, top_k_rows)
from umc.runtime.backends.graph import GraphBackend
from umc.runtime.torch_ops import TORCH_IMPLS

MIN_CAPACITY = 64  # positions a fresh KV buffer holds at least
# weights the C++ product takes (float16 never): it beats PyTorch's at 1 to MAX_ROWS rows. Measured on a 50304 x 768
# weight, GB/s read, PyTorch against the kernel: float32 1 row 7.0-7.6/10.7-13.6, 2 rows 3.2/11.6, 8 rows 2.1/7.9;
# bfloat16 1 row 8.5-10.5/10.3-12.5, 2 rows 6.2/11.2, 8 rows 1.9/6.7
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# the most rows computed as (w @ x.T).T, TRANSPOSED_CHUNK weight rows at a time: PyTorch's CPU GEMM (MKL on AMD) is
# faster so at 9 to 128 rows. GFLOP/s, F.linear against the transposed product: 32 rows x 768 -> 3072 31/67,
# 3072 -> 768 19/47, 768 -> 50304 20/36; 128 rows 58/72, 90/88, 36/48; 512 rows 65/60, 100/90, 66/54. In chunks of
# 1024 weight rows against the whole product, 768 -> 50304: 16 rows 43/27, 64 rows 79/57, 128 rows 74/63
TRANSPOSED_MAX_ROWS = 128
TRANSPOSED_CHUNK = 1024
NO_RAGGED = torch.empty(0, dtype=torch.long)  # decode_attention's "every sequence's past starts at position 0"


class KVCache:
    """Appends new keys or values to a past, in place when the past is the latest state of a buffer it made.

    A buffer is (B, heads, capacity, head_dim); the tensors handed out are its prefix views. The buffer's
    entry remembers how many positions have been handed out; a past equal to that prefix is extended in
    place, anything else (a user's tensor, an older state continued again) is copied into a new buffer first.
    """

    def __init__(self):
        self.owned: dict[int, tuple[weakref.ref, int]] = {}  # id of a buffer -> (the buffer, positions handed out)

    def _extendable(self, past: torch.Tensor | None, needed: int) -> torch.Tensor | None:
        base = None if past is None else past._base
        entry = None if base is None else self.owned.get(id(base))
        if entry is None or entry[0]() is not base or entry[1] != past.shape[2] or base.shape[2] < needed:
            return None
        if past.data_ptr() != base.data_ptr() or past.stride() != base.stride() or past.shape[:2] != base.shape[:2]:
            return None
        return base

    def reserve(self, past: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """A buffer (B, kv, capacity, hd) holding past (B, kv, S, hd) in its first S positions with room for new's T
        positions after them: past's own buffer when it may be extended in place, else a fresh one with past copied."""
        start = 0 if past is None else past.shape[2]
        end = start + new.shape[2]
        buffer = self._extendable(past, end)
        if buffer is None:
            capacity = max(MIN_CAPACITY, 1 << (end - 1).bit_length())
            buffer = new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3])
            if start:
                buffer[:, :, :start].copy_(past)
            self.owned = {k: e for k, e in self.owned.items() if e[0]() is not None}
        return buffer

    def hand_out(self, buffer: torch.Tensor, end: int) -> torch.Tensor:
        """The view of buffer's first ``end`` positions, remembered as its latest state (the one extended in place)."""
        self.owned[id(buffer)] = (weakref.ref(buffer), end)
        return buffer[:, :, :end]

    def append(self, past: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """past (B, kv, S, hd) or None, new (B, kv, T, hd) -> a view (B, kv, S+T, hd) of a buffer holding both."""
        start = 0 if past is None else past.shape[2]
        buffer = self.reserve(past, new)
        buffer[:, :, start:start + new.shape[2]].copy_(new)
        return self.hand_out(buffer, start + new.shape[2])


class RopeTable:
    """cos/sin of the rotate-half RoPE angles for positions 0..n-1, per (head size, theta, dtype, device), grown by
    doubling: the angles of a position never change, so they are computed once, in float32, as the graph's
    implementation computes them."""

    def __init__(self):
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, head_dim: int, theta: float, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of shape (>= length, head_dim) in ``like``'s dtype and device."""
        key = (head_dim, theta, like.dtype, like.device)
        found = self.tables.get(key)
        if found is None or found[0].shape[0] < length:
            size = max(MIN_CAPACITY, 1 << max(0, length - 1).bit_length())
            half = head_dim // 2
            inv = torch.pow(theta, -torch.arange(0, half, dtype=torch.float32, device=like.device) / half)
            phase = torch.outer(torch.arange(size, dtype=torch.float32, device=like.device), inv)
            found = (torch.cat([phase.cos(), phase.cos()], -1).to(like.dtype),
                     torch.cat([phase.sin(), phase.sin()], -1).to(like.dtype))
            self.tables[key] = found
        return found


def _token_count(x: torch.Tensor, trailing: int) -> int:
    """How many tokens x holds: the product of its dims before the last ``trailing``."""
    return x.numel() // max(1, math.prod(x.shape[x.dim() - trailing:]))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class FastOps:
    """The per-call implementations this backend swaps in (one instance per backend: it owns the KV buffers)."""

    def __init__(self):
        self.cache = KVCache()
        self.rope = RopeTable()

    def attention(self, attrs, q, k, v, past_k=None, past_v=None, past_len=None):
        """Causal GQA with RoPE and an in-place growing KV cache (see the module docstring); with ``past_len``, a
        ragged batch: per-sequence positions and the padding before each sequence's past masked."""
        if q.shape[1] == 1 and q.dtype in KERNEL_DTYPES and q.device.type == "cpu" and kernel()[0] is not None:
            return self.decode_step(attrs, q, k, v, past_k, past_v, past_len)
        heads, kv_heads, hd = attrs["n_heads"], attrs["n_kv_heads"], attrs["head_dim"]
        batch, steps = q.shape[:2]
        start = 0 if past_k is None else past_k.shape[2]
        if past_len is None:
            cos, sin = self.rope.get(hd, attrs["rope_theta"], start + steps, q)
            cos, sin = cos[start:start + steps], sin[start:start + steps]
        else:
            positions = past_len.unsqueeze(1) + torch.arange(steps, device=q.device)  # (B, T)
            cos, sin = self.rope.get(hd, attrs["rope_theta"], int(positions.max()) + 1, q)
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, hd)
        q = _rotate(q.view(batch, steps, heads, hd).transpose(1, 2), cos, sin)
        k = _rotate(k.view(batch, steps, kv_heads, hd).transpose(1, 2), cos, sin)
        v = v.view(batch, steps, kv_heads, hd).transpose(1, 2)
        keys = self.cache.append(past_k, k)
        values = self.cache.append(past_v, v)
        mask, causal = None, False
        if past_len is not None:
            key_at = torch.arange(start + steps, device=q.device)
            query_at = start + torch.arange(steps, device=q.device)
            mask = (key_at <= query_at.unsqueeze(1)) & (key_at >= (start - past_len).view(batch, 1, 1))
            mask = mask.unsqueeze(1)  # (B, 1, T, S)
        elif steps > 1 and start == 0:
            causal = True
        elif steps > 1:
            mask = torch.ones(steps, start + steps, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                             enable_gqa=heads != kv_heads)
        return out.transpose(1, 2).reshape(batch, steps, heads * hd), keys, values

    def decode_step(self, attrs, q, k, v, past_k=None, past_v=None, past_len=None):
        """One step of every sequence in one C++ call (``decode_attention``): RoPE in float32, the new key and value
        written into the cache buffer in place, softmax and the weighted sum of values accumulated in float32."""
        heads, kv_heads, hd = attrs["n_heads"], attrs["n_kv_heads"], attrs["head_dim"]
        batch = q.shape[0]
        start = 0 if past_k is None else past_k.shape[2]
        wide = q.new_empty(0, dtype=torch.float32)
        if past_len is None:
            cos, sin = (t[start].expand(batch, hd) for t in self.rope.get(hd, attrs["rope_theta"], start + 1, wide))
            first = NO_RAGGED
        else:
            cos, sin = (t[past_len] for t in self.rope.get(hd, attrs["rope_theta"], start + 1, wide))
            first = start - past_len
        template = k.view(batch, 1, kv_heads, hd).transpose(1, 2)
        keys, values = self.cache.reserve(past_k, template), self.cache.reserve(past_v, template)
        out = kernel()[0].decode_attention(q.reshape(batch, -1), k.reshape(batch, -1), v.reshape(batch, -1), keys,
                                           values, start, cos, sin, first)
        return out.view(batch, 1, heads * hd), self.cache.hand_out(keys, start + 1), self.cache.hand_out(values, start + 1)

    @staticmethod
    def linear(attrs, x, w):
        """x @ w.T: up to ``MAX_ROWS`` rows of float32 or bfloat16 through the C++ kernel (``cpu_kernels``) where it
        could be built; low-precision inputs with more rows in float32, rounded once; up to ``TRANSPOSED_MAX_ROWS``
        rows as (w @ x.T).T in chunks of weight rows, which PyTorch's CPU GEMM computes faster at these shapes."""
        rows = _token_count(x, 1)
        if x.dtype in KERNEL_DTYPES and rows <= MAX_ROWS and kernel()[0] is not None:
            return (linear_small(x, w),)
        low = x.dtype in (torch.bfloat16, torch.float16) and rows > MAX_ROWS
        wide_x, wide_w = (x.float(), w.float()) if low else (x, w)
        if MAX_ROWS < rows <= TRANSPOSED_MAX_ROWS:
            flat_t = wide_x.reshape(rows, -1).t()
            out = flat_t.new_empty(rows, w.shape[0])
            for start in range(0, w.shape[0], TRANSPOSED_CHUNK):
                out[:, start:start + TRANSPOSED_CHUNK] = torch.mm(wide_w[start:start + TRANSPOSED_CHUNK], flat_t).t()
            out = out.view(*x.shape[:-1], w.shape[0])
        else:
            out = F.linear(wide_x, wide_w)
        return (out.to(x.dtype) if low else out,)

    @staticmethod
    def rms_norm(attrs, x, w):
        """RMS norm with its weight, in x's dtype."""
        return (F.rms_norm(x, x.shape[-1:], w, attrs["eps"]),)

    @staticmethod
    def coarse_topm(attrs, q, keys):
        """Each head's top k keys by score, selected in C++ (only scores at or above a bound of the k-th best ranked
        exactly, ties to the lower index);
        for up to ``MAX_ROWS`` tokens the scores too (all tokens' from one pass over the keys), else by one GEMM."""
        if kernel()[0] is None:
            return TORCH_IMPLS["coarse_topm"](attrs, q, keys)
        if _token_count(q, 2) <= MAX_ROWS:
            return coarse_topm_small(q, keys, attrs["k"])
        values, indices = top_k_rows(torch.einsum("...hd,hkd->...hk", q.float(), keys.float()), attrs["k"])
        return values.to(q.dtype), indices

    @staticmethod
    def lookup_pool(attrs, table, address, scores, perm=None):
        """Every pick's value row scaled by its core's score and summed into its block: for up to ``MAX_ROWS`` tokens
        in one C++ call (rows read once, prefetched, summed in float32), else by one ``embedding_bag`` (fused gather,
        scale and sum, no temporaries): the table viewed as (N * cores, vdim / cores) rows, one bag per (token, core,
        block)."""
        virtual = address if perm is None else perm[address]
        if _token_count(address, 2) <= MAX_ROWS and kernel()[0] is not None:
            return (gather_pool(table, virtual, scores, attrs["E"]),)
        batch, steps, heads, m = address.shape
        cores, vdim, blocks = scores.shape[-1], table.shape[1], attrs["E"]
        tokens, picks = batch * steps, heads * m
        virtual = virtual.reshape(tokens, picks)
        rows, block = virtual % attrs["N"], torch.div(virtual, attrs["N"], rounding_mode="floor")
        core = torch.arange(cores, device=table.device)
        slice_rows = (rows.unsqueeze(-1) * cores + core).reshape(-1)  # (tokens * picks * cores,)
        token = torch.arange(tokens, device=table.device).view(-1, 1, 1)
        bag = ((token * cores + core) * blocks + block.unsqueeze(-1)).reshape(-1)
        order = torch.argsort(bag, stable=True)
        counts = torch.bincount(bag, minlength=tokens * cores * blocks)
        offsets = torch.cumsum(counts, 0) - counts
        weights = scores.reshape(-1)[order]
        if weights.dtype != table.dtype:
            weights = weights.to(table.dtype)
        pooled = F.embedding_bag(slice_rows[order], table.view(-1, vdim // cores), offsets, mode="sum",
                                 per_sample_weights=weights)
        pooled = pooled.view(tokens, cores, blocks, vdim // cores).transpose(1, 2)
        return (pooled.reshape(batch, steps, blocks * vdim),)

    @staticmethod
    def grid_topm(attrs, q_row, q_col, keys_row, keys_col, i_row, i_col, cores):
        """The top m of each token's and head's Tucker grid in one C++ call (winners' rank scores, the grid summed over
        cores, its top m, each core's score at the winners), else as the graph computes it."""
        if kernel()[0] is None:
            return TORCH_IMPLS["grid_topm"](attrs, q_row, q_col, keys_row, keys_col, i_row, i_col, cores)
        return grid_topm(q_row, q_col, keys_row, keys_col, i_row, i_col, cores, attrs["n"])


@register_backend
class CpuBackend(GraphBackend):
    """The graph backend with fast attention (in-place KV cache), linears, norms and value pooling."""

    name = "cpu"

    def __init__(self, graphs: Mapping[str, Graph], weights: Mapping[str, torch.Tensor], threads: bool = True,
                 artifacts=None, world=None):
        # skip-layer branches run in sequence whatever ``threads`` says: every op here already splits its work over
        # all intra-op (OpenMP) threads, and a branch on a worker thread starts a second OpenMP team that
        # oversubscribes the cores (227M fp32 decode at batch 1 on 2 cores: 249 ms with a branch thread, 126 without)
        self.fast = FastOps()
        super().__init__(graphs, weights, False, artifacts, world)

    def overrides(self, graph: Graph) -> dict[int, Callable]:
        """Every per-call node whose op has a fast implementation here (and the graph backend's sharded lookups)."""
        table = {"attention": self.fast.attention, "linear": FastOps.linear, "rms_norm": FastOps.rms_norm,
                 "coarse_topm": FastOps.coarse_topm, "lookup_pool": FastOps.lookup_pool, "grid_topm": FastOps.grid_topm}
        return {**super().overrides(graph), **{i: table[n.op] for i, n in enumerate(graph.nodes) if n.op in table}}
