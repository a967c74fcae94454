"""Shape-level accounting of a spec: parameters, memory slots, FLOPs, value bytes per token, and memory needed.

Pure arithmetic on the spec (no torch), so it works for models far too big to build.
FLOPs count 2 per multiply-add of every matmul-like step; attention over the context
is reported separately because it grows with the context length. ``memory_needs`` gives
the bytes a run takes; ``spec_extents`` what the spec validator bounds (umc.spec's size rule).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from umc.dtypes import BY_SPEC

if TYPE_CHECKING:  # umc.spec imports this module for its size rule: no import back at run time
    from umc.spec import MemorySpec, ModelSpec, Spec

INDEX_BYTES = 8  # the shuffle permutation is int64 whatever the spec's dtype

# names of the largest tensors of one forward step (step_tensors), with their shapes
LOGITS = "logits (tokens x vocab_size)"
ATTENTION = "attention scores (n_heads x tokens x context)"
RANK_SCORES = "memory rank scores (tokens x heads x keys per side x tucker_rank)"
GRIDS = "memory grids (tokens x heads x cores x topm x topm)"
VALUE_ROWS = "gathered value rows (tokens x heads x topm x vdim)"


@dataclass(frozen=True)
class UnitCost:
    """One memory unit's size and per-token work."""

    unit: str
    dense_params: int
    value_params: int
    physical_slots: int
    virtual_slots: int
    flops_per_token: int
    value_bytes_per_token: int


@dataclass(frozen=True)
class SpecCost:
    """A whole model's size and per-token work."""

    name: str
    dtype: str
    params_total: int
    params_dense: int
    params_values: int
    flops_per_token: int
    attention_flops_per_context_token: int
    value_bytes_per_token: int
    units: tuple[UnitCost, ...]

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class MemoryNeeds:
    """Bytes one run of a spec needs, for ``batch`` sequences of ``seq_len`` tokens (see ``memory_needs``)."""

    dtype: str
    batch: int
    seq_len: int
    dense_weight_bytes: int  # every parameter but the value tables, in the spec's dtype
    value_table_bytes: int  # the memory units' value tables, in the spec's dtype
    shuffle_bytes: int  # the memory units' shuffle permutations (int64)
    kv_cache_bytes: int  # keys and values of every block at seq_len
    prefill_bytes: int  # working set of one forward over seq_len tokens
    decode_bytes: int  # working set of one decode step at context seq_len

    @property
    def weight_bytes(self) -> int:
        """Everything the model holds: dense weights, value tables, shuffle permutations."""
        return self.dense_weight_bytes + self.value_table_bytes + self.shuffle_bytes

    def to_dict(self) -> dict:
        """Plain data for JSON, with the weight total."""
        return {**asdict(self), "weight_bytes": self.weight_bytes}


@dataclass(frozen=True)
class Extent:
    """Something a spec makes the model hold or compute: ``count`` parameters or elements, ``nbytes`` bytes."""

    what: str
    count: int
    unit: str
    nbytes: int


def human(count: float) -> str:
    """A count for people: 1234567 -> '1.23M' (K, M, B, T), small counts as they are."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count:g}"


def _norm_params(model: ModelSpec) -> int:
    return model.d_model * (1 if model.norm == "rmsnorm" else 2)


def block_params(model: ModelSpec) -> int:
    """Parameters of one transformer block (two norms, attention, FFN)."""
    d, hd = model.d_model, model.head_dim
    attn = d * model.n_heads * hd * 2 + d * model.n_kv_heads * hd * 2
    ffn = d * model.ffn_hidden * (3 if model.ffn == "swiglu" else 2)
    return 2 * _norm_params(model) + attn + ffn


def memory_dense_params(mem: MemorySpec, d_model: int) -> int:
    """Parameters of one memory layer other than its value table."""
    kd, n = mem.side_dim, mem.keys_per_side
    count = d_model * mem.query_heads * 2 * kd
    count += {"none": 0, "layernorm": kd, "layernorm_bias": 2 * kd}[mem.query_norm]
    count += kd if mem.key_norm == "layernorm" else 0
    count += mem.heads * 2 * n * kd * mem.tucker_rank
    if mem.kind == "ultramem":
        count += mem.cores * mem.heads * mem.tucker_rank ** 2 + 2 * mem.heads * mem.tucker_rank
    if mem.query_conv:
        count += d_model * mem.query_conv + d_model
    if mem.output_projection:
        count += mem.value_expansion * mem.vdim * d_model
    return count


def shuffle_elements(mem: MemorySpec) -> int:
    """Entries of one memory layer's shuffle permutation (E * N), 0 when the layer has none."""
    return mem.virtual_values if mem.has_shuffle else 0


