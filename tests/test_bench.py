"""``umc bench``: the scheduler, the statistics, the bytes and FLOPs a step must move, and the command end to end.

Nothing here asserts a speed: timings on a shared machine are data for the bench's table, not test outcomes.
The end-to-end runs use tiny probes and the fewest repetitions the command accepts.
"""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import GOLDEN, SPECS

import umc
from umc.bench import contenders as bench_contenders
from umc.bench.command import bench_command
from umc.bench.contenders import (EAGER, TRITON_WITHOUT_GPU, check_untouched, eager_model, model_contender,
                                  model_inputs, open_model, versions)
from umc.bench.limits import layer_step, model_step
from umc.bench.peak import measure_peak
from umc.bench.timing import percentile, round_order, round_robin, summarize
from umc.official import official_memory_spec
from umc.runtime import list_backends

TINY = str(SPECS / "ultramem-tiny.yaml")
FAST = ["--reps", "9", "--warmup", "1", "--probe-mib", "2", "--gemm-size", "64", "--no-peak-memory"]


def invoke(*args):
    return CliRunner().invoke(bench_command, [str(a) for a in args])


# ---------------------------------------------------------------- scheduling and statistics


def test_round_robin_interleaves_every_round_and_rotates_the_start():
    calls = []
    ticks = iter(range(1000))
    contenders = [(name, lambda name=name: calls.append(name)) for name in "abc"]
    samples = round_robin(contenders, reps=4, warmup=2, clock=lambda: float(next(ticks)))
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"], ["b", "c", "a"],
                      ["c", "a", "b"]]
    # the clock advances by one per reading: every call lasts exactly 1 "second"; warm-up rounds are not kept
    assert samples == {"a": [1.0] * 4, "b": [1.0] * 4, "c": [1.0] * 4}
    assert round_order(4, 5) == [1, 2, 3, 0]


def test_round_robin_keeps_each_contenders_own_durations():
    now = [0.0]
    cost = {"fast": 1.0, "slow": 5.0}

    def contender(name):
        return lambda: now.__setitem__(0, now[0] + cost[name])

    samples = round_robin([(n, contender(n)) for n in cost], reps=3, clock=lambda: now[0])
    assert samples == {"fast": [1.0] * 3, "slow": [5.0] * 3}
    with pytest.raises(ValueError, match="distinct"):
        round_robin([("a", lambda: None), ("a", lambda: None)], reps=1)


@pytest.mark.parametrize("n", [1, 2, 9, 10, 37])
def test_median_and_spread_match_numpy(n):
    values = np.random.default_rng(n).lognormal(size=n).tolist()
    summary = summarize(values)
    assert summary.median == pytest.approx(np.median(values))
    assert summary.p10 == pytest.approx(np.percentile(values, 10))
    assert summary.p90 == pytest.approx(np.percentile(values, 90))
    assert (summary.min, summary.max, summary.n) == (min(values), max(values), n)
    for q in (0, 25, 33.3, 75, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


# ---------------------------------------------------------------- what a step must read and compute


def test_tiny_model_step_bytes_and_flops_from_the_spec_sizes(tiny_spec):
    # ultramem-tiny: vocab 512, D 64, 4 blocks, 4 heads (head_dim 16), 2 KV heads, SwiGLU 128, RMSNorm, tied;
    # 2 memory units: knum 8 (n = 2*8 = 16 keys per side, N = 64 rows), kdim 16, vdim 32, m 6, H 2, shared query,
    # r 2, 2 cores, E 4, query conv 3, LayerNorm (no bias) on query and keys, output projection. float32.
    batch, past = 2, 4
    block = 2 * 64 + 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3
    unit = {
        "query projection": 64 * 32,
        "keys (rank-folded)": 2 * 2 * 16 * 16,
        "winners' rank-r key rows": 2 * 2 * 12 * 16 * 2,  # min(B*m, n) = 12 rows per side and head, r = 2
        "value rows": 24 * 32,  # min(B*H*m, N) = min(24, 64) rows
        "output projection": 4 * 32 * 64,
        "norms, Tucker cores, conv": 16 + 16 + 2 * 2 * 2 * 2 + 2 * 2 * 2 + 64 * 3 + 64,
    }
    expected = {"blocks": 4 * block * 4, "embedding and LM head": 512 * 64 * 4, "final norm": 64 * 4,
                **{f"memory: {k}": 2 * v * 4 for k, v in unit.items()},
                "memory: shuffle entries": 2 * 24 * 8,  # int64 entries of the chosen addresses
                "KV cache": 2 * 4 * 2 * 16 * past * batch * 4}
    work = model_step(tiny_spec, batch, past)
    assert work.reads == expected
    assert work.value_row_bytes == 2 * 24 * 32 * 4
    dense = 4 * 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3) + 2 * 512 * 64
    memory = (2 * 64 * 3 + 2 * 64 * 32 + 2 * 2 * 2 * 16 * 16 * 2 + 2 * 2 * 2 * 16 * 2
              + 2 * 2 * (2 * 6 * 4 + 2 * 36 * 2) + 2 * 2 * 6 * 32 + 2 * 4 * 32 * 64)
    attention = 4 * 4 * 4 * 16 * (past + 1)
    assert work.flops == batch * (dense + 2 * memory + attention)


