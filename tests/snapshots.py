"""Checked-in expected text (IR dumps). Set UMC_UPDATE_EXPECTED=1 to rewrite them after a reviewed change."""

import os
from pathlib import Path

EXPECTED = Path(__file__).resolve().parent / "expected"


def assert_matches_expected(name: str, text: str) -> None:
    """Compare ``text`` with tests/expected/NAME; a missing file or a difference fails with a diff hint."""
    path = EXPECTED / name
    if os.environ.get("UMC_UPDATE_EXPECTED") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"no expected text {path}; run with UMC_UPDATE_EXPECTED=1 and review it"
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        import difflib

        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "actual", n=2))
        raise AssertionError(f"IR text differs from {path}:\n{diff[:6000]}")
