"""Lowering: a spec becomes IR graphs (``prefill`` and ``decode``), memory layers as their primitive steps.

Every memory layer is spelled out step by step as DESIGN.md §2.1 lists them (query
conv, projection, query/key norms, rank scores, coarse scores, top-m, Tucker grid,
selection, shuffle, IVE split, gather, MCS scaling, block scatter, E projector
matmuls), so the passes have something to fuse. Parameters are named as in the
eager model's state dict (and, inside a memory layer, as in the authors' checkpoints).
Each node's ``Scope`` records its block or memory unit and part; the graph declares its
carried state (KV cache, query-conv inputs) and each unit's selection taps.
"""

from __future__ import annotations

from dataclasses import dataclass

from umc.dtypes import ir_name
from umc.ir.builder import GraphBuilder
from umc.ir.core import Graph, Scope, StateSlot, Tap, TensorType, Value
from umc.ir.dims import Dim, Sym
from umc.ir.verify import verify
from umc.spec import MemorySpec, ModelSpec, Spec

B, T, S_PAST = Sym.of("B"), Sym.of("T"), Sym.of("S_past")


@dataclass(frozen=True)
class MemoryOutputs:
    """What a lowered memory layer yields: its output, new conv state (or None), and its selection taps."""

    out: Value
    conv_state: Value | None
    taps: dict[str, Value]


def lower_memory(b: GraphBuilder, mem: MemorySpec, d_model: int, dtype: str, x: Value, prefix: str,
                 conv_state: Value | None, unit: int) -> MemoryOutputs:
    """Emit memory unit ``unit`` reading x (B,T,D); ``prefix`` prefixes its parameter names."""
    kd, n, m, heads = mem.side_dim, mem.keys_per_side, mem.topm, mem.heads
    param = lambda name, *shape, kind=dtype: b.param(prefix + name, kind, shape)
    batch, steps = x.type.shape[:2]

    b.scope = Scope("query", unit=unit)
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

    b.scope = Scope("score", unit=unit)
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
    taps = {"query": q, "rows": i_row, "cols": i_col, "grid": address, "scores": scores}
    if mem.score_activation == "softmax":
        scores = b.one("softmax", scores, axis=3)
    elif mem.score_activation == "relu":
        scores = b.one("relu", scores)

    b.scope = Scope("pool", unit=unit)
    virtual = b.one("shuffle", address, param("shuffle_index", mem.virtual_values, kind="i64")) if mem.has_shuffle else address
    row, block = b.emit("ive_split", virtual, N=mem.physical_values)
    values = b.one("gather_values", param("values_for_look_up", mem.physical_values, mem.vdim), row)
    pooled = b.one("scatter_blocks", b.one("mcs_scale", values, scores), block, E=mem.value_expansion)
    if mem.output_projection:
        b.scope = Scope("project", unit=unit)
        projector = param("values_proj.weight", d_model, mem.value_expansion * mem.vdim)
        out = None
        for e in range(mem.value_expansion):
            w_e = b.one("slice_cols", projector, start=e * mem.vdim, stop=(e + 1) * mem.vdim)
            y_e = b.one("linear", b.one("select_block", pooled, index=e), w_e)
            out = y_e if out is None else b.one("add", out, y_e)
    else:
        out = b.one("reshape", pooled, shape=(batch, steps, mem.vdim))
    return MemoryOutputs(out, new_state, taps)


def _tap_outputs(unit: int, taps: dict[str, Value]) -> tuple[dict[str, Value], list[Tap]]:
    named = {f"mem{unit}.{stage}": value for stage, value in taps.items()}
    return named, [Tap(unit, stage, f"mem{unit}.{stage}") for stage in taps]


def _norm(b: GraphBuilder, model: ModelSpec, dtype: str, x: Value, name: str) -> Value:
    affine = [b.param(f"{name}.weight", dtype, (model.d_model,))]
    if model.norm == "layernorm":
        affine.append(b.param(f"{name}.bias", dtype, (model.d_model,)))
    return b.one("rms_norm" if model.norm == "rmsnorm" else "layer_norm", x, *affine, eps=model.norm_eps)


def lower_block(b: GraphBuilder, model: ModelSpec, dtype: str, x: Value, i: int, past: tuple[Value, ...],
                prefix: str) -> tuple[Value, Value, Value, Value]:
    """Emit block ``i`` on the residual stream x (parameter names prefixed by ``prefix``): returns x after it,
    the normed FFN input h (what memory units read), and the present keys and values (``past`` = (k, v), or
    (k, v, past_len) in a ragged batch, or ())."""
    d, hd, kv = model.d_model, model.head_dim, model.n_kv_heads
    weight = lambda name, *shape: b.param(prefix + name, dtype, shape)
    b.scope = Scope("attn", block=i)
    h = _norm(b, model, dtype, x, f"{prefix}attn_norm")
    q = b.one("linear", h, weight("attn.q_proj.weight", model.n_heads * hd, d))
    k = b.one("linear", h, weight("attn.k_proj.weight", kv * hd, d))
    v = b.one("linear", h, weight("attn.v_proj.weight", kv * hd, d))
    att, present_k, present_v = b.emit("attention", q, k, v, *past, n_heads=model.n_heads, n_kv_heads=kv,
                                       head_dim=hd, rope_theta=model.rope_theta)
    x = b.one("add", x, b.one("linear", att, weight("attn.o_proj.weight", d, model.n_heads * hd)))
    b.scope = Scope("ffn", block=i)
    h = _norm(b, model, dtype, x, f"{prefix}ffn_norm")
    up = b.one("linear", h, weight("ffn.up_proj.weight", model.ffn_hidden, d))
    if model.ffn == "swiglu":
        act = b.one("mul", b.one("silu", b.one("linear", h, weight("ffn.gate_proj.weight", model.ffn_hidden, d))), up)
    else:
        act = b.one("gelu", up)
    x = b.one("add", x, b.one("linear", act, weight("ffn.down_proj.weight", d, model.ffn_hidden)))
    return x, h, present_k, present_v


