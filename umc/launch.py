"""``--nproc P``: run one umc command as P ranks through torch.distributed's own launcher (torchrun), on this
machine, and end it cleanly.

The launching process starts ``python -m torch.distributed.run --standalone --nproc-per-node P -m umc``,
each rank running the same umc command line (passed in UMC_RANK_ARGV; a rank recognizes itself by torchrun's
RANK variable, so it runs the command instead of launching again), and waits. Each rank writes its
output to ``rank-K.out``/``rank-K.err`` in a run directory and, when it is done, ``rank-K.json`` with its exit code
and error; it writes ``rank-K.pid`` once it has joined the process group. The launcher streams rank 0's output
as it comes and, at the end, exits with the worst rank's code, naming every rank that failed: a rank with no
result died (killed, crashed); a rank whose collective timed out says so (``--timeout``), and a rank that never
answered is named as such. torchrun stops the other ranks as soon as one exits with an error; a rank that does not
go (a hung or stopped process ignores SIGTERM, and torchrun waits 30 s before SIGKILL) is killed by the launcher
``STRAGGLER_GRACE_S`` after the first failure. So a dead or hung rank ends the job within the timeout plus seconds.

The run directory is ``UMC_RUN_DIR`` when set (kept), else a temporary directory removed afterwards unless a
rank failed (then its logs are kept and named).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

RUN_DIR = "UMC_RUN_DIR"
TIMEOUT = "UMC_TIMEOUT_S"
ARGV = "UMC_RANK_ARGV"  # the command line each rank runs (not on torchrun's own, which would parse it)
DEFAULT_TIMEOUT_S = 120.0
STRAGGLER_GRACE_S = 2.0  # after a rank failed, how long the others get to finish before the launcher kills them
SEVERITY = (0, 1, 2, 3)  # exit codes, worst last (anything else counts as 3)
TORCHRUN_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def launched_rank() -> int | None:
    """This process's rank when a ``--nproc`` launch started it, else None."""
    if RUN_DIR in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def redirect_rank_output() -> None:
    """In a launched rank: stdout and stderr go to the run directory's ``rank-K.out``/``.err``."""
    rank = launched_rank()
    if rank is None:
        return
    run_dir = Path(os.environ[RUN_DIR])
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, suffix in ((1, "out"), (2, "err")):
        target = os.open(run_dir / f"rank-{rank}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)


def record_joined() -> None:
    """In a launched rank: say (``rank-K.pid``) that this process has joined the group."""
    rank = launched_rank()
    if rank is not None:
        (Path(os.environ[RUN_DIR]) / f"rank-{rank}.pid").write_text(str(os.getpid()))


def record_result(code: int, message: str = "") -> None:
    """In a launched rank: its exit code and error message (``rank-K.json``), written last."""
    rank = launched_rank()
    if rank is None:
        return
    path = Path(os.environ[RUN_DIR]) / f"rank-{rank}.json"
    path.write_text(json.dumps({"rank": rank, "exit": code, "message": message}))


def timeout_s() -> float:
    """The collective timeout a launched rank was given (seconds)."""
    return float(os.environ.get(TIMEOUT, DEFAULT_TIMEOUT_S))


def launch(argv: list[str], nproc: int, timeout: float) -> int:
    """Run ``umc <argv>`` as ``nproc`` ranks; the exit code of the job (the worst rank's). Rank 0's output is
    shown as it is written; every failed rank is named on stderr."""
    given = os.environ.get(RUN_DIR)
    run_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="umc-ranks-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", "--monitor-interval=0.1", "-m", "umc"]
    env = {**os.environ, RUN_DIR: str(run_dir), TIMEOUT: str(timeout), ARGV: json.dumps(argv),
           "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    with open(run_dir / "torchrun.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        streams = [_Follow(run_dir / "rank-0.out", sys.stdout), _Follow(run_dir / "rank-0.err", sys.stderr)]
        failed_at = None
        while process.poll() is None:
            for stream in streams:
                stream.pump()
            if failed_at is None and _any_failed(run_dir, nproc):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > STRAGGLER_GRACE_S:
                _kill_unfinished(run_dir, nproc)
            time.sleep(0.05)
        for stream in streams:
            stream.pump()
    code, lines = outcome(run_dir, nproc, (run_dir / "torchrun.log").read_text(errors="replace"), timeout)
    for line in lines:
        click.echo(line, err=True)
    if code and not given:
        click.echo(f"the ranks' logs are in {run_dir}", err=True)
    elif not given:
        shutil.rmtree(run_dir, ignore_errors=True)
    return code


def _any_failed(run_dir: Path, nproc: int) -> bool:
    """True once some rank has recorded a non-zero exit."""
    for rank in range(nproc):
        path = run_dir / f"rank-{rank}.json"
        try:
            if path.exists() and json.loads(path.read_text())["exit"] != 0:
                return True
        except (OSError, ValueError, KeyError):
            continue  # being written
    return False


def _kill_unfinished(run_dir: Path, nproc: int) -> None:
    """SIGKILL every rank that joined and has not finished: after another rank failed, it is hung or waiting on
    that rank (torchrun itself gives stopped workers 30 s after SIGTERM)."""
    for rank in range(nproc):
        pid_file = run_dir / f"rank-{rank}.pid"
        if pid_file.exists() and not (run_dir / f"rank-{rank}.json").exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError):
                pass


