"""What one decode step must read and compute, from a spec's sizes: the numerators of the hardware limits.

A step at batch B after a past of P tokens must read, at least (DESIGN.md §6), in the spec's dtype:

- every dense weight once: the blocks, the final norm, the LM head (the embedding table when tied: the
  input rows are gathered from the same table, counted once; untied, B input rows plus the LM head);
- per memory layer: its query projection, the keys rank-folded (``heads x 2 x n x kdim``, what the
  coarse scoring reads after ``query_conv_folding``) plus, for Tucker rank scores, the winners' rows of the
  rank-r keys (``heads x 2 x min(B*m, n) x kdim x r``), ``min(B*H*m, N)`` value rows, the shuffle entries
  of the chosen addresses (int64), the output projection, and the small rest (norms, Tucker cores, conv);
- the KV cache: ``2 x layers x kv_heads x head_dim x P x B`` elements.

FLOPs are ``umc check``'s convention (2 per multiply-add of matmul-like work, ``umc.cost``) times B, plus
attention over the P + 1 positions the new token sees. Dividing by the read bandwidth and the GEMM rate
measured in the same run gives the time below which the step cannot go on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from umc.cost import INDEX_BYTES, block_params, memory_dense_params, memory_flops_per_token, spec_cost
from umc.dtypes import BY_SPEC
from umc.spec import MemorySpec, Spec

VALUE_ROWS = "value rows"


@dataclass(frozen=True)
class StepWork:
    """Bytes one step must read (by part) and FLOPs it computes; ``value_row_bytes`` is the value-row part."""

    reads: dict[str, int]
    flops: int

    @property
    def total_bytes(self) -> int:
        """Everything the step must read."""
        return sum(self.reads.values())

    @property
    def value_row_bytes(self) -> int:
        """Bytes of memory-layer value rows the step reads (0 for a model without memory layers)."""
        return sum(size for part, size in self.reads.items() if part.endswith(VALUE_ROWS))

    def bandwidth_limit(self, bytes_per_s: float) -> float:
        """Seconds the step's reads take at the measured read bandwidth."""
        return self.total_bytes / bytes_per_s

    def compute_limit(self, flops_per_s: float) -> float:
        """Seconds the step's FLOPs take at the measured GEMM rate."""
        return self.flops / flops_per_s

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return {"reads_bytes": dict(self.reads), "total_bytes": self.total_bytes, "flops": self.flops,
                "value_row_bytes": self.value_row_bytes}


def layer_reads(mem: MemorySpec, d_model: int, itemsize: int, batch: int) -> dict[str, int]:
    """Bytes one memory layer must read for one token of each of ``batch`` sequences, by part."""
    kd, n, r, m = mem.side_dim, mem.keys_per_side, mem.tucker_rank, mem.topm
    chosen = batch * mem.heads * m
    query = d_model * mem.query_heads * 2 * kd
    all_keys = mem.heads * 2 * n * kd * r
    projection = mem.value_expansion * mem.vdim * d_model if mem.output_projection else 0
    reads = {"query projection": query * itemsize}
    if mem.kind == "ultramem":
        reads["keys (rank-folded)"] = mem.heads * 2 * n * kd * itemsize
        reads["winners' rank-r key rows"] = mem.heads * 2 * min(batch * m, n) * kd * r * itemsize
    else:
        reads["keys"] = all_keys * itemsize
    reads[VALUE_ROWS] = min(chosen, mem.physical_values) * mem.vdim * itemsize
    if mem.has_shuffle:
        reads["shuffle entries"] = min(chosen, mem.virtual_values) * INDEX_BYTES
    reads["output projection"] = projection * itemsize
    reads["norms, Tucker cores, conv"] = (memory_dense_params(mem, d_model) - query - all_keys - projection) * itemsize
    return reads


def layer_step(mem: MemorySpec, d_model: int, dtype: str, batch: int) -> StepWork:
    """One memory layer alone on ``batch`` tokens (one per sequence)."""
    reads = layer_reads(mem, d_model, BY_SPEC[dtype].itemsize, batch)
    return StepWork(reads, batch * memory_flops_per_token(mem, d_model))


def model_step(spec: Spec, batch: int, past: int) -> StepWork:
    """One decode step of the whole model at ``batch`` sequences after ``past`` tokens each."""
    model, itemsize = spec.model, BY_SPEC[spec.dtype].itemsize
    table = model.vocab_size * model.d_model
    embedding = table if model.tie_embeddings else min(batch, model.vocab_size) * model.d_model + table
    reads = {
        "blocks": model.n_layers * block_params(model) * itemsize,
        "embedding and LM head": embedding * itemsize,
        "final norm": model.d_model * (1 if model.norm == "rmsnorm" else 2) * itemsize,
    }
    units = len(spec.memory.units)
    for part, size in layer_reads(spec.memory, model.d_model, itemsize, batch).items():
        reads[f"memory: {part}"] = units * size
    reads["KV cache"] = 2 * model.n_layers * model.n_kv_heads * model.head_dim * past * batch * itemsize
    cost = spec_cost(spec)
    flops = batch * (cost.flops_per_token + cost.attention_flops_per_context_token * (past + 1))
    return StepWork(reads, flops)
