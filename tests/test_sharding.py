"""Sharded value tables (``umc compile --shard P``, ``--nproc P``): the volume model, the partition pass and its
errors, and real multi-process runs on gloo compared with the unsharded build (logits, selections, per-rank table
memory, bytes exchanged against the model), plus a killed rank ending the job cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SPECS
from shard_worker import rank_tokens
from umc.compiler import BuildError, compile
from umc.runtime import load
from umc.runtime.backends import BackendError
from umc.runtime.checks import InputError
from umc.runtime.distributed import World
from umc.sharding import LookupShape, exchange_volume, per_token_bytes, shard_ranges

TINY = SPECS / "ultramem-tiny.yaml"
UMC = [str(Path(sys.executable).parent / "umc")]
PROMPT = 5


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The tiny spec's seeded weights as a safetensors file (what a rank reads its shard from)."""
    from umc.reference import build_model, save_weights
    from umc.spec import load_spec

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(build_model(load_spec(TINY)), path)
    return path


@pytest.fixture(scope="module")
def builds(tmp_path_factory, weights) -> dict[str, Path]:
    """The unsharded tiny build and number-/dimension-wise builds for 2 and 4 ranks."""
    root = tmp_path_factory.mktemp("builds")
    out = {"whole": compile(TINY, root / "whole", weights=weights).path}
    for shards in (2, 4):
        for partition in ("number", "dimension"):
            out[f"{partition}{shards}"] = compile(TINY, root / f"{partition}{shards}", weights=weights, shards=shards,
                                                  partition=partition).path
    return out


def test_shard_ranges_cover_in_order_and_differ_by_at_most_one():
    for total, shards in ((64, 2), (64, 3), (5, 4), (32, 32), (1024, 512)):
        ranges = shard_ranges(total, shards)
        assert [start for start, _ in ranges] == [0] + [stop for _, stop in ranges[:-1]]
        assert ranges[-1][1] == total
        sizes = [stop - start for start, stop in ranges]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("shards", [2, 8, 64])
def test_volume_model_reduces_to_the_papers_forms(shards):
    """One head, one core, one block, int32 addresses, 2-byte values and scores: DESIGN.md §6's per-query forms."""
    vdim = 512
    shape = LookupShape(heads=1, topm=16, cores=1, blocks=1, rows=1000, vdim=vdim, value_bytes=2, score_bytes=2)
    m, p = 16, shards
    assert per_token_bytes("number", shape, p) == pytest.approx((4 + 2 * vdim) * m * (p - 1) / p)
    assert per_token_bytes("dimension", shape, p) == pytest.approx(6 * m * (p - 1) + 2 * vdim * (p - 1) / p)


def test_auto_partition_of_the_1_6b_model(tmp_path):
    """The largest spec compiles without weights at P = 8, 64, 512; auto picks the smaller predicted volume."""
    picked = {}
    for shards in (8, 64, 512):
        build = compile(SPECS / "ultramem-1.6b-x12.yaml", tmp_path / str(shards), shards=shards)
        report = json.loads((build.path / "report.json").read_text())["sharding"]
        assert report["shards"] == shards and len(report["units"]) == 6
        unit = report["units"][0]
        per = unit["bytes_per_token"]
        assert unit["partition"] == min(per, key=per.get)
        assert unit["table_bytes"]["largest_shard"] * shards == pytest.approx(unit["table_bytes"]["whole"], rel=0.01)
        picked[shards] = unit["partition"]
    assert picked == {8: "dimension", 64: "dimension", 512: "number"}


