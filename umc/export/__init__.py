"""Exporters: a compiled build to files other engines run (ONNX, TensorRT plugin packages, serving repositories).

One module per format in this package, each registering one ``ExportFormat`` with ``export_format``.
An exporter writes into a fresh staging directory; ``umc.export.build.export`` moves the finished files
into the build under the format's own subdirectory and lists them in the build's manifest, so an
interrupted export never leaves files that look complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch


class ExportError(ValueError):
    """An export that cannot be done as asked (a user-level problem: missing prerequisite, bad option)."""


@dataclass
class ExportContext:
    """What an exporter gets: the verified build (``umc.runtime.session.BuildFiles``), the staging directory to
    write into (it becomes ``<build>/<format subdir>``), the weights when the build has them (else None: export
    the structure only), and the format's options."""

    build: Any
    out: Path
    weights: Mapping[str, torch.Tensor] | None
    options: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def say(self, message: str) -> None:
        """A line for the user (what was written, what was not run and why)."""
        self.messages.append(message)


@dataclass(frozen=True)
class ExportFormat:
    """A format: its name (``umc export --format NAME``), the build subdirectory it writes, and the writer."""

    name: str
    subdir: str
    write: Callable[[ExportContext], None]
    doc: str = ""


FORMATS: dict[str, ExportFormat] = {}


def export_format(name: str, subdir: str):
    """Decorator: register ``write(ctx)`` as format ``name`` writing ``<build>/<subdir>`` (its docstring is the doc)."""

    def wrap(write: Callable[[ExportContext], None]) -> Callable[[ExportContext], None]:
        if name in FORMATS:
            raise ValueError(f"export format {name} registered twice")
        FORMATS[name] = ExportFormat(name, subdir, write, (write.__doc__ or "").strip())
        return write

    return wrap
