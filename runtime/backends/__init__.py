"""The backend registry: one module per backend in this package, each registering one class.

A backend says its name, whether it can run here (and why not), and how to run a graph:
it is constructed with the graphs of a build (``prefill``/``decode``, or one ``layer``), their
weights and the build directory when there is one (``artifacts``: where generated kernels
live), binds the weights once, and ``run(kind, feeds, sizes)`` returns every named output of
that graph. Everything else — input, token and state checks, state bookkeeping,
selection taps, verification — lives in the session and the verifier, so adding a backend is
adding one module here (and its tests). Modules are discovered by name; nothing lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Mapping

import torch

from umc.ir.core import Graph


class BackendError(ValueError):
    """An unknown backend name, or a backend that cannot run on this machine (a user-level problem)."""


class Backend:
    """Base class: subclasses set ``name`` and implement ``run``; ``unavailable`` explains why not here."""

    name = ""
    shardable = False  # runs builds whose value tables are split over ranks (``world``)

    @classmethod
    def unavailable(cls) -> str | None:
        """None when the backend can run on this machine, else the reason it cannot."""
        return None

    def __init__(self, graphs: Mapping[str, Graph], weights: Mapping[str, torch.Tensor], threads: bool = True,
                 artifacts: Path | None = None, world=None):
        self.graphs = dict(graphs)
        self.threads = threads
        self.artifacts = artifacts
        self.world = world

    def run(self, kind: str, feeds: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
            force: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run graph ``kind`` on checked inputs (``sizes`` binds its symbolic dims); every named output.

        ``force`` maps tap outputs to selections the graph must use instead of its own (backends that
        cannot force raise BackendError; only verification of passes needs it).
        """
        raise NotImplementedError


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` available under ``cls.name`` (once)."""
    if not cls.name or cls.name in BACKENDS:
        raise ValueError(f"backend name {cls.name!r} is empty or registered twice")
    BACKENDS[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of this package; one that fails to import is listed as a backend that cannot run,
    with the error as the reason, instead of breaking every command."""
    for module in pkgutil.iter_modules(__path__):
        try:
            importlib.import_module(f"{__name__}.{module.name}")
        except Exception as exc:  # noqa: BLE001 - a broken optional backend must not take down the others
            reason = f"its module failed to import: {type(exc).__name__}: {exc}"
            BACKENDS.setdefault(module.name, type(module.name, (Backend,), {
                "name": module.name, "unavailable": classmethod(lambda cls, reason=reason: reason)}))


def list_backends() -> dict[str, str | None]:
    """Every registered backend -> None if it runs here, else why not."""
    return {name: cls.unavailable() for name, cls in sorted(BACKENDS.items())}


def lookup_backend(name: str) -> type[Backend]:
    """The backend class called ``name``; BackendError if unknown or unavailable here, listing the choices."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (available: {', '.join(n for n, r in list_backends().items() if r is None)})")
    reason = BACKENDS[name].unavailable()
    if reason is not None:
        raise BackendError(f"backend {name!r} cannot run here: {reason}")
    return BACKENDS[name]


_discover()