def test_value_row_bytes_agree_with_the_compiled_graphs_cost(tiny_spec, tmp_path):
    build = umc.compile(tiny_spec, tmp_path / "b")
    for unit in build.report["units"]:
        for batch, cost in unit["per_token"].items():
            rows = cost["value_bytes"] * int(batch)
            assert rows * len(build.report["units"]) == model_step(tiny_spec, int(batch), 0).value_row_bytes


def test_released_227m_layer_reads_at_batch_1():
    config = dict(bench_contenders.RELEASED_227M)
    work = layer_step(official_memory_spec(config), 768, "float32", 1)
    expected = {
        "query projection": 768 * 2 * 192 * 4,
        "keys (rank-folded)": 2 * 2 * (2 * 808) * 192 * 4,
        "winners' rank-r key rows": 2 * 2 * 80 * 192 * 2 * 4,
        "value rows": 2 * 80 * 384 * 4,
        "shuffle entries": 2 * 80 * 8,
        "output projection": 4 * 384 * 768 * 4,
        "norms, Tucker cores, conv": (192 + 192 + 2 * 2 * 2 * 2 + 2 * 2 * 2) * 4,
    }
    assert work.reads == expected
    assert work.bandwidth_limit(1e10) == pytest.approx(sum(expected.values()) / 1e10)


# ---------------------------------------------------------------- contenders


def test_every_contender_decodes_from_the_same_past_tensors(tiny_spec, tmp_path):
    target = open_model(SPECS / "ultramem-tiny.yaml", tmp_path)
    model = eager_model(target)
    session = model_contender("graph", target, model, tmp_path)
    inputs = model_inputs(tiny_spec, 2, 3)
    tokens, state = session.adapt(inputs)
    assert tokens is inputs[0]
    shared = {id(t) for pair in inputs[1].kv for t in pair} | {id(t) for t in inputs[1].conv}
    assert {id(t) for t in state.values()} == shared
    before = versions(inputs)
    with torch.no_grad():
        session.step(inputs)()
        model_contender(EAGER, target, model, tmp_path).step(inputs)()
    check_untouched("graph", inputs, before)
    inputs[1].kv[0][0].add_(1.0)
    with pytest.raises(RuntimeError, match="wrote into the past"):
        check_untouched("graph", inputs, before)


def test_a_session_is_timed_as_a_decode_loop(tiny_spec, tmp_path):
    """A session contender's steps continue the state each returned (as generation does), starting from the shared
    past without writing into it: its first two steps equal two graph-backend decode steps from that past."""
    from umc.runtime import load

    target = open_model(SPECS / "ultramem-tiny.yaml", tmp_path)
    model = eager_model(target)
    contender = model_contender("cpu", target, model, tmp_path)
    inputs = model_inputs(tiny_spec, 2, 3)
    before = versions(inputs)
    step = contender.step(inputs)
    with torch.no_grad():
        first, second = step(), step()
        session = load(target.build_dir, backend="graph", weights=model.state_dict())
        tokens, state = contender.adapt(inputs)
        want_first, state = session.decode(tokens, state)
        want_second, _ = session.decode(tokens, state)
    check_untouched("cpu", inputs, before)
    assert (first - want_first).abs().max() <= 1e-5 and (second - want_second).abs().max() <= 1e-5
    assert (second - first).abs().max() > 1e-3  # the second step did not decode from the shared past again


def test_peak_rss_is_measured_in_a_fresh_process(tmp_path):
    target = open_model(SPECS / "ultramem-tiny.yaml", tmp_path)
    peak = measure_peak({"mode": "model", "contender": EAGER, "batch": 2, "past": 4, "build_dir": str(target.build_dir),
                         "weights_file": None, "workdir": str(tmp_path), "torch_threads": 1})
    assert "error" not in peak, peak
    assert peak["peak_rss_bytes"] >= peak["rss_before_steps_bytes"] > peak["rss_after_imports_bytes"] > 0


# ---------------------------------------------------------------- the command


