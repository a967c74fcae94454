"""Running an exporter on a build directory: staged, moved into place, listed in the manifest.

The format's files are written into a private staging directory inside the build; only when the
writer has finished does the staging directory become ``<build>/<subdir>`` and the manifest list
every file with its sha256 (written atomically). An interrupted export leaves no partial
``<subdir>`` and an unchanged manifest; a finished one is checked like every other artifact.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from umc.export import FORMATS, ExportContext, ExportError
from umc.fsutil import exclusive_lock
from umc.manifest import BuildDirError, file_sha256, parse_manifest, present_files

def formats() -> dict[str, str]:
    """Every export format -> its one-line description. The package's modules are imported on first use (each
    format registers itself; nothing lists them); one that fails to import is reported, not hidden."""
    import umc.export as package

    for module in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"umc.export.{module.name}")
        except ImportError as exc:
            raise ExportError(f"export module umc.export.{module.name} cannot be imported: {exc}") from None
    return {name: fmt.doc.splitlines()[0] if fmt.doc else "" for name, fmt in sorted(FORMATS.items())}


def _weights(build, weights: str | Path | Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor] | None:
    """The weights to export: given ones (checked against the graphs), else the build's own, else None."""
    from umc.runtime.checks import check_weights
    from umc.runtime.session import load_weights_file

    weights = build.weights_file if weights is None else weights
    if weights is None:
        return None
    if not isinstance(weights, Mapping):
        weights = load_weights_file(weights)
    check_weights(build.graphs, weights)
    return weights


def _install(build_dir: Path, staging: Path, subdir: str, force: bool) -> list[str]:
    """Make ``staging`` the build's ``subdir`` and list its files in the manifest (under the build's lock)."""
    with exclusive_lock(build_dir):
        manifest = parse_manifest(build_dir)
        target = build_dir / subdir
        if target.exists():
            owned = {name for name in manifest["artifacts"] if name.startswith(f"{subdir}/")}
            found = {f"{subdir}/{name}" for name in present_files(target)}
            if found - owned and not force:
                raise ExportError(f"{target} holds files umc did not write ({', '.join(sorted(found - owned)[:3])}); "
                                  "move them away or pass --force to replace the directory")
            trash = Path(tempfile.mkdtemp(prefix=f".{subdir}.old.", dir=build_dir))
            os.replace(target, trash / subdir)
        else:
            trash = None
        os.replace(staging, target)
        artifacts = {k: v for k, v in manifest["artifacts"].items() if not k.startswith(f"{subdir}/")}
        files = [f"{subdir}/{name}" for name in present_files(target)]
        artifacts.update({name: file_sha256(build_dir / name) for name in files})
        manifest["artifacts"] = dict(sorted(artifacts.items()))
        scratch = build_dir / ".manifest.json.partial"
        scratch.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(scratch, build_dir / "manifest.json")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return files


def export(build_dir: str | Path, fmt: str, *, weights: str | Path | Mapping[str, torch.Tensor] | None = None,
           options: dict[str, Any] | None = None, force: bool = False) -> list[str]:
    """Export the build in ``build_dir`` as ``fmt``; the lines to show the user (what was written, what was not run).
    ExportError/BuildDirError for user problems (unknown format, missing prerequisite, foreign files)."""
    from umc.report import build_shards
    from umc.runtime.session import read_build

    known = formats()
    if fmt not in known:
        raise ExportError(f"unknown export format {fmt!r} (allowed: {', '.join(known)})")
    build = read_build(build_dir)
    shards = build_shards(build.graphs["decode"])
    if shards > 1:
        raise ExportError(f"{build.path} splits its value tables over {shards} ranks (torch.distributed); exports "
                          "hold whole tables: export a build compiled without --shard")
    if not os.access(build.path, os.W_OK):
        raise BuildDirError(f"{build.path}: the build directory is not writable")
    target = FORMATS[fmt]
    staging = Path(tempfile.mkdtemp(prefix=f".{target.subdir}.", suffix=".partial", dir=build.path))
    staging.chmod(0o755)  # mkdtemp makes it private; it becomes an ordinary build directory
    try:
        ctx = ExportContext(build, staging, _weights(build, weights), dict(options or {}))
        target.write(ctx)
        files = _install(build.path, staging, target.subdir, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [*ctx.messages, f"{len(files)} files in {build.path / target.subdir} (listed in the manifest)"]