def test_partition_errors_are_user_errors(tmp_path):
    with pytest.raises(BuildError, match="at least one column per rank"):
        compile(TINY, tmp_path / "a", shards=64, partition="dimension")
    with pytest.raises(BuildError, match="kernel_fusion"):
        compile(TINY, tmp_path / "b", shards=2, passes=())
    with pytest.raises(BuildError, match="--shard is 0"):
        compile(TINY, tmp_path / "c", shards=0)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_world_and_shard_count_must_agree(builds):
    with pytest.raises(InputError, match="run it with --nproc 2"):
        load(builds["number2"])
    with pytest.raises(InputError, match="not sharded"):
        load(builds["whole"], world=World(0, 2))
    with pytest.raises(BackendError, match="does not run sharded builds"):
        load(builds["number2"], backend="onnxruntime", world=World(0, 2))


def test_cli_refuses_a_mismatched_nproc_before_launching(builds):
    for args, wanted in ((["--nproc", "3"], "run it with --nproc 2"), ([], "run it with --nproc 2")):
        done = subprocess.run([*UMC, "run", str(builds["number2"]), "--prompt", "1 2", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and wanted in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([*UMC, "export", str(builds["number2"]), "--format", "onnx"], capture_output=True, text=True)
    assert done.returncode == 2 and "without --shard" in done.stderr


def _run_ranks(tmp_path: Path, builds: dict[str, Path], shards: int, backend: str, fault: str | None = None):
    """Run tests/shard_worker.py as ``shards`` processes; the output directory."""
    out = tmp_path / "out"
    out.mkdir()
    job = {"world": shards, "out": str(out), "rendezvous": str(tmp_path / "rendezvous"), "timeout_s": 60,
           "backend": backend, "builds": {p: str(builds[f"{p}{shards}"]) for p in ("number", "dimension")},
           "batches": [2 + rank % 2 for rank in range(shards)], "prompt": PROMPT, "volume_batch": 16,
           "volume_steps": 3, "fault": fault}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "shard_worker.py"), str(tmp_path / "job.json"),
                               str(rank)], env=env, stderr=subprocess.PIPE, text=True) for rank in range(shards)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    return out, job


def _max_differences(out: Path, job: dict, whole: Path, backend: str, partition: str) -> tuple[float, bool]:
    """Largest |sharded - unsharded| over every rank's logits, and whether every selection is identical."""
    session = load(whole, backend=backend)
    worst, same = 0.0, True
    for rank, batch in enumerate(job["batches"]):
        got = load_file(str(out / f"{partition}.rank{rank}.safetensors"))
        tokens = rank_tokens(1, rank, batch, PROMPT + 2, session.spec.model.vocab_size)
        logits, state, taps = session.trace_prefill(tokens[:, :PROMPT])
        for unit, stages in taps.items():
            for stage in ("rows", "cols", "grid"):
                same &= torch.equal(stages[stage], got[f"prefill.tap{unit}.{stage}"])
        worst = max(worst, (logits - got["prefill"]).abs().max().item())
        for step in range(2):
            logits, state = session.decode(tokens[:, PROMPT + step:PROMPT + step + 1], state)
            worst = max(worst, (logits - got[f"decode{step}"]).abs().max().item())
    return worst, same


@pytest.mark.parametrize("shards, backend", [(2, "graph"), (4, "cpu")])
def test_sharded_ranks_equal_the_unsharded_model(tmp_path, builds, shards, backend):
    """Each rank decodes its own sequences (batch sizes differ between ranks); logits equal the unsharded build's
    within 1e-5 (float32), selections exactly; each rank holds 1/P of every table; the bytes each decode step sends
    (summed over ranks, from the tensors handed to the collectives) are the model's within 10%."""
    out, job = _run_ranks(tmp_path, builds, shards, backend)
    whole = load(builds["whole"], backend=backend)
    for partition in ("number", "dimension"):
        worst, same = _max_differences(out, job, builds["whole"], backend, partition)
        assert same and worst <= 1e-5, (partition, worst)
        records = [json.loads((out / f"{partition}.rank{r}.json").read_text()) for r in range(shards)]
        graph = whole.graphs["decode"]
        tables = {n.inputs[0].name: n for n in graph.nodes if n.op == "lookup_pool"}
        predicted = 0.0
        for name, node in tables.items():
            rows, vdim = node.inputs[0].type.shape
            axis_size = rows if partition == "number" else vdim
            for rank, record in enumerate(records):
                held = record["table_bytes"][name] // 4
                part = held // (vdim if partition == "number" else rows)
                assert abs(part - axis_size / shards) < 1, (name, rank, part)
            shape = LookupShape(heads=node.inputs[1].type.shape[2], topm=node.inputs[1].type.shape[3],
                                cores=node.inputs[2].type.shape[-1], blocks=node.attr("E"), rows=rows, vdim=vdim,
                                value_bytes=4, score_bytes=4)
            predicted += sum(exchange_volume(partition, shape, shards, job["volume_batch"]).values())
        for step in range(job["volume_steps"]):
            measured = sum(sum(record["steps"][step].values()) for record in records)
            assert abs(measured - predicted) <= 0.10 * predicted, (partition, step, measured, predicted)


