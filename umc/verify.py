"""Equivalence checks: compiled artifacts against the eager reference and the golden files (DESIGN.md §7).

This module is the bridge: it imports both the oracle (``umc.reference``) and the compiler
side, which never import each other.

Each memory layer is checked in three parts. Its query projection (a selection tap) against
the eager layer's on the same path: in float32 within tolerance, in low precision at least as
close to a float64 run as eager is. Its selection, stage by stage and without enumeration, on
its own query: a set S chosen among candidates with true scores s is a top-m under a band b iff
S holds m distinct candidates and ``min(s over S) >= max(s outside S) - b``, where s are the
oracle's float64 scores of the build's query and the band of each (token, head) is
``BAND_FACTOR`` times the largest difference, over that stage's candidates, between the eager
layer's scores of that query computed in the build's dtype and in float64: the rounding a correct
computation shows there. The row set, the column set, and the grid selection over the build's
own rows x columns are each judged. Finally its per-core scores at the chosen addresses. Judging
the selection on the build's own query keeps upstream rounding (which the query check bounds)
out of the band.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import safetensors
import torch
from safetensors.torch import load_file

from umc.cost import memory_needs
from umc.dtypes import BY_SPEC, torch_dtype
from umc.lower import lower_layer
from umc.slices import block_slice, unit_slice
from umc.manifest import parse_manifest, unlisted_files
from umc.official import official_memory_spec
from umc.passes import PIPELINE, run_pipeline
from umc.resources import require_memory
from umc.reference import build_block, build_memory_layer, build_model, load_weights, memory_layer_from_official
from umc.runtime import lookup_backend
from umc.runtime.checks import check_feeds, check_weights
from umc.runtime.session import Session, read_build
from umc.spec import SpecError

# float32: error relative to the reference's max magnitude (layer 1e-5, whole-model logits 1e-4)
LAYER_TOLERANCE = 1e-5
LOGITS_TOLERANCE = 1e-4
# float16/bfloat16: no further from float64 than eager at the same dtype (times slack), and a loose bound
LOW_PRECISION_SLACK = 1.25
LOW_PRECISION_BOUND = {"float16": 0.05, "bfloat16": 0.25}
# the tie band of a selection stage: this many times eager's largest score error against float64
BAND_FACTOR = 2.0


class VerifyError(ValueError):
    """A verification request that cannot be carried out (bad file, impossible length): a user mistake."""


@dataclass(frozen=True)
class Check:
    """One compared output: errors, the limit they must stay under, and whether they do."""

    output: str
    step: str
    max_abs: float
    max_rel: float
    limit: float
    ok: bool
    note: str = ""


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float, int]:
    """(max abs error, relative to max |want|, max |want|, non-finite values in got or want)."""
    bad = int((~torch.isfinite(got)).sum()) + int((~torch.isfinite(want)).sum()) if got.is_floating_point() else 0
    if not want.numel() or bad:
        return (float("nan"),) * 3 + (bad,) if bad else (0.0, 0.0, 0.0, 0)
    diff = (got.double() - want.double()).abs()
    scale = want.double().abs().max().item()
    max_abs = diff.max().item()
    return max_abs, max_abs / scale if scale else max_abs, scale, 0


def _non_finite(output: str, step: str, count: int) -> Check:
    return Check(output, step, float("nan"), float("nan"), 0.0, False, f"{count} non-finite values (NaN or Inf)")


def _shape_mismatch(output: str, step: str, *tensors: torch.Tensor) -> Check | None:
    """A failing check when the compared tensors' shapes differ (never broadcast one against another)."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) == 1:
        return None
    return Check(output, step, float("nan"), float("nan"), 0.0, False,
                 f"shapes differ: {' vs '.join(str(list(t.shape)) for t in tensors)}")


