"""The oracle stays independent: umc.reference imports nothing from the compiler side, and vice versa."""

import ast
from pathlib import Path

from conftest import ROOT

COMPILER_SIDE = ("umc.ir", "umc.lower", "umc.passes", "umc.kernels", "umc.runtime")


def imported_modules(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


def test_reference_imports_no_compiler_module():
    bad = {m for m in imported_modules(ROOT / "umc" / "reference") if m.startswith(COMPILER_SIDE)}
    assert not bad


def test_compiler_imports_no_reference_module():
    folders = [ROOT / "passes", ROOT / "kernels", ROOT / "runtime", ROOT / "umc" / "ir"]
    bad = {m for f in folders if f.exists() for m in imported_modules(f) if m.startswith("umc.reference")}
    assert not bad
