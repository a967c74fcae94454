"""umc.resources: available memory from /proc/meminfo (or sysconf), and the one-line refusal when a command needs more."""

from __future__ import annotations

import pytest

from umc import resources
from umc.resources import ResourceError, available_memory, format_bytes, require_memory

MEMINFO = """\
MemTotal:       24576000 kB
MemFree:         1024000 kB
MemAvailable:   20800000 kB
Buffers:          102400 kB
"""


@pytest.fixture
def meminfo(tmp_path, monkeypatch):
    """Point umc.resources at a meminfo file of the test's own."""
    path = tmp_path / "meminfo"
    monkeypatch.setattr(resources, "MEMINFO", path)
    return path


def test_available_memory_reads_mem_available(meminfo):
    meminfo.write_text(MEMINFO)
    assert available_memory() == 20800000 * 1024


def fake_sysconf(monkeypatch, **known: int) -> None:
    """os.sysconf knowing only ``known`` names; like the real one, ValueError for the others."""
    def sysconf(name: str) -> int:
        if name not in known:
            raise ValueError(f"unrecognized configuration name {name}")
        return known[name]

    monkeypatch.setattr(resources.os, "sysconf", sysconf)


def test_without_mem_available_it_falls_back_to_free_pages(meminfo, monkeypatch):
    meminfo.write_text("MemTotal: 24576000 kB\nMemFree: 1024000 kB\n")  # a kernel before 3.14
    fake_sysconf(monkeypatch, SC_AVPHYS_PAGES=1000, SC_PHYS_PAGES=6000, SC_PAGE_SIZE=4096)
    assert available_memory() == 1000 * 4096


def test_without_free_pages_it_falls_back_to_physical_memory(meminfo, monkeypatch):
    fake_sysconf(monkeypatch, SC_PHYS_PAGES=6000, SC_PAGE_SIZE=4096)  # no meminfo file, no free-page count
    assert available_memory() == 6000 * 4096


def test_no_source_at_all_is_an_os_error(meminfo, monkeypatch):
    fake_sysconf(monkeypatch)
    with pytest.raises(OSError, match="cannot tell how much memory this machine has"):
        available_memory()


def test_this_machine_reports_something_plausible():
    assert 2**20 < available_memory() < 2**50


@pytest.mark.parametrize("count, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (47_100_000_000, "47.1 GB"),
                                         (21_300_000_000, "21.3 GB"), (3 * 10**15, "3.0 PB")])
def test_format_bytes(count, text):
    assert format_bytes(count) == text


def test_require_memory_refuses_with_both_numbers(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 21_300_000_000)
    with pytest.raises(ResourceError) as info:
        require_memory(47_100_000_000, "umc verify ultramem-1.6b-x12",
                       parts={"weights": 42_900_000_000, "KV cache": 600_000_000, "working set": 3_600_000_000},
                       hint="verify it in slices with --units/--blocks")
    assert str(info.value) == ("umc verify ultramem-1.6b-x12: needs about 47.1 GB (weights 42.9 GB + KV cache 600.0 MB + "
                               "working set 3.6 GB), this machine has 21.3 GB available; verify it in slices with --units/--blocks")
    assert isinstance(info.value, ValueError)


def test_require_memory_without_breakdown_or_hint(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 1_000_000)
    with pytest.raises(ResourceError, match=r"^umc eager tiny: needs about 2.0 MB, this machine has 1.0 MB available$"):
        require_memory(2_000_000, "umc eager tiny")


def test_require_memory_passes_when_it_fits(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 2_000_000)
    assert require_memory(2_000_000, "umc eager tiny") is None
