"""What this machine can give a command: available memory, and a user-level refusal when a command needs more.

Commands that materialize a model (``umc verify``, ``umc eager``) compare what a spec needs
(``umc.cost.memory_needs``) with ``available_memory()`` before allocating, so a model too big
for the machine is one clear line (exit 2), not a swap storm or the OOM killer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

MEMINFO = Path("/proc/meminfo")


class ResourceError(ValueError):
    """A command needs more of this machine than it has: a user-level refusal (the CLI exits 2 with its one line)."""


def format_bytes(count: int) -> str:
    """Decimal units, one decimal: 47_100_000_000 -> '47.1 GB'."""
    for unit, size in (("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux 3.14+): free memory plus what the kernel can
    reclaim without swapping (page cache, reclaimable slab). None where the file or the line is missing."""
    try:
        lines = MEMINFO.read_text(encoding="ascii").splitlines()
    except (OSError, ValueError):
        return None
    for line in lines:
        key, _, rest = line.partition(":")
        fields = rest.split()
        if key == "MemAvailable" and fields and fields[0].isdigit():
            return int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return None


def _sysconf_pages(name: str) -> int | None:
    """``sysconf(name)`` pages in bytes, or None where the platform lacks it."""
    try:
        pages, page_size = os.sysconf(name), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def available_memory() -> int:
    """Bytes of memory a new allocation can get without swapping.

    Linux: MemAvailable from /proc/meminfo, the kernel's own estimate. Elsewhere (or on a kernel
    without it): free physical pages, sysconf(SC_AVPHYS_PAGES), which understates since page cache is
    not counted; where that is missing too, all physical memory, sysconf(SC_PHYS_PAGES), which overstates.
    OSError when none of them can be read.
    """
    for source in (_meminfo_available, lambda: _sysconf_pages("SC_AVPHYS_PAGES"), lambda: _sysconf_pages("SC_PHYS_PAGES")):
        found = source()
        if found is not None:
            return found
    raise OSError("cannot tell how much memory this machine has (no /proc/meminfo MemAvailable, no sysconf page counts)")


def require_memory(needed: int, what: str, *, parts: Mapping[str, int] | None = None, hint: str = "") -> None:
    """Raise ResourceError unless ``needed`` bytes fit the available memory.

    The message is one line: ``what`` (the command and model), both numbers, ``parts`` as the
    breakdown of ``needed`` (e.g. weights, KV cache, working set) and ``hint`` (how to do it in less), e.g.
    ``umc verify ultramem-1.6b-x12: needs about 47.1 GB (weights 42.9 GB + ...), this machine has
    21.3 GB available; verify it in slices with --units/--blocks``.
    """
    available = available_memory()
    if needed <= available:
        return
    breakdown = f" ({' + '.join(f'{name} {format_bytes(size)}' for name, size in parts.items())})" if parts else ""
    advice = f"; {hint}" if hint else ""
    raise ResourceError(f"{what}: needs about {format_bytes(needed)}{breakdown}, "
                        f"this machine has {format_bytes(available)} available{advice}")
