"""Ahead-of-time compilation of a build's kernels for NVIDIA GPUs, without a GPU.

``compile_kernels(directory, targets)`` runs this module in a fresh interpreter (Triton's interpreter
switched off, a private cache directory): each kernel file is compiled with ``triton.compile`` for each
target (``GPUTarget("cuda", cc, 32)``), ``<name>.sm_XX.ptx`` and ``.cubin`` are written next to it, and
what each kernel uses (registers, shared memory, local and scratch memory, warps, PTX version) comes back.
A kernel needing more shared memory per block than the target has is an error naming it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_LIMITS = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}  # bytes per block (opt-in maximum)
NUM_WARPS = 4  # Triton's default, as the launch functions use it
TIMEOUT_S = 1800


class AOTError(ValueError):
    """A kernel that cannot be compiled for a target (the message names the kernel and why)."""


def parse_targets(text: str) -> tuple[int, ...]:
    """"sm_80,sm_90" -> (80, 90); AOTError naming what is not a known target."""
    targets = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"sm_(\d+)a?", part)
        if match is None or int(match.group(1)) not in SHARED_LIMITS:
            raise AOTError(f"unknown target {part!r} (allowed: {', '.join(f'sm_{cc}' for cc in SHARED_LIMITS)})")
        targets.append(int(match.group(1)))
    if not targets:
        raise AOTError("no target given (allowed: e.g. sm_80,sm_90)")
    return tuple(dict.fromkeys(targets))


def compile_kernels(directory: Path, targets: tuple[int, ...], ptx_version: int | None = None) -> dict:
    """Compile every kernel file in ``directory`` for ``targets`` in a subprocess; per kernel and target, what it
    uses. AOTError when a compile fails or a kernel needs more shared memory than a target has."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="umc-triton-cache-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in the build
        command = [sys.executable, "-B", "-m", "umc.kernels.aot", str(directory), ",".join(map(str, targets)),
                   str(ptx_version or 0)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AOTError(f"compiling the kernels took longer than {TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise AOTError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "the compiler process failed")
    try:
        compiled = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AOTError(f"the compiler process gave no result: {done.stdout[-300:]!r}") from None
    for name, per_target in compiled.items():
        for target, use in per_target.items():
            limit, constants = SHARED_LIMITS[int(target[3:])], use.pop("constants")
            if use["shared_bytes"] > limit:
                raise AOTError(f"kernel {name} needs {use['shared_bytes']} bytes of shared memory per block, more than "
                               f"{target} has ({limit}); it was specialized for {constants}")
    return compiled


def _resource_usage(cubin: Path) -> dict[str, int]:
    """REG, SHARED, LOCAL, STACK of the cubin's function, from Triton's bundled cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", out))
    return {"registers": int(usage["REG"]), "shared_static_bytes": int(usage["SHARED"]),
            "local_bytes": int(usage["LOCAL"]), "stack_bytes": int(usage["STACK"])}


def _compile_all(directory: Path, targets: list[int], ptx_version: int) -> dict:
    """In the child process: compile every kernel file for every target, write PTX and cubins, report use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for path in sorted(directory.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"umc_aot_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        per_target = {}
        for cc in targets:
            options = {"num_warps": NUM_WARPS, **({"ptx_version": ptx_version} if ptx_version else {})}
            source = ASTSource(fn=module.KERNEL, signature=module.SIGNATURE, constexprs=module.CONSTANTS)
            compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
            cubin = directory / f"{path.stem}.sm_{cc}.cubin"
            (directory / f"{path.stem}.sm_{cc}.ptx").write_text(compiled.asm["ptx"])
            cubin.write_bytes(compiled.asm["cubin"])
            version = re.search(r"^\.version (\S+)", compiled.asm["ptx"], re.M).group(1)
            target = re.search(r"^\.target (\S+)", compiled.asm["ptx"], re.M).group(1)
            shared = int(compiled.metadata.shared)
            per_target[f"sm_{cc}"] = {
                "constants": module.CONSTANTS,
                "ptx_target": target, "ptx_version": version, "num_warps": int(compiled.metadata.num_warps),
                "shared_bytes": shared, "global_scratch_bytes": int(compiled.metadata.global_scratch_size),
                "profile_scratch_bytes": int(compiled.metadata.profile_scratch_size),
                **_resource_usage(cubin)}
        results[path.stem] = per_target
    return results


if __name__ == "__main__":
    folder, target_list, version = sys.argv[1:4]
    try:
        found = _compile_all(Path(folder), [int(t) for t in target_list.split(",")], int(version))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        sys.stderr.write(f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}\n")
        sys.exit(1)
    json.dump(found, sys.stdout)
