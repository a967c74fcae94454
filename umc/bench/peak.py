"""Peak RSS while one contender decodes, measured in a fresh process holding that contender alone.

``ru_maxrss`` is process-wide and only ever grows, so in the bench's own process (every contender loaded,
a large probe buffer) it cannot say what one backend needs. Each contender is therefore built again in a
child process (``python -m umc.bench.peak REQUEST``): after its imports the child notes its RSS, builds the
weights and the contender, runs two warm-up steps (a compile happens here), notes its RSS again, resets the
kernel's peak-RSS mark (Linux: ``/proc/self/clear_refs``), runs three steps and reports the peak since the
reset: what the process holds (weights, contender, past) plus the largest working set of a step. Where the
mark cannot be reset the peak is ``ru_maxrss``, which includes the setup, and the method says so.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from umc.bench.contenders import (COMPILED, EAGER, ModelTarget, eager_layer, eager_model, layer_contender,
                                  layer_inputs, model_contender, model_inputs, open_layer)
from umc.runtime import read_build

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
WARMUP_STEPS = 2
MEASURED_STEPS = 3
RESET_METHOD = "VmHWM over the decode steps (peak mark reset after warm-up)"
WHOLE_PROCESS_METHOD = "ru_maxrss of the whole child process (the peak mark could not be reset: setup included)"


def _status_bytes(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes (None off Linux)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_peak_rss() -> int:
    """This process's peak RSS since it started (``ru_maxrss``), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss() -> int | None:
    """This process's resident set size now, in bytes (None off Linux)."""
    return _status_bytes("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process to its current RSS; False where that is not possible."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _contender_step(request: dict):
    """Build what ``request`` names (as the bench does) and return its prepared step."""
    batch = request["batch"]
    if request["mode"] == "layer":
        target = open_layer(request["layer"], Path(request["source"]) if request["source"] else None)
        name = request["contender"]
        contender = layer_contender(name, target, eager_layer(target) if name in (EAGER, COMPILED) else None)
        return contender.step(layer_inputs(target, batch))
    build_dir = Path(request["build_dir"])
    weights = Path(request["weights_file"]) if request["weights_file"] else None
    target = ModelTarget(build_dir, read_build(build_dir).spec, weights)
    contender = model_contender(request["contender"], target, eager_model(target), Path(request["workdir"]))
    return contender.step(model_inputs(target.spec, batch, request["past"]))


def child(request: dict) -> dict:
    """In the child process: the contender's peak RSS over its decode steps, the RSS after imports and the RSS
    after its setup (weights, contender, past, warm-up steps), just before the measured steps."""
    if request.get("torch_threads"):
        torch.set_num_threads(request["torch_threads"])
    baseline = current_rss()
    with torch.no_grad():
        step = _contender_step(request)
        for _ in range(WARMUP_STEPS):
            step()
        ready = current_rss()
        resettable = reset_peak()
        for _ in range(MEASURED_STEPS):
            step()
    peak = _status_bytes("VmHWM") if resettable else process_peak_rss()
    return {"peak_rss_bytes": peak, "rss_after_imports_bytes": baseline, "rss_before_steps_bytes": ready,
            "method": RESET_METHOD if resettable else WHOLE_PROCESS_METHOD}


def measure_peak(request: dict, timeout: float = 3600.0) -> dict:
    """Run ``child(request)`` in a fresh interpreter; its result, or ``{"error": ...}`` saying why there is none."""
    try:
        done = subprocess.run([sys.executable, "-m", __name__, json.dumps(request)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"the measuring process ran past {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the measuring process failed (exit {done.returncode}): {last[:300]}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
