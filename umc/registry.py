"""Registries keyed by op name (one per concern: torch implementations, forced selections, kernel renderers):
the decorator that fills one, refusing a second entry for the same op."""

from __future__ import annotations

from typing import Callable, TypeVar

Entry = TypeVar("Entry", bound=Callable)


def registrar(table: dict[str, Callable], what: str) -> Callable[[str], Callable[[Entry], Entry]]:
    """A decorator factory: ``@register(op)`` puts the function in ``table`` under ``op``, once (ValueError on a
    second ``what`` for the same op)."""

    def register(op: str) -> Callable[[Entry], Entry]:
        def wrap(fn: Entry) -> Entry:
            if op in table:
                raise ValueError(f"op {op} has two {what}")
            table[op] = fn
            return fn

        return wrap

    return register
