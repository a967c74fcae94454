"""Shape-level accounting of a spec: parameters, memory slots, FLOPs and value bytes per token.

Pure arithmetic on the spec (no torch), so it works for models far too big to build.
FLOPs count 2 per multiply-add of every matmul-like step; attention over the context
is reported separately because it grows with the context length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from umc.spec import DTYPE_BYTES, MemorySpec, ModelSpec, Spec


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
    row_bytes = mem.heads * mem.topm * mem.vdim * DTYPE_BYTES[spec.dtype]
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