def memory_flops_per_token(mem: MemorySpec, d_model: int) -> int:
    """FLOPs of one memory lookup for one token (DESIGN.md §2.1 steps 1-10)."""
    kd, n, m, r, h, heads = mem.side_dim, mem.keys_per_side, mem.topm, mem.tucker_rank, mem.cores, mem.heads
    flops = 2 * d_model * (mem.query_conv or 0)
    flops += 2 * d_model * mem.query_heads * 2 * kd
    flops += 2 * 2 * heads * n * kd * r  # rank scores, both sides
    if mem.kind == "ultramem":
        flops += 2 * 2 * heads * n * r  # coarse rank-1 scores
        flops += heads * h * (2 * m * r * r + 2 * m * m * r)  # per-core m x m grids
    else:
        flops += heads * m * m  # additive candidates
    flops += 2 * heads * m * mem.vdim  # weighted pooling
    if mem.output_projection:
        flops += 2 * mem.value_expansion * mem.vdim * d_model
    return flops


def spec_cost(spec: Spec) -> SpecCost:
    """Parameters, slots, FLOPs and value-row bytes per token for a spec."""
    model, mem = spec.model, spec.memory
    d = model.d_model
    embed = model.vocab_size * d
    dense_model = embed * (1 if model.tie_embeddings else 2) + model.n_layers * block_params(model) + _norm_params(model)
    row_bytes = mem.heads * mem.topm * mem.vdim * BY_SPEC[spec.dtype].itemsize
    units = tuple(
        UnitCost(str(u), memory_dense_params(mem, d), mem.physical_values * mem.vdim, mem.physical_values,
                 mem.virtual_values, memory_flops_per_token(mem, d), row_bytes)
        for u in mem.units
    )
    dense_flops = model.n_layers * 2 * (block_params(model) - 2 * _norm_params(model)) + 2 * embed
    params_dense = dense_model + sum(u.dense_params for u in units)
    params_values = sum(u.value_params for u in units)
    return SpecCost(
        name=spec.name, dtype=spec.dtype,
        params_total=params_dense + params_values, params_dense=params_dense, params_values=params_values,
        flops_per_token=dense_flops + sum(u.flops_per_token for u in units),
        attention_flops_per_context_token=model.n_layers * 4 * model.n_heads * model.head_dim,
        value_bytes_per_token=sum(u.value_bytes_per_token for u in units),
        units=units,
    )


# ---------------------------------------------------------------- memory a run needs


def lookup_tensors(mem: MemorySpec, tokens: int) -> dict[str, int]:
    """Elements of the largest tensors one memory lookup over ``tokens`` tokens creates: one side's
    rank scores (DESIGN.md §2.1 step 3), the per-core m x m grids (step 6), the gathered value rows (step 9)."""
    heads, m = mem.heads, mem.topm
    return {
        RANK_SCORES: tokens * heads * mem.keys_per_side * mem.tucker_rank,
        GRIDS: tokens * heads * mem.cores * m * m,
        VALUE_ROWS: tokens * heads * m * mem.vdim,
    }


def step_tensors(spec: Spec, batch: int, tokens: int, context: int) -> dict[str, int]:
    """Elements of the largest tensors of one forward of ``tokens`` new tokens over ``context`` positions
    for ``batch`` sequences: the logits, one block's attention scores, one memory lookup's tensors."""
    return {
        LOGITS: batch * tokens * spec.model.vocab_size,
        ATTENTION: batch * spec.model.n_heads * tokens * context,
        **lookup_tensors(spec.memory, batch * tokens),
    }


def kv_cache_elements(model: ModelSpec, batch: int, context: int) -> int:
    """Elements of the KV cache: a key and a value (batch, n_kv_heads, context, head_dim) per block."""
    return 2 * model.n_layers * batch * model.n_kv_heads * context * model.head_dim


