"""The oracle stays independent: umc.reference imports nothing from the compiler side, and vice versa.
Also: every IR op has exactly one torch implementation."""

import ast
from pathlib import Path

from conftest import ROOT
from umc.ir.ops import OPS
from umc.runtime.torch_ops import TORCH_IMPLS

COMPILER_SIDE = ("umc.ir", "umc.lower", "umc.passes", "umc.kernels", "umc.runtime", "umc.compiler", "umc.report")
# source folder -> the package it installs as
PACKAGES = {ROOT / "umc": "umc", ROOT / "passes": "umc.passes", ROOT / "kernels": "umc.kernels",
            ROOT / "runtime": "umc.runtime"}


def module_name(path: Path) -> str:
    for folder, package in PACKAGES.items():
        if folder in path.parents:
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((package, *[p for p in parts if p != "__init__"]))
    raise AssertionError(path)


def imported_modules(paths) -> set[str]:
    """Absolute names of everything the files import, relative imports resolved."""
    names = set()
    for path in paths:
        here = module_name(path)
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_module_names_resolve_relative_imports(tmp_path):
    assert module_name(ROOT / "umc" / "reference" / "weights.py") == "umc.reference.weights"
    assert module_name(ROOT / "passes" / "cleanup.py") == "umc.passes.cleanup"


def test_reference_imports_no_compiler_module():
    files = (ROOT / "umc" / "reference").rglob("*.py")
    assert not {m for m in imported_modules(files) if m.startswith(COMPILER_SIDE)}


def test_compiler_imports_no_reference_module():
    files = [*(ROOT / "umc" / "ir").rglob("*.py"), *(ROOT / "passes").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
             *(ROOT / "runtime").rglob("*.py"), ROOT / "umc" / "lower.py", ROOT / "umc" / "compiler.py",
             ROOT / "umc" / "report.py", ROOT / "umc" / "cost.py", ROOT / "umc" / "hashing.py"]
    assert not {m for m in imported_modules(files) if m.startswith("umc.reference") or m == "umc.verify"}


def test_every_op_has_one_torch_implementation():
    assert set(OPS) == set(TORCH_IMPLS)