def test_tiny_run_reports_every_backend_or_why_it_was_skipped(tmp_path):
    registry = list_backends()
    out = tmp_path / "bench.json"
    plot = ["--plot", tmp_path / "bench.png"] if _has_matplotlib() else []
    result = invoke(TINY, "--backends", ",".join([EAGER, *registry]), "--batch", "1,2", "--past", "0,4", *FAST,
                    "--json", out, *plot)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    ran = {(r["backend"], r["batch"], r["past"]) for r in data["results"]}
    skipped = data["skipped"]
    expected_skips = {name: reason for name, reason in registry.items() if reason is not None}
    if not torch.cuda.is_available():
        expected_skips["triton"] = TRITON_WITHOUT_GPU
    assert skipped == expected_skips
    for name in [EAGER, *registry]:
        if name not in skipped:
            assert {(name, b, p) for b in (1, 2) for p in (0, 4)} <= ran, name
            assert f"skipped: {name}" not in result.stdout
        else:
            assert f"skipped: {name}: {skipped[name]}" in result.stdout
    for row in data["results"]:
        assert row["n"] == 9 and len(row["samples_s"]) == 9
        assert row["p10_s"] <= row["median_s"] <= row["p90_s"]
        assert row["bandwidth_fraction"] == pytest.approx(row["bandwidth_limit_s"] / row["median_s"])
        assert row["tokens_per_s"] == pytest.approx(row["batch"] / row["median_s"])
        if row["backend"] == EAGER:
            assert row["vs_eager"] == 1.0
    probes = data["probes"]
    assert probes["read_bandwidth"]["n"] == 4 * 9 and probes["read_bandwidth"]["bytes_per_s"] > 0
    assert probes["gemm"]["flops"] == 2 * 64 ** 3
    assert {(item["batch"], item["past"]) for item in data["limits"]} == {(1, 0), (2, 0), (1, 4), (2, 4)}
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch_threads"] >= 1
    assert "probe: read bandwidth" in result.stdout and "probe: fp32 GEMM" in result.stdout
    assert not plot or (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_a_build_directory_is_benched_without_being_written(tmp_path):
    build = umc.compile(TINY, tmp_path / "build").path
    before = {p: p.read_bytes() for p in build.rglob("*") if p.is_file()}
    out = tmp_path / "bench.json"
    result = invoke(build, "--backends", "eager,onnxruntime", "--batch", "1", "--past", "3", *FAST, "--json", out)
    assert result.exit_code == 0, result.output
    assert {(r["backend"], r["past"]) for r in json.loads(out.read_text())["results"]} == {
        (EAGER, 3), ("onnxruntime", 3)}
    assert {p: p.read_bytes() for p in build.rglob("*") if p.is_file()} == before  # exported in a copy


def test_torch_compile_failure_is_listed_as_skipped(monkeypatch, tmp_path):
    def broken(model):
        def call(*args):
            raise RuntimeError("cannot compile this\nsecond line of the story")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    out = tmp_path / "bench.json"
    result = invoke(TINY, "--backends", "eager,torch-compile", "--batch", "1", "--past", "0", *FAST, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["skipped"]["torch-compile"].endswith("RuntimeError: cannot compile this")
    assert {r["backend"] for r in data["results"]} == {EAGER}


def test_layer_only_on_a_golden_layer(tmp_path):
    golden = sorted(GOLDEN.glob("*.safetensors"))[0]
    out = tmp_path / "layer.json"
    result = invoke(TINY, "--layer-only", "--layer-config", golden, "--backends", "eager,graph", "--batch", "1,4",
                    *FAST, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["target"]["kind"] == "layer"
    rows = {(r["backend"], r["batch"]): r for r in data["results"]}
    assert set(rows) == {(n, b) for n in (EAGER, "graph") for b in (1, 4)}
    for (name, batch), row in rows.items():
        limits = next(item for item in data["limits"] if item["batch"] == batch)
        assert row["value_row_bytes_per_s"] == pytest.approx(limits["value_row_bytes"] / row["median_s"])


def test_plot_without_matplotlib_fails_before_running(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes ``import matplotlib`` raise ImportError
    result = invoke(TINY, "--plot", "out.png", *FAST)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --plot needs matplotlib, which is not installed (pip install 'matplotlib==3.11.2')"]
    assert "setting up" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,x"], "not a comma-separated list of integers"),
    (["--batch", "0"], "0 is below 1"),
    (["--backends", "eager,warp-drive"], "unknown backend 'warp-drive'"),
    (["--past", "256"], "max_seq_len is 256"),
    (["--reps", "3"], "--reps"),
    (["--layer-only", "--past", "4"], "does not apply to --layer-only"),
    (["--layer-only", "--layer-config", "no-such-layer"], "not 227m, spec, or a golden .safetensors file"),
    (["--layer-only", "--layer-config", "spec"], "not the authors' layer (differs in memory.query_conv)"),
])
def test_bad_input_exits_2_with_the_reason(args, message):
    result = invoke(TINY, *args, "--no-peak-memory")
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_missing_argument_exits_2(tmp_path):
    assert invoke(tmp_path / "nothing-here.yaml").exit_code == 2


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None