def _lower_model(spec: Spec, decode: bool, ragged: bool = False) -> Graph:
    model, mem, dtype = spec.model, spec.memory, ir_name(spec.dtype)
    d, hd, kv = model.d_model, model.head_dim, model.n_kv_heads
    steps: Dim = 1 if decode else T
    b = GraphBuilder(("decode_ragged" if ragged else "decode") if decode else "prefill")
    tokens = b.input("tokens", TensorType("i64", (B, steps)))
    lengths = (b.input("past_len", TensorType("i64", (B,))),) if ragged else ()
    state: list[StateSlot] = []
    past: list[tuple[Value, ...]] = []
    for i in range(model.n_layers):
        if decode:
            past.append(tuple(b.input(f"past_{side}.{i}", TensorType(dtype, (B, kv, S_PAST, hd))) for side in "kv"))
        state += [StateSlot(f"kv_{side}", i, f"present_{side}.{i}", f"past_{side}.{i}" if decode else None)
                  for side in "kv"]
    conv_in: list[Value | None] = []
    for j in range(len(mem.units)):
        has_state = bool(mem.query_conv and mem.query_conv > 1)
        conv_in.append(b.input(f"past_conv.{j}", TensorType(dtype, (B, mem.query_conv - 1, d)))
                       if decode and has_state else None)
        if has_state:
            state.append(StateSlot("conv", j, f"present_conv.{j}", f"past_conv.{j}" if decode else None))
    outputs: dict[str, Value] = {}
    taps: list[Tap] = []
    weight = lambda name, *shape: b.param(name, dtype, shape)

    b.scope = Scope("embed")
    x = b.one("embedding", tokens, weight("embed.weight", model.vocab_size, d))
    read_inputs: dict[int, Value] = {}
    for i in range(model.n_layers):
        x, read_inputs[i], outputs[f"present_k.{i}"], outputs[f"present_v.{i}"] = lower_block(
            b, model, dtype, x, i, past[i] + lengths if decode else (), f"blocks.{i}.")
        for j, unit in enumerate(mem.units):
            if unit.write == i:
                lowered = lower_memory(b, mem, d, dtype, read_inputs[unit.read], f"memories.{j}.", conv_in[j], j)
                if lowered.conv_state is not None and mem.query_conv > 1:
                    outputs[f"present_conv.{j}"] = lowered.conv_state
                named, unit_taps = _tap_outputs(j, lowered.taps)
                outputs.update(named)
                taps += unit_taps
                b.scope = Scope("residual", unit=j)
                x = b.one("add", x, lowered.out)
    b.scope = Scope("head")
    x = _norm(b, model, dtype, x, "norm")
    head = weight("embed.weight" if model.tie_embeddings else "lm_head.weight", model.vocab_size, d)
    logits = b.one("linear", x, head)
    carried = {slot.output: outputs.pop(slot.output) for slot in state}
    ordered = {"logits": logits, **carried, **outputs}
    return b.build(ordered, meta={"spec": spec.name, "units": tuple((u.read, u.write) for u in mem.units)},
                   state=tuple(state), taps=tuple(taps))


GRAPH_KINDS = ("prefill", "decode", "decode_ragged")


def lower(spec: Spec) -> dict[str, Graph]:
    """The spec's ``prefill`` (tokens (B,T) -> logits, present state, taps), ``decode`` (tokens (B,1) + past state
    -> logits + present state, taps) and ``decode_ragged`` (``decode`` plus ``past_len`` (B,): each sequence's own
    past length, its past left-padded to the batch's longest) graphs, verified."""
    return {"prefill": verify(_lower_model(spec, decode=False)), "decode": verify(_lower_model(spec, decode=True)),
            "decode_ragged": verify(_lower_model(spec, decode=True, ragged=True))}


def lower_layer(mem: MemorySpec, d_model: int, dtype: str = "float32") -> Graph:
    """A single memory layer as a graph: x (B,T,D) -> out (B,T,D) and its taps (unit 0). Parameters unprefixed."""
    b = GraphBuilder("layer")
    x = b.input("x", TensorType(ir_name(dtype), (B, T, d_model)))
    lowered = lower_memory(b, mem, d_model, ir_name(dtype), x, "", None, 0)
    named, taps = _tap_outputs(0, lowered.taps)
    return verify(b.build({"out": lowered.out, **named}, taps=tuple(taps)))

