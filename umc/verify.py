"""Equivalence checks: compiled artifacts against the eager reference and the golden files (DESIGN.md §7).

This module is the bridge: it imports both the oracle (``umc.reference``) and the
compiler side, which never import each other.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file

from umc.lower import lower_layer
from umc.manifest import read_manifest
from umc.passes import PIPELINE, run_pipeline
from umc.reference import TORCH_DTYPES, build_model, load_weights, memory_layer_from_official
from umc.reference.official import official_memory_spec
from umc.runtime import load
from umc.runtime.graph_backend import bind, execute
from umc.spec import spec_from_dict

# float32: error relative to the reference's max magnitude (layer 1e-5, whole-model logits 1e-4)
LAYER_TOLERANCE = 1e-5
LOGITS_TOLERANCE = 1e-4
# float16/bfloat16: no further from float64 than eager at the same dtype (times slack), and a loose bound
LOW_PRECISION_SLACK = 1.25
LOW_PRECISION_BOUND = {"float16": 0.05, "bfloat16": 0.25}
# a differing top-m candidate is a tie when its score is this close (relative to the head's largest score) to the
# m-th: float32 as the layer tolerance; low precision 8 units of rounding (eps 2**-10 and 2**-8), since the scores
# come out of a whole low-precision network whose inputs already differ by its rounding
TIE_TOLERANCE = {"float32": 1e-5, "float16": 8 * 2**-10, "bfloat16": 8 * 2**-8}


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


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float]:
    if not want.numel():
        return 0.0, 0.0, 0.0
    diff = (got.double() - want.double()).abs()
    scale = want.double().abs().max().item()
    max_abs = diff.max().item()
    return max_abs, max_abs / scale if scale else max_abs, scale


def compare(output: str, step: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> Check:
    """float32 rule: max abs error within ``tolerance`` x max |want|."""
    max_abs, max_rel, scale = _errors(got, want)
    limit = tolerance * max(scale, 1e-30)
    return Check(output, step, max_abs, max_rel, limit, max_abs <= limit)


def compare_low_precision(output: str, step: str, got: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                          dtype: str) -> Check:
    """At-least-as-close rule: |got - float64| <= slack * |eager(dtype) - float64| + two rounding steps of the
    dtype at the output's scale (below that, differences are noise), and a loose bound."""
    got_abs, got_rel, scale = _errors(got, exact)
    eager_abs, _, _ = _errors(eager, exact)
    rounding = 2 * torch.finfo(TORCH_DTYPES[dtype]).eps * scale
    limit = min(LOW_PRECISION_SLACK * eager_abs + rounding, LOW_PRECISION_BOUND[dtype] * scale)
    return Check(output, step, got_abs, got_rel, limit, got_abs <= limit, f"eager {dtype} error {eager_abs:.3g}")


# ---------------------------------------------------------------- selections (top-m is discontinuous)


MAX_ADMISSIBLE_SETS = 256


def _admissible_top(scores: torch.Tensor, m: int, slack: float) -> list[frozenset[int]] | None:
    """Every top-m index set of ``scores`` (n,) that perturbing each score by at most ``slack`` could give;
    None when there are more than MAX_ADMISSIBLE_SETS (too degenerate to enumerate)."""
    n = scores.numel()
    if m >= n:
        return [frozenset(range(n))]
    values = scores.sort(descending=True).values
    surely_in = {i for i in range(n) if scores[i] > values[m] + 2 * slack}  # no outside score can pass it
    possible = {i for i in range(n) if scores[i] >= values[m - 1] - 2 * slack}  # may reach the m-th place
    band, need = sorted(possible - surely_in), m - len(surely_in)
    if math.comb(len(band), need) > MAX_ADMISSIBLE_SETS:
        return None
    return [frozenset(surely_in | set(extra)) for extra in itertools.combinations(band, need)]