class _Follow:
    """Copies what a file gains to a stream."""

    def __init__(self, path: Path, stream):
        self.path, self.stream, self.offset = path, stream, 0

    def pump(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        if data:
            self.offset += len(data)
            self.stream.write(data.decode(errors="replace"))
            self.stream.flush()


def outcome(run_dir: Path, nproc: int, torchrun_log: str, timeout: float) -> tuple[int, list[str]]:
    """The job's exit code and what to say about the ranks that failed (rank 0's own messages were shown)."""
    exits = {int(rank): int(code) for rank, code in TORCHRUN_FAILURE.findall(torchrun_log)}
    results = {rank: json.loads(path.read_text()) for rank in range(nproc)
               if (path := run_dir / f"rank-{rank}.json").exists()}
    timed_out = any("Timed out" in r["message"] for r in results.values())
    code, lines = 0, []
    for rank in range(nproc):
        if rank not in results:
            how = exits.get(rank)
            joined = "" if (run_dir / f"rank-{rank}.pid").exists() else " before joining the process group"
            if timed_out:
                lines.append(f"error: rank {rank} did not answer within the {timeout:g} s timeout{joined}; "
                             "the launcher stopped it")
            else:
                cause = ("stopped by torchrun after another rank failed" if how == -15 else
                         f"killed by signal {-how}" if how is not None and how < 0 else
                         f"exit code {how}" if how is not None else "stopped after another rank failed")
                lines.append(f"error: rank {rank} died without finishing{joined} ({cause})")
            code = 3
            continue
        result = results[rank]
        rank_code = result["exit"] if result["exit"] in SEVERITY else 3
        if rank_code and rank:
            lines.append(f"error: rank {rank} exited {rank_code}" + (f": {result['message']}" if result["message"] else ""))
        code = max(code, rank_code)
    return code, lines


def nproc_options(command):
    """The ``--nproc`` and ``--timeout`` options of a command that can run as several ranks."""
    command = click.option("--timeout", type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT_S, show_default=True,
                           help="With --nproc: seconds a rank waits for another before the job fails.")(command)
    return click.option("--nproc", type=click.IntRange(1), default=1, show_default=True,
                        help="Run as this many ranks on this machine (torchrun, gloo); a sharded build needs its "
                             "--shard count.")(command)


def world_for(nproc: int, timeout: float, build=None):
    """In a rank a launch started: its world (joined). Otherwise, with ``nproc`` > 1: check it against the build's
    shard count (InputError), launch the ranks and exit with the job's code; with 1: None."""
    if launched_rank() is not None:
        from umc.runtime.distributed import World

        world = World.from_env(timeout_s())
        record_joined()
        return world
    if nproc == 1:
        return None
    if build is not None:
        from umc.runtime.session import check_shard_count

        check_shard_count(build, nproc)
    sys.exit(launch(sys.argv[1:], nproc, timeout))
