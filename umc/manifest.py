"""Build manifests: sha256 of every file a build wrote, and reading them back.

A manifest is trusted only as far as it is checked: its build format must be this umc's, and
every artifact name must be a normalized relative path naming a regular file inside the build
(a forged ``../../etc/passwd`` or a symlink out of the directory is an error, not a file to hash).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from umc import __version__

# what a build directory holds and how; 1 = builds written before the manifest recorded it; 3 = with decode_ragged
BUILD_FORMAT = 3


class BuildDirError(ValueError):
    """A build directory that is missing, incomplete or modified."""


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks (weights can be tens of GB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def parse_manifest(build_dir: Path) -> dict:
    """The manifest of a build directory of any build format: valid JSON with a umc version and an
    artifacts table of safe names (see ``check_artifact_name``); hashes and format not checked."""
    path = build_dir / "manifest.json"
    if not path.is_file():
        raise BuildDirError(f"{build_dir}: no manifest.json (not a umc build directory, or an incomplete one)")
    try:
        manifest = json.loads(path.read_text())
        artifacts = manifest["artifacts"]
        if not isinstance(artifacts, dict) or not isinstance(manifest["umc_version"], str):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BuildDirError(f"{path}: not a valid manifest (expected JSON with umc_version and an artifacts table)") from None
    for name, digest in artifacts.items():
        check_artifact_name(build_dir, name)
        if not isinstance(digest, str):
            raise BuildDirError(f"{path}: artifact {name!r} has no sha256 string")
    return manifest


def check_artifact_name(build_dir: Path, name: str) -> None:
    """BuildDirError naming the entry unless ``name`` is a normalized relative POSIX path that stays
    inside ``build_dir`` (through symlinks too) and does not itself name a symlink."""
    where = f"{build_dir}/manifest.json: artifact {name!r}"
    if not name:
        raise BuildDirError(f"{where} is empty; artifacts are relative paths inside the build")
    if "\0" in name:
        raise BuildDirError(f"{where} contains a NUL character")
    if "\\" in name:
        raise BuildDirError(f"{where} contains a backslash; artifacts are '/'-separated relative paths")
    if name.startswith("/"):
        raise BuildDirError(f"{where} is absolute; artifacts are relative paths inside the build")
    parts = name.split("/")
    if ".." in parts:
        raise BuildDirError(f"{where} has a '..' component; artifacts stay inside the build")
    if "" in parts or "." in parts:
        raise BuildDirError(f"{where} is not normalized (empty or '.' components)")
    file = build_dir / name
    if file.is_symlink():
        raise BuildDirError(f"{where} is a symlink; a build holds only regular files")
    root = build_dir.resolve()
    if root not in file.resolve().parents:
        raise BuildDirError(f"{where} resolves outside the build directory (through a symlink)")


def check_build_format(build_dir: Path, manifest: dict) -> None:
    """BuildDirError unless the manifest was written in this umc's build format."""
    found = manifest.get("build_format", 1)
    if type(found) is not int:
        raise BuildDirError(f"{build_dir}/manifest.json: not a valid manifest (build_format {found!r} is not an integer)")
    if found != BUILD_FORMAT:
        raise BuildDirError(f"{build_dir} was built with umc {manifest['umc_version']} (build format {found}); "
                            f"this is umc {__version__} (build format {BUILD_FORMAT}): recompile it with umc compile")


def read_manifest(build_dir: Path, check_hashes: bool = True) -> dict:
    """The manifest of a build directory of this build format; with ``check_hashes``, every listed
    file's sha256 checked too."""
    manifest = parse_manifest(build_dir)
    check_build_format(build_dir, manifest)
    for name, digest in manifest["artifacts"].items() if check_hashes else ():
        file = build_dir / name
        if not file.is_file() or file_sha256(file) != digest:
            raise BuildDirError(f"{build_dir}: {name} is missing or was modified after the build")
    return manifest


def present_files(build_dir: Path) -> list[str]:
    """Every entry under ``build_dir`` that is not a directory (symlinks included, never followed),
    as sorted '/'-separated relative names."""
    found = []
    pending = [build_dir]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                else:
                    found.append(Path(entry.path).relative_to(build_dir).as_posix())
    return sorted(found)


def unlisted_files(build_dir: Path, manifest: dict) -> list[str]:
    """Files present in ``build_dir`` that ``manifest`` does not list (manifest.json itself excluded),
    sorted: what a user or another program put into a build."""
    listed = set(manifest["artifacts"]) | {"manifest.json"}
    return [name for name in present_files(build_dir) if name not in listed]