def _explained(layer, x_token: torch.Tensor, head: int, chosen: set[int], tol: float) -> bool | None:
    """Whether ``chosen`` is what the eager layer could pick for one (token, head) under rounding.

    Rows and columns: any admissible top-m of the side scores (ties at the m-th place may swap);
    then ``chosen`` must be a top-m of the grid over those rows x columns, up to ties at its m-th
    score. None when the sides are too degenerate to enumerate.
    """
    n, m = layer.spec.keys_per_side, layer.spec.topm
    row_scores, col_scores = (side[0, head] for side in layer.side_scores(x_token))
    rows = _admissible_top(row_scores, m, tol * row_scores.abs().max().item())
    cols = _admissible_top(col_scores, m, tol * col_scores.abs().max().item())
    if rows is None or cols is None:
        return None
    used_rows, used_cols = {a // n for a in chosen}, {a % n for a in chosen}
    for row_set in (r for r in rows if used_rows <= r):
        for col_set in (c for c in cols if used_cols <= c):
            candidates = [r * n + c for r in sorted(row_set) for c in sorted(col_set)]
            address = torch.tensor([candidates])
            grid = layer.scores_at(x_token, address, heads=torch.full((len(candidates),), head)).sum(-1)[0]
            picked = torch.tensor([a in chosen for a in candidates])
            slack = 2 * tol * grid.abs().max().item()
            if picked.all() or grid[picked].min() >= grid[~picked].max() - slack:
                return True
    return False


def selection_check(layer, x: torch.Tensor, got_address: torch.Tensor, dtype: str, name: str, step: str = "") -> Check:
    """Compare a selection (M, H*m) with the eager layer's own on the same query inputs x (M, D), tie-aware.

    Where the sets differ for a (token, head), the build's set must be one the eager layer could
    have chosen had its scores been rounded differently (DESIGN.md §7): see ``_explained``.
    Anything else is a bug.
    """
    heads, m = layer.spec.heads, layer.spec.topm
    tol = TIE_TOLERANCE[dtype]
    with torch.no_grad():
        ref = layer.retrieve(x).indices.view(-1, heads, m)
        got = got_address.reshape(-1, heads, m)
        differing = [(t, h) for t in range(got.shape[0]) for h in range(heads)
                     if set(got[t, h].tolist()) != set(ref[t, h].tolist())]
        verdicts = [_explained(layer, x[t:t + 1], h, set(got[t, h].tolist()), tol) for t, h in differing]
    unexplained, degenerate = verdicts.count(False), verdicts.count(None)
    total = got.shape[0] * heads
    note = f"{len(differing)}/{total} (token, head) sets differ, {unexplained} beyond rounding"
    if degenerate:
        note += f", {degenerate} too tied to enumerate"
    return Check(name, step, float(len(differing)), float(unexplained), 0.0, not unexplained, note)


def tie_aware_layer_check(layer, x: torch.Tensor, got_address: torch.Tensor, got_output: torch.Tensor,
                          dtype: str = "float32") -> list[Check]:
    """A compiled layer's selection (tie-aware) and its output against the oracle recomputed for that selection."""
    with torch.no_grad():
        oracle = layer.output_at(x, got_address)
    return [selection_check(layer, x, got_address, dtype, "indices"),
            compare("output", "vs oracle with this selection", got_output, oracle, LAYER_TOLERANCE)]


# ---------------------------------------------------------------- whole models


def _state_pairs(got: dict[str, torch.Tensor], state, exact_state) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(name, build tensor, eager tensor, float64 tensor or None) for the KV cache and conv state, stacked per kind."""
    pairs = []
    for kind, index in (("present_k", 0), ("present_v", 1)):
        pairs.append((f"{kind}.*",
                      torch.cat([got[f"{kind}.{i}"].flatten() for i in range(len(state.kv))]),
                      torch.cat([kv[index].flatten() for kv in state.kv]),
                      torch.cat([kv[index].flatten() for kv in exact_state.kv]) if exact_state else None))
    convs = [j for j, c in enumerate(state.conv) if c is not None and c.numel()]  # kernel 1 keeps no state
    if convs:
        pairs.append(("conv_state.*", torch.cat([got[f"conv_state.{j}"].flatten() for j in convs]),
                      torch.cat([state.conv[j].flatten() for j in convs]),
                      torch.cat([exact_state.conv[j].flatten() for j in convs]) if exact_state else None))
    return pairs


def verify_build(build_dir: str | Path, backend: str = "graph", seed: int | None = None, steps: int = 8,
                 batch: int = 2, prompt: int = 8) -> list[Check]:
    """Prefill + ``steps`` decode steps of random tokens through the build and through the eager model.

    The eager model uses ``seed`` (default: the spec's), or the build's weights.safetensors.
    Tie-aware: the eager model runs with the build's memory selections forced (so logits and
    states are compared for the same selection), and each unit's selection is checked against
    the eager layer's own choice on the same inputs, where only rounding-level ties may differ.
    Per step: each selection, the logits, the KV cache and the query-conv state.
    """
    build_dir = Path(build_dir)
    read_manifest(build_dir, check_hashes=False)  # a clear error before reading spec.json; load() checks hashes
    spec = spec_from_dict(json.loads((build_dir / "spec.json").read_text()), source=str(build_dir / "spec.json"))
    seed = spec.seed if seed is None else seed
    total = prompt + steps
    if total > spec.model.max_seq_len:
        raise VerifyError(f"prompt + steps = {total} exceeds the spec's max_seq_len {spec.model.max_seq_len}")
    eager = build_model(spec, seed=seed)
    if (build_dir / "weights.safetensors").is_file():
        load_weights(eager, build_dir / "weights.safetensors")
    session = load(build_dir, backend=backend, weights=eager.state_dict())
    exact = copy.deepcopy(eager).double() if spec.dtype != "float32" else None
    tokens = torch.randint(0, spec.model.vocab_size, (batch, total), generator=torch.Generator().manual_seed(seed))

    def check(name: str, step: str, got, want, want64) -> Check:
        if exact is None:
            return compare(name, step, got, want, LOGITS_TOLERANCE)
        return compare_low_precision(name, step, got, want, want64, spec.dtype)

    checks = []
    with torch.no_grad():
        chunks = [(0, prompt, "prefill")] + [(t, t + 1, f"decode {t - prompt + 1}") for t in range(prompt, total)]
        state = eager_state = exact_state = None
        for start, stop, step in chunks:
            piece = tokens[:, start:stop]
            if state is None:
                got, state, selections = session.trace_prefill(piece)
            else:
                got, state, selections = session.trace_decode(piece, state)
            queries: dict[int, torch.Tensor] = {}
            want, eager_state = eager(piece, eager_state, select=selections, memory_inputs=queries)
            want64 = None
            if exact is not None:
                want64, exact_state = exact(piece, exact_state, select=selections)
            for j, address in selections.items():
                checks.append(selection_check(eager.memories[j], queries[j], address, spec.dtype, f"selection.{j}", step))
            checks.append(check("logits", step, got, want, want64))
            for name, got_t, want_t, want64_t in _state_pairs(state, eager_state, exact_state):
                checks.append(check(name, step, got_t, want_t, want64_t))
    return checks


# ---------------------------------------------------------------- single layers (golden files)


def _read_golden(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config of a golden file, or VerifyError naming what is wrong."""
    try:
        tensors = load_file(str(path))
        metadata = safetensors.safe_open(str(path), "pt").metadata() or {}
    except (OSError, safetensors.SafetensorError) as exc:
        raise VerifyError(f"{path}: cannot read safetensors: {exc}") from None
    if "config" not in metadata:
        raise VerifyError(f"{path}: no 'config' metadata (a golden file carries its layer config as JSON)")
    try:
        config = json.loads(metadata["config"])
        official_memory_spec(config)
    except ValueError as exc:
        raise VerifyError(f"{path}: bad config metadata: {exc}") from None
    missing = [k for k in ("input", "expected_output", "expected_indices") if k not in tensors]
    if missing:
        raise VerifyError(f"{path}: missing tensors {', '.join(missing)}")
    return tensors, config


def verify_golden(path: str | Path, backend: str = "graph", passes: tuple[str, ...] = PIPELINE) -> list[Check]:
    """Compile the layer a golden file describes through ``passes``, run its input, compare with its expectations."""
    if backend != "graph":
        raise VerifyError(f"unknown backend {backend!r} (allowed: graph)")
    tensors, config = _read_golden(Path(path))
    mem = official_memory_spec(config)
    graph = lower_layer(mem, int(config["hidden_size"]))
    graph = run_pipeline(graph, passes)[-1].graph if passes else graph
    try:
        layer = memory_layer_from_official(tensors, config).layer
    except ValueError as exc:
        raise VerifyError(f"{path}: {exc}") from None
    x = tensors["input"]
    flat = x.reshape(1, -1, x.shape[-1])
    out = execute(graph, bind(graph, tensors), {"x": flat})
    got_output = out["out"].reshape(-1, x.shape[-1])
    got_address = out["address"].reshape(got_output.shape[0], -1)
    expected = tensors["expected_output"].reshape(-1, x.shape[-1])
    checks = tie_aware_layer_check(layer, flat[0], got_address, got_output)
    got_sets = got_address.view(-1, mem.heads, mem.topm).flatten(0, 1).tolist()
    want_sets = tensors["expected_indices"].view(-1, mem.heads, mem.topm).flatten(0, 1).tolist()
    exact = [set(a) == set(b) for a, b in zip(got_sets, want_sets)]
    checks.append(Check("indices vs golden", "", float(exact.count(False)), 0.0, 0.0, all(exact),
                        f"{exact.count(True)}/{len(exact)} (token, head) sets equal to the authors'"))
    checks.append(compare("output vs golden", "", got_output, expected, LAYER_TOLERANCE))
    return checks