def working_set(spec: Spec, batch: int, tokens: int, context: int) -> int:
    """Estimated bytes of the activations alive at the peak of one forward of ``tokens`` new tokens
    over ``context`` positions for ``batch`` sequences (weights and KV cache not included).

    Blocks and memory layers run one after another, so the peak is the hidden states kept
    through every step, per token 3 x d_model (residual stream, its normed copy, a block's
    output) + 2 x ffn_hidden (the FFN's two hidden tensors), plus the largest of
    - the logits: tokens x vocab_size;
    - one block's attention: scores and their softmax, 2 x n_heads x tokens x context, and its keys
      and values repeated to every query head, 2 x n_heads x context x head_dim (per sequence; at
      decode this copy of the context, not the scores, is the larger);
    - one memory lookup: both sides' rank scores (2 x heads x n x tucker_rank), the per-core
      grids (heads x cores x topm^2) and the gathered value rows (heads x topm x vdim) per token,
      plus one normalized copy of the keys (heads x 2 x n x side_dim x tucker_rank: the eager
      reference normalizes them on every call, a build once at load time and keeps them);
    all in the spec's dtype. Top-m indices (int64, heads x topm per token) are left out:
    this sizes a run, it is not an allocator trace.
    """
    model = spec.model
    tensors = step_tensors(spec, batch, tokens, context)
    hidden = batch * tokens * (3 * model.d_model + 2 * model.ffn_hidden)
    attention = 2 * tensors[ATTENTION] + 2 * batch * model.n_heads * context * model.head_dim
    mem = spec.memory
    normed_keys = mem.heads * 2 * mem.keys_per_side * mem.side_dim * mem.tucker_rank
    lookup = 2 * tensors[RANK_SCORES] + tensors[GRIDS] + tensors[VALUE_ROWS] + normed_keys
    phases = (tensors[LOGITS], attention, lookup)
    return (hidden + max(phases)) * BY_SPEC[spec.dtype].itemsize


def memory_needs(spec: Spec, batch: int = 1, seq_len: int | None = None) -> MemoryNeeds:
    """Bytes a run of ``batch`` sequences of ``seq_len`` tokens (default max_seq_len) needs: the weights as
    the eager model holds them (value tables and the rest separately), the KV cache at seq_len, and the
    working set (``working_set``) of a prefill of seq_len tokens and of one decode step at that context."""
    seq_len = spec.model.max_seq_len if seq_len is None else seq_len
    if batch < 1 or not 1 <= seq_len <= spec.model.max_seq_len:
        raise ValueError(f"batch {batch}, seq_len {seq_len}: need batch >= 1 and 1 <= seq_len <= max_seq_len {spec.model.max_seq_len}")
    cost = spec_cost(spec)
    itemsize = BY_SPEC[spec.dtype].itemsize
    return MemoryNeeds(
        dtype=spec.dtype, batch=batch, seq_len=seq_len,
        dense_weight_bytes=cost.params_dense * itemsize,
        value_table_bytes=cost.params_values * itemsize,
        shuffle_bytes=len(spec.memory.units) * shuffle_elements(spec.memory) * INDEX_BYTES,
        kv_cache_bytes=kv_cache_elements(spec.model, batch, seq_len) * itemsize,
        prefill_bytes=working_set(spec, batch, seq_len, seq_len),
        decode_bytes=working_set(spec, batch, 1, seq_len),
    )


# ---------------------------------------------------------------- what the size rule bounds


def spec_extents(spec: Spec) -> tuple[Extent, ...]:
    """The weights, the KV cache and every large tensor of a batch-1 forward at max_seq_len."""
    itemsize = BY_SPEC[spec.dtype].itemsize
    params = spec_cost(spec).params_total
    weights = params * itemsize + len(spec.memory.units) * shuffle_elements(spec.memory) * INDEX_BYTES
    length = spec.model.max_seq_len
    kv = kv_cache_elements(spec.model, 1, length)
    tensors = step_tensors(spec, 1, length, length)
    return (
        Extent("the weights", params, "parameters", weights),
        Extent("the KV cache at max_seq_len", kv, "elements", kv * itemsize),
        *(Extent(f"the {what} of a max_seq_len forward", count, "elements", count * itemsize)
          for what, count in tensors.items()),
    )


def layer_extents(mem: MemorySpec, d_model: int, dtype: str) -> tuple[Extent, ...]:
    """One memory layer alone (e.g. the authors' config): its weights and the tensors of one token's lookup."""
    itemsize = BY_SPEC[dtype].itemsize
    params = memory_dense_params(mem, d_model) + mem.physical_values * mem.vdim
    return (
        Extent("the layer's weights", params, "parameters", params * itemsize + shuffle_elements(mem) * INDEX_BYTES),
        *(Extent(f"the {what} of one token", count, "elements", count * itemsize)
          for what, count in lookup_tensors(mem, 1).items()),
    )