def test_a_wrong_shard_is_caught(tmp_path, builds):
    """The equality check fails when a rank scales its value columns by the wrong core (an injected bug)."""
    out, job = _run_ranks(tmp_path, builds, 2, "graph", fault="wrong_core")
    worst, same = _max_differences(out, job, builds["whole"], "graph", "dimension")
    assert not same and worst > 1e-3


def test_umc_run_and_verify_with_nproc(builds):
    """``umc run --nproc 2`` prints what the unsharded build generates; ``umc verify --nproc 2`` passes."""
    args = ["--prompt", "1 5 7 9", "--max-new-tokens", "6"]
    whole = subprocess.run([*UMC, "run", str(builds["whole"]), *args], capture_output=True, text=True, timeout=300)
    sharded = subprocess.run([*UMC, "run", str(builds["dimension2"]), *args, "--nproc", "2", "--backend", "cpu"],
                             capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0 and sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == whole.stdout and len(whole.stdout.split()) == 6
    assert "rank 0 of 2" in sharded.stderr
    verified = subprocess.run([*UMC, "verify", str(builds["number2"]), "--nproc", "2", "--steps", "2"],
                              capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0 and "OK:" in verified.stdout, verified.stdout + verified.stderr


@pytest.mark.parametrize("sig, wanted", [
    (signal.SIGKILL, "rank 1 died without finishing (killed by signal 9)"),
    (signal.SIGSTOP, "rank 1 did not answer within the 5 s timeout; the launcher stopped it"),
])
def test_a_dead_or_hung_rank_ends_the_job_with_its_name(tmp_path, builds, sig, wanted):
    """SIGKILL one rank mid-run, or stop it (a hang): the job exits 3 within the 5 s timeout plus seconds, naming
    the rank; no traceback."""
    env = {**os.environ, "UMC_RUN_DIR": str(tmp_path)}
    job = subprocess.Popen([*UMC, "run", str(builds["number2"]), "--prompt", "1 5 7 9", "--max-new-tokens", "240",
                            "--nproc", "2", "--timeout", "5"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "rank-1.pid"
    deadline = time.monotonic() + 120
    while not pid_file.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.1)
    assert pid_file.exists(), job.communicate()
    time.sleep(1.0)
    killed = time.monotonic()
    os.kill(int(pid_file.read_text()), sig)
    _, err = job.communicate(timeout=60)
    assert time.monotonic() - killed < 5 + 15
    assert job.returncode == 3
    assert wanted in err
    assert "Traceback" not in err


def test_umc_bench_with_nproc(builds):
    """``umc bench --nproc 2``: a row per backend and batch; dimension-wise, the bytes measured per step are exactly
    the model's (no address-dependent part)."""
    done = subprocess.run([*UMC, "bench", str(builds["dimension2"]), "--nproc", "2", "--batch", "3", "--reps", "9",
                           "--warmup", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["graph"], ["cpu"])]
    assert [r[0] for r in rows] == ["graph", "cpu"]
    for row in rows:
        assert row[1] == "3" and row[-2] == row[-1] and int(row[-1]) > 0
