"""Lowering: a spec becomes IR graphs (``prefill`` and ``decode``), memory layers as their primitive steps.

Every memory layer is spelled out step by step as DESIGN.md §2.1 lists them (query
conv, projection, query/key norms, rank scores, coarse scores, top-m, Tucker grid,
selection, shuffle, IVE split, gather, MCS scaling, block scatter, E projector
matmuls), so the passes have something to fuse. Parameters are named as in the
eager model's state dict (and, inside a memory layer, as in the authors' checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

from umc.ir.builder import GraphBuilder
from umc.ir.core import SPEC_DTYPES, Dim, Graph, TensorType, Value
from umc.ir.verify import verify
from umc.spec import MemorySpec, ModelSpec, Spec


@dataclass(frozen=True)
class MemoryOutputs:
    """What a lowered memory layer yields: its output, new conv state (or None), and grid addresses."""

    out: Value
    conv_state: Value | None
    address: Value


def lower_memory(b: GraphBuilder, mem: MemorySpec, d_model: int, dtype: str, x: Value, prefix: str,
                 conv_state: Value | None, scope: str) -> MemoryOutputs:
    """Emit one memory layer reading x (B,T,D); ``prefix`` prefixes its parameter names."""
    kd, n, m, heads = mem.side_dim, mem.keys_per_side, mem.topm, mem.heads
    param = lambda name, *shape, kind=dtype: b.param(prefix + name, kind, shape)
    batch, steps = x.type.shape[:2]

    b.scope = f"{scope}.query"
    new_state = None
    if mem.query_conv:
        conv_in = [x, param("query_conv.weight", d_model, mem.query_conv), param("query_conv.bias", d_model)]
        x, new_state = b.emit("query_conv", *conv_in, *([conv_state] if conv_state else []), kernel=mem.query_conv)
    q = b.one("linear", x, param("query_proj.weight", mem.query_heads * 2 * kd, d_model))
    q_row, q_col = b.emit("split_query", q, query_heads=mem.query_heads, heads=heads, side_dim=kd)
    if mem.query_norm != "none":
        norm = [param("query_norm.weight", kd)]
        if mem.query_norm == "layernorm_bias":
            norm.append(param("query_norm.bias", kd))
        q_row = b.one("layer_norm", q_row, *norm, eps=mem.norm_eps)
        q_col = b.one("layer_norm", q_col, *norm, eps=mem.norm_eps)

    b.scope = f"{scope}.score"
    rank_shape = (mem.tucker_rank,) if mem.kind == "ultramem" else ()
    keys = param("keys", heads, 2, n, kd, *rank_shape)
    if mem.key_norm != "none":
        keys = b.one("norm_keys", keys, param("keys_norm.weight", kd), eps=mem.norm_eps)
    k_row, k_col = b.one("key_side", keys, side=0), b.one("key_side", keys, side=1)
    if mem.kind == "ultramem":
        s_row, s_col = b.one("rank_scores", q_row, k_row), b.one("rank_scores", q_col, k_col)
        coarse_row = b.one("coarse_scores", s_row, param("tucker_core_u", 1, heads, 1, mem.tucker_rank))
        coarse_col = b.one("coarse_scores", s_col, param("tucker_core_v", 1, heads, 1, mem.tucker_rank))
        _, i_row = b.emit("topm", coarse_row, k=m)
        _, i_col = b.emit("topm", coarse_col, k=m)
        rows, cols = b.one("gather_rank_rows", s_row, i_row), b.one("gather_rank_rows", s_col, i_col)
        cores = b.one("stack_cores", *(param(f"tucker_core.{c}", heads, mem.tucker_rank, mem.tucker_rank)
                                       for c in range(mem.cores)))
        grid = b.one("tucker_grid", rows, cols, cores)
        address, scores = b.emit("grid_select", grid, i_row, i_col, n=n)
    else:
        v_row, i_row = b.emit("topm", b.one("key_scores", q_row, k_row), k=m)
        v_col, i_col = b.emit("topm", b.one("key_scores", q_col, k_col), k=m)
        address, scores = b.emit("additive_select", v_row, i_row, v_col, i_col, n=n)
    if mem.score_activation == "softmax":
        scores = b.one("softmax", scores, axis=3)
    elif mem.score_activation == "relu":
        scores = b.one("relu", scores)

    b.scope = f"{scope}.pool"
    virtual = b.one("shuffle", address, param("shuffle_index", mem.virtual_values, kind="i64")) if mem.has_shuffle else address
    row, block = b.emit("ive_split", virtual, N=mem.physical_values)
    values = b.one("gather_values", param("values_for_look_up", mem.physical_values, mem.vdim), row)
    pooled = b.one("scatter_blocks", b.one("mcs_scale", values, scores), block, E=mem.value_expansion)
    if mem.output_projection:
        b.scope = f"{scope}.project"
        projector = param("values_proj.weight", d_model, mem.value_expansion * mem.vdim)
        out = None
        for e in range(mem.value_expansion):
            w_e = b.one("slice_cols", projector, start=e * mem.vdim, stop=(e + 1) * mem.vdim)
            y_e = b.one("linear", b.one("select_block", pooled, index=e), w_e)
            out = y_e if out is None else b.one("add", out, y_e)
    else:
        out = b.one("reshape", pooled, shape=(batch, steps, mem.vdim))
    flat_address = b.one("reshape", address, shape=(batch, steps, heads * m))
    return MemoryOutputs(out, new_state, flat_address)


def _norm(b: GraphBuilder, model: ModelSpec, dtype: str, x: Value, name: str) -> Value:
    affine = [b.param(f"{name}.weight", dtype, (model.d_model,))]
    if model.norm == "layernorm":
        affine.append(b.param(f"{name}.bias", dtype, (model.d_model,)))
    return b.one("rms_norm" if model.norm == "rmsnorm" else "layer_norm", x, *affine, eps=model.norm_eps)


def _lower_model(spec: Spec, decode: bool) -> Graph:
    model, mem, dtype = spec.model, spec.memory, SPEC_DTYPES[spec.dtype]
    d, hd, kv = model.d_model, model.head_dim, model.n_kv_heads
    steps: Dim = 1 if decode else "T"
    b = GraphBuilder("decode" if decode else "prefill")
    tokens = b.input("tokens", TensorType("i64", ("B", steps)))
    past = [(b.input(f"past_k.{i}", TensorType(dtype, ("B", kv, "S_past", hd))),
             b.input(f"past_v.{i}", TensorType(dtype, ("B", kv, "S_past", hd)))) if decode else ()
            for i in range(model.n_layers)]
    conv_in = [b.input(f"conv_state.{j}", TensorType(dtype, ("B", mem.query_conv - 1, d)))
               if decode and mem.query_conv else None for j in range(len(mem.units))]
    outputs: dict[str, Value] = {}
    conv_out: dict[str, Value] = {}
    weight = lambda name, *shape: b.param(name, dtype, shape)

    b.scope = "embed"
    x = b.one("embedding", tokens, weight("embed.weight", model.vocab_size, d))
    read_inputs: dict[int, Value] = {}
    for i in range(model.n_layers):
        p = f"blocks.{i}"
        b.scope = f"block{i}.attn"
        h = _norm(b, model, dtype, x, f"{p}.attn_norm")
        q = b.one("linear", h, weight(f"{p}.attn.q_proj.weight", model.n_heads * hd, d))
        k = b.one("linear", h, weight(f"{p}.attn.k_proj.weight", kv * hd, d))
        v = b.one("linear", h, weight(f"{p}.attn.v_proj.weight", kv * hd, d))
        att, outputs[f"present_k.{i}"], outputs[f"present_v.{i}"] = b.emit(
            "attention", q, k, v, *past[i], n_heads=model.n_heads, n_kv_heads=kv, head_dim=hd,
            rope_theta=model.rope_theta)
        x = b.one("add", x, b.one("linear", att, weight(f"{p}.attn.o_proj.weight", d, model.n_heads * hd)))
        b.scope = f"block{i}.ffn"
        h = _norm(b, model, dtype, x, f"{p}.ffn_norm")
        read_inputs[i] = h
        up = b.one("linear", h, weight(f"{p}.ffn.up_proj.weight", model.ffn_hidden, d))
        if model.ffn == "swiglu":
            gate = b.one("linear", h, weight(f"{p}.ffn.gate_proj.weight", model.ffn_hidden, d))
            act = b.one("mul", b.one("silu", gate), up)
        else:
            act = b.one("gelu", up)
        x = b.one("add", x, b.one("linear", act, weight(f"{p}.ffn.down_proj.weight", d, model.ffn_hidden)))
        for j, unit in enumerate(mem.units):
            if unit.write == i:
                lowered = lower_memory(b, mem, d, dtype, read_inputs[unit.read], f"memories.{j}.", conv_in[j], f"mem{j}")
                if lowered.conv_state is not None:
                    conv_out[f"conv_state.{j}"] = lowered.conv_state
                b.scope = f"mem{j}.residual"
                x = b.one("add", x, lowered.out)
    b.scope = "head"
    x = _norm(b, model, dtype, x, "norm")
    head = weight("embed.weight" if model.tie_embeddings else "lm_head.weight", model.vocab_size, d)
    logits = b.one("linear", x, head)
    return b.build({"logits": logits, **outputs, **conv_out},
                   meta={"spec": spec.name, "units": tuple(str(u) for u in mem.units)})


def lower(spec: Spec) -> dict[str, Graph]:
    """The spec's ``prefill`` (tokens (B,T) -> logits, present KV, conv state) and ``decode``
    (tokens (B,1) + past KV + conv state -> logits + new state) graphs, verified."""
    return {"prefill": verify(_lower_model(spec, decode=False)), "decode": verify(_lower_model(spec, decode=True))}


def lower_layer(mem: MemorySpec, d_model: int, dtype: str = "float32") -> Graph:
    """A single memory layer as a graph: x (B,T,D) -> out (B,T,D), address (B,T,H*m). Parameters unprefixed."""
    ir_dtype = SPEC_DTYPES[dtype]
    b = GraphBuilder("layer")
    x = b.input("x", TensorType(ir_dtype, ("B", "T", d_model)))
    lowered = lower_memory(b, mem, d_model, ir_dtype, x, "", None, "mem0")
    return verify(b.build({"out": lowered.out, "address": lowered.address}))
