"""Build manifests: sha256 of every file a build wrote, and reading them back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class BuildDirError(ValueError):
    """A build directory that is missing, incomplete or modified."""


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks (weights can be tens of GB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(build_dir: Path, check_hashes: bool = True) -> dict:
    """The manifest of a build directory; with ``check_hashes``, every listed file's sha256 checked too."""
    path = build_dir / "manifest.json"
    if not path.is_file():
        raise BuildDirError(f"{build_dir}: no manifest.json (not a umc build directory, or an incomplete one)")
    try:
        manifest = json.loads(path.read_text())
        artifacts = dict(manifest["artifacts"])
        manifest["umc_version"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BuildDirError(f"{path}: not a valid manifest (expected JSON with umc_version and an artifacts table)") from None
    for name, digest in artifacts.items() if check_hashes else ():
        file = build_dir / name
        if not file.is_file() or file_sha256(file) != digest:
            raise BuildDirError(f"{build_dir}: {name} is missing or was modified after the build")
    return manifest
