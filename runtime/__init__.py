"""Runtimes: execute compiled graphs. ``load(build_dir, backend="graph", weights=...)`` opens a build."""
from umc.manifest import BuildDirError
from umc.runtime.backends import BACKENDS, Backend, BackendError, list_backends, lookup_backend, register_backend
from umc.runtime.checks import BindError, InputError
from umc.runtime.session import Session, load, read_build

__all__ = ["BACKENDS", "Backend", "BackendError", "BindError", "BuildDirError", "InputError", "Session",
           "list_backends", "load", "lookup_backend", "read_build", "register_backend"]
