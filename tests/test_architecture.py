"""The oracle stays independent: umc.reference imports nothing from the compiler side, and vice versa.
Also: every IR op has exactly one torch implementation."""

import ast
from pathlib import Path

from conftest import ROOT
from umc.ir.ops import OPS
from umc.runtime.torch_ops import TORCH_IMPLS

# source folder -> the package it installs as
PACKAGES = {ROOT / "umc": "umc", ROOT / "passes": "umc.passes", ROOT / "kernels": "umc.kernels",
            ROOT / "runtime": "umc.runtime"}
REFERENCE = "umc.reference"
BRIDGES = ("umc.verify", "umc.cli")  # may import both sides
NEUTRAL = ("umc", "umc.spec")  # shared by both sides


def module_name(path: Path) -> str:
    """The dotted name a source file is installed as."""
    for folder, package in PACKAGES.items():
        if folder in path.parents:
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((package, *[p for p in parts if p != "__init__"]))
    raise AssertionError(path)


def absolute_imports(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything ``source`` (the text of ``module``) imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def sources() -> dict[str, set[str]]:
    """Every project module -> what it imports."""
    out = {}
    for folder in PACKAGES:
        for path in folder.rglob("*.py"):
            name = module_name(path)
            out[name] = absolute_imports(path.read_text(), name, path.name == "__init__.py")
    return out


def is_reference(name: str) -> bool:
    return name == REFERENCE or name.startswith(REFERENCE + ".")


def test_relative_imports_resolve():
    text = "from . import editor\nfrom ..ir import core\nfrom .editor import Editor\n"
    assert absolute_imports(text, "umc.passes.cleanup", is_package=False) == {
        "umc.passes", "umc.passes.editor", "umc.ir", "umc.ir.core", "umc.passes.editor.Editor"}
    assert absolute_imports("from . import weights", "umc.reference", is_package=True) == {
        "umc.reference", "umc.reference.weights"}
    assert module_name(ROOT / "passes" / "cleanup.py") == "umc.passes.cleanup"


def test_reference_imports_no_compiler_module():
    modules = sources()
    for name, imports in modules.items():
        if is_reference(name):
            project = {m for m in imports if m.startswith("umc")}
            allowed = {m for m in project if is_reference(m) or m in NEUTRAL or m.startswith("umc.spec.")}
            assert project == allowed, (name, project - allowed)


def test_compiler_imports_no_reference_module():
    modules = sources()
    compiler_side = [n for n in modules if not is_reference(n) and n not in BRIDGES and n not in NEUTRAL]
    assert {"umc.lower", "umc.compiler", "umc.passes.cleanup", "umc.runtime.session"} <= set(compiler_side)
    for name in compiler_side:
        bad = {m for m in modules[name] if is_reference(m) or m in BRIDGES}
        assert not bad, (name, bad)


def test_every_op_has_one_torch_implementation():
    assert set(OPS) == set(TORCH_IMPLS)