def compare(output: str, step: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> Check:
    """float32 rule: max abs error within ``tolerance`` x max |want|; any NaN/Inf, or other shapes, fails."""
    mismatch = _shape_mismatch(output, step, got, want)
    if mismatch:
        return mismatch
    max_abs, max_rel, scale, bad = _errors(got, want)
    if bad:
        return _non_finite(output, step, bad)
    limit = tolerance * max(scale, 1e-30)
    return Check(output, step, max_abs, max_rel, limit, max_abs <= limit)


def compare_low_precision(output: str, step: str, got: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                          dtype: str) -> Check:
    """At-least-as-close rule: |got - float64| <= slack * |eager(dtype) - float64| + two rounding steps of the
    dtype at the output's scale (below that, differences are noise), and a loose bound; any NaN/Inf, or other
    shapes, fails."""
    mismatch = _shape_mismatch(output, step, got, eager, exact)
    if mismatch:
        return mismatch
    got_abs, got_rel, scale, bad = _errors(got, exact)
    eager_abs, _, _, eager_bad = _errors(eager, exact)
    if bad or eager_bad:
        return _non_finite(output, step, bad + eager_bad)
    rounding = 2 * torch.finfo(torch_dtype(dtype)).eps * scale
    limit = min(LOW_PRECISION_SLACK * eager_abs + rounding, LOW_PRECISION_BOUND[dtype] * scale)
    return Check(output, step, got_abs, got_rel, limit, got_abs <= limit, f"eager {dtype} error {eager_abs:.3g}")


def compare_any(output: str, step: str, got, eager, exact, dtype: str, tolerance: float) -> Check:
    """float32: ``compare`` against eager; float16/bfloat16: ``compare_low_precision`` against float64."""
    if dtype == "float32":
        return compare(output, step, got, eager, tolerance)
    return compare_low_precision(output, step, got, eager, exact, dtype)


# ---------------------------------------------------------------- selections (top-m is discontinuous)


@dataclass(frozen=True)
class Stage:
    """One selection stage over (M, H) token-heads: the build's chosen ids (M,H,m), the candidate ids
    (M,H,K) and their float64 scores, and each token-head's measured rounding (M,H): the eager model's largest
    score error in the build's dtype against float64 among that token-head's candidates."""

    name: str
    chosen: torch.Tensor
    candidates: torch.Tensor
    scores64: torch.Tensor
    rounding: torch.Tensor

    @property
    def band(self) -> torch.Tensor:
        """The tie band per token-head: ``BAND_FACTOR`` x its measured rounding."""
        return BAND_FACTOR * self.rounding


@dataclass(frozen=True)
class StageVerdict:
    """Per token-head: ids repeated, ids not among the candidates, and not a top-m within the band."""

    repeated: torch.Tensor
    foreign: torch.Tensor
    beyond_band: torch.Tensor

    @property
    def failed(self) -> torch.Tensor:
        """Token-heads that fail any rule."""
        return self.repeated | self.foreign | self.beyond_band


def judge(stage: Stage) -> StageVerdict:
    """The admissibility rule: m distinct candidates whose lowest score is at least the highest score left
    out minus the stage's band."""
    m = stage.chosen.shape[-1]
    ordered = stage.chosen.sort(-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
    picked = (stage.candidates.unsqueeze(-1) == stage.chosen.unsqueeze(-2))  # (M,H,K,m)
    foreign = ~picked.any(-2).all(-1)
    mask = picked.any(-1)  # (M,H,K): candidate chosen
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    lowest_in = torch.where(mask, stage.scores64, inf).amin(-1)
    highest_out = torch.where(mask, -inf, stage.scores64).amax(-1)
    beyond = (mask.sum(-1) != m) | (lowest_in < highest_out - stage.band) | ~torch.isfinite(stage.scores64).all(-1)
    return StageVerdict(repeated, foreign, beyond)


def measured_rounding(scores: torch.Tensor, scores64: torch.Tensor) -> torch.Tensor:
    """Per token-head (M,H): the largest |scores - scores64| among its candidates."""
    return (scores.double() - scores64.double()).abs().amax(-1)


def selection_stages(layer, query: torch.Tensor, taps: Mapping[str, torch.Tensor]) -> list[Stage]:
    """The row, column and grid stages of one memory layer's selection, judged on the build's own query
    projection (M, Hq*2*kd): float64 scores of it, and the eager layer's rounding in the build's dtype on it."""
    spec = layer.spec
    heads, m, n = spec.heads, spec.topm, spec.keys_per_side
    tokens = query.shape[0]
    chosen = {k: taps[k].reshape(tokens, heads, m) for k in ("rows", "cols", "grid")}
    wide = query.double()
    with torch.no_grad():
        sides, sides64 = layer.side_scores(query, projected=True), layer.side_scores(wide, projected=True)
        stages = []
        keys = torch.arange(n).expand(tokens, heads, n)
        for name, s, s64 in zip(("rows", "cols"), sides, sides64):
            stages.append(Stage(name, chosen[name], keys, s64.double(), measured_rounding(s, s64)))
        rows, cols = chosen["rows"], chosen["cols"]
        grid = layer.grid_at(query, rows, cols, projected=True).sum(2).flatten(-2)
        grid64 = layer.grid_at(wide, rows, cols, projected=True).sum(2).flatten(-2).double()
        ids = (rows.unsqueeze(-1) * n + cols.unsqueeze(-2)).flatten(-2)
        stages.append(Stage("grid", chosen["grid"], ids, grid64, measured_rounding(grid, grid64)))
    return stages


def check_selection(layer, x: torch.Tensor, x64: torch.Tensor, taps: Mapping[str, torch.Tensor], dtype: str,
                    name: str, step: str = "", tolerance: float = LOGITS_TOLERANCE) -> list[Check]:
    """One memory layer of a build against the eager layer, in three checks: the build's query projection
    against eager's on the same path (x in the model's dtype, x64 from the float64 run); its selection,
    stage-wise and tie-aware, judged on its own query; and its per-core scores at the chosen addresses."""
    tokens = x.shape[0]
    query = taps["query"].reshape(tokens, -1)
    with torch.no_grad():
        checks = [compare_any(f"{name}.query", step, query, layer.project(x), layer.project(x64), dtype, tolerance)]
    stages = selection_stages(layer, query, taps)
    verdicts = [judge(stage) for stage in stages]
    total = stages[0].chosen.shape[0] * stages[0].chosen.shape[1]
    failed = sum(int(v.failed.sum()) for v in verdicts)
    parts = []
    for stage, verdict in zip(stages, verdicts):
        text = f"{stage.name} {int(verdict.beyond_band.sum())} beyond band"
        for label, flags in (("repeated", verdict.repeated), ("not a candidate", verdict.foreign)):
            if flags.any():
                text += f", {int(flags.sum())} {label}"
        parts.append(text)
    with torch.no_grad():
        own = layer.retrieve(x).indices.view(-1, layer.spec.heads, layer.spec.topm)
    grid = stages[2].chosen
    differ = sum(set(a) != set(b) for a, b in zip(grid.flatten(0, 1).tolist(), own.flatten(0, 1).tolist()))
    band = stages[2].band.max().item()
    note = f"{differ}/{total} grid sets differ from eager's own; {'; '.join(parts)} (of {total}); grid band <= {band:.2g}"
    checks.append(Check(f"{name}.selection", step, float(differ), float(failed), 0.0, failed == 0, note))
    address = grid.flatten(1)
    with torch.no_grad():
        got = taps["scores"].reshape(address.shape[0], address.shape[1], -1)
        checks.append(compare_any(f"{name}.scores", step, got, layer.scores_at(query, address, projected=True),
                                  layer.scores_at(query.double(), address, projected=True), dtype, tolerance))
    return checks


# ---------------------------------------------------------------- whole models


def _eager_state(slot, state) -> torch.Tensor:
    """The eager DecodeState tensor of a declared state slot."""
    if slot.kind == "conv":
        return state.conv[slot.index]
    return state.kv[slot.index][0 if slot.kind == "kv_k" else 1]


def _state_checks(graph, got: Mapping[str, torch.Tensor], state, exact_state, dtype: str, step: str) -> list[Check]:
    """The build's carried state against eager's, stacked per kind (KV keys, KV values, conv inputs)."""
    checks = []
    for kind in ("kv_k", "kv_v", "conv"):
        slots = [s for s in graph.state if s.kind == kind]
        if not slots:
            continue
        flat = lambda pick: torch.cat([pick(s).flatten() for s in slots])
        checks.append(compare_any(f"{kind}.*", step, flat(lambda s: got[s.name]), flat(lambda s: _eager_state(s, state)),
                                  flat(lambda s: _eager_state(s, exact_state)), dtype, LOGITS_TOLERANCE))
    return checks


@dataclass(frozen=True)
class StepRecord:
    """One prefill or decode step of a build and of the eager model forced to the build's selections:
    the build's logits, state and taps, eager's logits and state in the spec's dtype and in float64, and each
    memory unit's query inputs in both."""

    step: str
    got: torch.Tensor
    state: dict[str, torch.Tensor]
    taps: dict[int, dict[str, torch.Tensor]]
    want: torch.Tensor
    eager_state: object
    want64: torch.Tensor
    exact_state: object
    queries: dict[int, torch.Tensor]
    queries64: dict[int, torch.Tensor]


def trace_steps(session: Session, eager, tokens: torch.Tensor, prompt: int):
    """Yield a StepRecord for the prompt, then for each further token decoded one at a time."""
    chunks = [(0, prompt, "prefill")] + [(t, t + 1, f"decode {t - prompt + 1}") for t in range(prompt, tokens.shape[1])]
    state = eager_state = exact_state = None
    with torch.no_grad():
        for start, stop, step in chunks:
            piece = tokens[:, start:stop]
            if state is None:
                got, state, taps = session.trace_prefill(piece)
            else:
                got, state, taps = session.trace_decode(piece, state)
            selections = {j: t["grid"].flatten(2) for j, t in taps.items()}
            queries: dict[int, torch.Tensor] = {}
            queries64: dict[int, torch.Tensor] = {}
            want, eager_state = eager(piece, eager_state, select=selections, memory_inputs=queries)
            want64, exact_state = eager(piece, exact_state, select=selections, memory_inputs=queries64,
                                        compute_dtype=torch.float64)
            yield StepRecord(step, got, state, taps, want, eager_state, want64, exact_state, queries, queries64)


def require_verify_memory(spec, batch: int, tokens: int) -> None:
    """ResourceError, before anything is built, when verifying the whole model cannot fit this machine: the
    weights once (eager and build share them), the KV cache three times (build, eager, and float64) and the
    working set of a forward in the spec's dtype and in float64."""
    needs = memory_needs(spec, batch=batch, seq_len=tokens)
    wide = 8 // BY_SPEC[spec.dtype].itemsize
    parts = {"weights": needs.weight_bytes, "KV caches": needs.kv_cache_bytes * (2 + wide),
             "working sets": needs.prefill_bytes * (1 + wide)}
    require_memory(sum(parts.values()), f"umc verify {spec.name}", parts=parts,
                   hint="verify it a slice at a time with --units all --blocks all")


def prepare(build_dir: str | Path, backend: str, seed: int | None, steps: int, batch: int, prompt: int,
            world=None):
    """(session, eager model, tokens) for verifying a build: the eager model from ``seed`` (default: the
    spec's) or from the build's weights.safetensors when its manifest lists it. In a distributed ``world`` each
    rank draws its own tokens (so a value sent to the wrong rank cannot go unnoticed)."""
    build = read_build(build_dir)
    spec = build.spec
    seed = spec.seed if seed is None else seed
    total = prompt + steps
    if total > spec.model.max_seq_len:
        raise VerifyError(f"prompt + steps = {total} exceeds the spec's max_seq_len {spec.model.max_seq_len}")
    require_verify_memory(spec, batch, total)
    eager = build_model(spec, seed=seed)
    if build.weights_file is not None:
        load_weights(eager, build.weights_file)
    session = Session(build, eager.state_dict(), backend, world=world)
    token_seed = seed if world is None else seed + 7919 * world.rank
    tokens = torch.randint(0, spec.model.vocab_size, (batch, total), generator=torch.Generator().manual_seed(token_seed))
    return session, eager, tokens


def verify_build(build_dir: str | Path, backend: str = "graph", seed: int | None = None, steps: int = 8,
                 batch: int = 2, prompt: int = 8, world=None) -> list[Check]:
    """Prefill + ``steps`` decode steps of random tokens through the build and through the eager model.

    Every step runs the eager model twice with the build's grid selections forced (in the spec's dtype,
    and in float64 for the tie bands and the low-precision rule), then checks each unit's selection
    stage-wise and its scores, the logits, the KV cache and the query-conv state.
    """
    session, eager, tokens = prepare(build_dir, backend, seed, steps, batch, prompt, world)
    dtype = session.spec.dtype
    checks = []
    for rec in trace_steps(session, eager, tokens, prompt):
        for j in sorted(rec.taps):
            checks += check_selection(eager.memories[j], rec.queries[j], rec.queries64[j], rec.taps[j], dtype,
                                      f"mem{j}", rec.step)
        checks.append(compare_any("logits", rec.step, rec.got, rec.want, rec.want64, dtype, LOGITS_TOLERANCE))
        checks += _state_checks(session.graphs["decode"], rec.state, rec.eager_state, rec.exact_state, dtype, rec.step)
    return checks


def build_warnings(build_dir: str | Path) -> list[str]:
    """What a user should know about a build that does not make it fail: files the manifest does not list
    (never loaded)."""
    build_dir = Path(build_dir)
    extra = unlisted_files(build_dir, parse_manifest(build_dir))
    return [f"{len(extra)} file(s) in the build are not in its manifest and are ignored: {', '.join(extra[:5])}"] if extra else []


# ---------------------------------------------------------------- single layers (golden files)


def _read_golden(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config of a golden file, or VerifyError naming what is wrong."""
    try:
        tensors = load_file(str(path))
        with safetensors.safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (OSError, safetensors.SafetensorError) as exc:
        raise VerifyError(f"{path}: cannot read safetensors: {exc}") from None
    if "config" not in metadata:
        raise VerifyError(f"{path}: no 'config' metadata (a golden file carries its layer config as JSON)")
    try:
        config = json.loads(metadata["config"])
    except ValueError as exc:
        raise VerifyError(f"{path}: config metadata is not JSON: {exc}") from None
    missing = [k for k in ("input", "expected_output", "expected_indices") if k not in tensors]
    if missing:
        raise VerifyError(f"{path}: missing tensors {', '.join(missing)}")
    return tensors, config


def _check_golden_shapes(path: Path, tensors: dict[str, torch.Tensor], mem, width: int) -> None:
    """VerifyError unless input and expectations have the shapes the config implies: input (..., D), expected
    output of input's shape, expected indices (tokens, H*m)."""
    x = tensors["input"]
    tokens = x.numel() // width if x.dim() >= 2 and x.shape[-1] == width else -1
    wanted = {"input": f"(..., {width})", "expected_output": str(list(x.shape)),
              "expected_indices": str([tokens, mem.heads * mem.topm])}
    got = {"input": tokens > 0, "expected_output": tensors["expected_output"].shape == x.shape,
           "expected_indices": tuple(tensors["expected_indices"].shape) == (tokens, mem.heads * mem.topm)}
    for name, ok in got.items():
        if not ok:
            raise VerifyError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, the config needs {wanted[name]}")


def run_graph(graph, weights: Mapping[str, torch.Tensor], feeds: dict[str, torch.Tensor], backend: str,
              artifacts: Path | None = None) -> dict[str, torch.Tensor]:
    """A graph of one kind (a layer, a slice of the build in ``artifacts``) on checked feeds through a backend:
    every named output."""
    check_weights({graph.name: graph}, weights)
    sizes = check_feeds(graph, feeds)
    return lookup_backend(backend)({graph.name: graph}, weights, artifacts=artifacts).run(graph.name, feeds, sizes)


def verify_golden(path: str | Path, backend: str = "graph", passes: tuple[str, ...] = PIPELINE) -> list[Check]:
    """Compile the layer a golden file describes through ``passes``, run its input, compare with its expectations."""
    path = Path(path)
    tensors, config = _read_golden(path)
    try:
        mem = official_memory_spec(config, source=str(path))
        layer = memory_layer_from_official(tensors, config).layer
    except ValueError as exc:
        raise VerifyError(str(exc) if isinstance(exc, SpecError) else f"{path}: {exc}") from None
    _check_golden_shapes(path, tensors, mem, int(config["hidden_size"]))
    graph = lower_layer(mem, int(config["hidden_size"]))
    graph = run_pipeline(graph, passes)[-1].graph if passes else graph
    x = tensors["input"]
    flat = x.reshape(1, -1, x.shape[-1])
    out = run_graph(graph, tensors, {"x": flat}, backend)
    taps = {tap.stage: out[tap.output] for tap in graph.taps}
    got_output = out["out"].reshape(-1, x.shape[-1])
    queries = flat[0]
    checks = check_selection(layer, queries, queries.double(), taps, "float32", "mem0", tolerance=LAYER_TOLERANCE)
    address = taps["grid"].reshape(queries.shape[0], -1)
    with torch.no_grad():
        checks.append(compare("output", "vs oracle with this selection", got_output, layer.output_at(queries, address),
                              LAYER_TOLERANCE))
    got_sets = taps["grid"].reshape(-1, mem.topm).tolist()
    want_sets = tensors["expected_indices"].reshape(-1, mem.topm).tolist()
    exact = [set(a) == set(b) for a, b in zip(got_sets, want_sets)]
    checks.append(Check("indices vs golden", "", float(exact.count(False)), 0.0, 0.0, all(exact),
                        f"{exact.count(True)}/{len(exact)} (token, head) sets equal to the authors'"))
    checks.append(compare("output vs golden", "", got_output, tensors["expected_output"].reshape(-1, x.shape[-1]),
                          LAYER_TOLERANCE))
    return checks


# ---------------------------------------------------------------- slices (models too big to verify whole)


def _slice_weights(build, parts: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The weights of eager slices, by the full names the build's graphs use (prefix -> module): from the build's
    weights.safetensors (only those tensors) when its manifest lists one, else the seeded modules' own."""
    if build.weights_file is not None:
        with safetensors.safe_open(str(build.weights_file), "pt") as f:
            for prefix, module in parts.items():
                module.load_state_dict({name[len(prefix):]: f.get_tensor(name) for name in f.keys()
                                        if name.startswith(prefix)})
    return {prefix + name: t for prefix, module in parts.items() for name, t in module.state_dict().items()}


def _build_slices(spec, what: str, *builders: Callable[[str], torch.nn.Module]) -> list[torch.nn.Module]:
    """Eager slices, refused up front (ResourceError) when their weights, measured on the meta device, do not fit."""
    needed = sum(t.numel() * t.element_size() for build in builders for t in build("meta").state_dict().values())
    require_memory(needed, f"umc verify {spec.name} {what}")
    return [build("cpu") for build in builders]


def verify_unit_slice(build, unit: int, backend: str, seed: int, batch: int, prompt: int) -> list[Check]:
    """Memory unit ``unit`` cut out of the build's prefill graph, against the eager layer (after its read block's
    FFN norm) with the same weights, on a random residual stream of the spec's dtype."""
    spec = build.spec
    graph, read = unit_slice(build.graphs["prefill"], unit)
    layer, block = _build_slices(spec, f"--units {unit}", lambda device: build_memory_layer(spec, unit, seed, device),
                                 lambda device: build_block(spec, read, seed, device))  # the block: its FFN norm
    weights = _slice_weights(build, {f"memories.{unit}.": layer, f"blocks.{read}.": block})
    gen = torch.Generator().manual_seed(seed + 1 + unit)
    x = torch.randn(batch, prompt, spec.model.d_model, generator=gen).to(torch_dtype(spec.dtype))
    out = run_graph(graph, weights, {"x": x}, backend, build.path)
    taps = {tap.stage: out[tap.output] for tap in graph.taps}
    queries, queries64 = [], []
    with torch.no_grad():
        select = taps["grid"].flatten(2)
        want, _ = layer(block.ffn_norm(x), select=select, record=queries)
        want64, _ = layer(block.ffn_norm(x.double()), select=select, record=queries64)
    name, step = f"mem{unit}", "slice"
    checks = check_selection(layer, queries[0], queries64[0], taps, spec.dtype, name, step, LAYER_TOLERANCE)
    checks.append(compare_any(f"{name}.output", step, out["out"], want, want64, spec.dtype, LAYER_TOLERANCE))
    return checks


def verify_block_slice(build, block: int, backend: str, seed: int, steps: int, batch: int, prompt: int) -> list[Check]:
    """Block ``block`` cut out of the build's prefill and decode graphs, against the eager block with the same
    weights, over a random residual stream: a prompt, then ``steps`` decode steps."""
    spec = build.spec
    graphs = {kind: block_slice(build.graphs[kind], block) for kind in ("prefill", "decode")}
    (module,) = _build_slices(spec, f"--blocks {block}", lambda device: build_block(spec, block, seed, device))
    weights = _slice_weights(build, {f"blocks.{block}.": module})
    check_weights(graphs, weights)
    runner = lookup_backend(backend)(graphs, weights, artifacts=build.path)
    gen = torch.Generator().manual_seed(seed + 1000 + block)
    inputs = torch.randn(batch, prompt + steps, spec.model.d_model, generator=gen).to(torch_dtype(spec.dtype))
    checks, past, past_eager, past64 = [], None, None, None
    with torch.no_grad():
        for start in [0] + list(range(prompt, prompt + steps)):
            x = inputs[:, start:prompt if start == 0 else start + 1]
            kind = "prefill" if past is None else "decode"
            feeds = {"x": x} if past is None else {"x": x, "past_k": past[0], "past_v": past[1]}
            out = runner.run(kind, feeds, check_feeds(graphs[kind], feeds))
            want, _, past_eager = module(x, past_eager, start)
            want64, _, past64 = module(x.double(), past64, start)
            step = f"block{block} {kind}" + ("" if past is None else f" {start - prompt + 1}")
            checks.append(compare_any(f"block{block}.x", step, out["x"], want, want64, spec.dtype, LAYER_TOLERANCE))
            for index, side in enumerate("kv"):
                checks.append(compare_any(f"block{block}.{side}", step, out[f"present_{side}"], past_eager[index],
                                          past64[index], spec.dtype, LAYER_TOLERANCE))
            past = (out["present_k"], out["present_v"])
    return checks


def verify_slices(build_dir: str | Path, units: tuple[int, ...] | str, blocks: tuple[int, ...] | str,
                  backend: str = "graph", seed: int | None = None, steps: int = 8, batch: int = 2,
                  prompt: int = 8) -> list[Check]:
    """Memory units and blocks (indices, or "all") one at a time, each slice's weights alone in memory: for
    models too big to verify whole. Units run a prompt (no decode-time conv state); blocks a prompt and
    ``steps`` decode steps."""
    build = read_build(build_dir)
    seed = build.spec.seed if seed is None else seed
    units = tuple(range(len(build.spec.memory.units))) if units == "all" else units
    blocks = tuple(range(build.spec.model.n_layers)) if blocks == "all" else blocks
    if prompt + steps > build.spec.model.max_seq_len:
        raise VerifyError(f"prompt + steps = {prompt + steps} exceeds the spec's max_seq_len {build.spec.model.max_seq_len}")
    for what, chosen, count in (("unit", units, len(build.spec.memory.units)), ("block", blocks, build.spec.model.n_layers)):
        bad = [i for i in chosen if not 0 <= i < count]
        if bad:
            raise VerifyError(f"{what} {bad[0]} does not exist (the spec has {count}: 0..{count - 1})")
    checks = []
    for unit in units:
        checks += verify_unit_slice(build, unit, backend, seed, batch, prompt)
    for block in blocks:
        checks += verify_block_slice(build, block, backend, seed, steps, batch, prompt)
    return checks
