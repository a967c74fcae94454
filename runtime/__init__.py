"""Runtimes: execute compiled graphs. ``load(build_dir, backend="graph", weights=...)`` opens a build."""
from umc.runtime.session import BACKENDS, BuildDirError, Session, load

__all__ = ["BACKENDS", "BuildDirError", "Session", "load"]
