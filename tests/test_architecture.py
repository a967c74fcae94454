"""The oracle stays independent: umc.reference imports nothing from the compiler side, and vice versa.

Checked three ways: the import statements of every source file (relative ones resolved), string literals
naming the other side (dynamic imports), and — in a fresh interpreter — the modules actually loaded after
importing one side whole and exercising it (compile, bind and run a build; build, run and save an eager
model), so an import hidden in a function or behind ``importlib`` is caught when it runs.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import GOLDEN, ROOT, SPECS

# source folder -> the package it installs as
PACKAGES = {ROOT / "umc": "umc", ROOT / "passes": "umc.passes", ROOT / "kernels": "umc.kernels",
            ROOT / "runtime": "umc.runtime"}
REFERENCE = "umc.reference"
BRIDGES = ("umc.__main__", "umc.verify", "umc.cli", "umc.generate", "umc.bench.command", "umc.bench.contenders",
           "umc.bench.peak")  # may import both sides
NEUTRAL = ("umc", "umc.spec", "umc.cost", "umc.dtypes", "umc.numerics", "umc.official", "umc.resources")  # shared by both sides


def module_name(path: Path) -> str:
    """The dotted name a source file is installed as."""
    for folder, package in PACKAGES.items():
        if folder in path.parents:
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((package, *[p for p in parts if p != "__init__"]))
    raise AssertionError(path)


def absolute_imports(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything ``source`` (the text of ``module``) imports, relative imports resolved,
    plus every string literal that names a umc module (what importlib.import_module would receive)."""
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
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("umc."):
            names.add(node.value)
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


def is_neutral(name: str) -> bool:
    """A neutral module, or a name imported from one (``umc.spec.Spec``)."""
    return name in NEUTRAL or any(name.startswith(n + ".") for n in NEUTRAL if n != "umc")


def compiler_modules() -> list[str]:
    return sorted(n for n in sources() if not is_reference(n) and n not in BRIDGES and n not in NEUTRAL)


def test_relative_and_dynamic_imports_resolve():
    text = "from . import editor\nfrom ..ir import core\nfrom .editor import Editor\n"
    assert absolute_imports(text, "umc.passes.cleanup", is_package=False) == {
        "umc.passes", "umc.passes.editor", "umc.ir", "umc.ir.core", "umc.passes.editor.Editor"}
    assert absolute_imports("from . import weights", "umc.reference", is_package=True) == {
        "umc.reference", "umc.reference.weights"}
    dynamic = "import importlib\ndef f():\n    return importlib.import_module('umc.reference.model')\n"
    assert "umc.reference.model" in absolute_imports(dynamic, "umc.lower", is_package=False)
    assert module_name(ROOT / "passes" / "cleanup.py") == "umc.passes.cleanup"


def test_reference_imports_no_compiler_module():
    for name, imports in sources().items():
        if is_reference(name):
            project = {m for m in imports if m.startswith("umc")}
            allowed = {m for m in project if is_reference(m) or is_neutral(m)}
            assert project == allowed, (name, project - allowed)


def test_compiler_imports_no_reference_module():
    modules = sources()
    compiler_side = compiler_modules()
    assert {"umc.lower", "umc.compiler", "umc.passes.cleanup", "umc.runtime.session", "umc.ir.expand"} <= set(compiler_side)
    for name in compiler_side + list(NEUTRAL):
        bad = {m for m in modules[name] if is_reference(m) or m in BRIDGES}
        assert not bad, (name, bad)


def run_isolated(script: str) -> list[str]:
    """Run ``script`` in a fresh interpreter; it prints a JSON list of loaded module names."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiler_side_loads_no_reference_module_when_it_runs(tmp_path):
    imports = "\n".join(f"import {m}" for m in compiler_modules() + list(NEUTRAL))
    script = f"""
import json, sys, torch
{imports}
import umc
from umc.runtime import load
from umc.dtypes import torch_dtype
build = umc.compile({str(SPECS / 'ultramem-tiny.yaml')!r}, {str(tmp_path / 'b')!r})
weights = {{}}
for p in build.graphs["prefill"].params:
    shape = [int(d) for d in p.type.shape]
    weights[p.name] = torch.randperm(shape[0]) if p.type.dtype == "i64" else torch.randn(shape).to(torch_dtype(p.type.dtype))
session = load(build.path, weights=weights)
logits, state = session.prefill(torch.zeros(1, 3, dtype=torch.long))
session.decode(torch.zeros(1, 1, dtype=torch.long), state)
print(json.dumps(sorted(sys.modules)))
"""
    loaded = run_isolated(script)
    assert "umc.runtime.session" in loaded and "umc.passes" in loaded
    assert not [m for m in loaded if is_reference(m) or m in BRIDGES]


def test_reference_side_loads_no_compiler_module_when_it_runs(tmp_path):
    golden = sorted(GOLDEN.glob("*.safetensors"))[0]
    script = f"""
import json, sys, torch, safetensors
from safetensors.torch import load_file
import umc, umc.reference
from umc.reference import build_model, save_weights, load_weights, memory_layer_from_official
spec = umc.load_spec({str(SPECS / 'ultramem-tiny.yaml')!r})
model = build_model(spec)
logits, state = model(torch.zeros(1, 3, dtype=torch.long))
model(torch.zeros(1, 1, dtype=torch.long), state)
save_weights(model, {str(tmp_path / 'w.safetensors')!r})
load_weights(model, {str(tmp_path / 'w.safetensors')!r})
tensors = load_file({str(golden)!r})
config = json.loads(safetensors.safe_open({str(golden)!r}, "pt").metadata()["config"])
memory_layer_from_official(tensors, config)(tensors["input"])
print(json.dumps(sorted(sys.modules)))
"""
    loaded = run_isolated(script)
    assert "umc.reference.model" in loaded
    compiler = set(compiler_modules()) | set(BRIDGES)
    assert not [m for m in loaded if m in compiler]


def test_every_package_is_installed():
    """A normal (non-editable) install ships every package: pyproject lists each folder holding __init__.py."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {module_name(init) for folder in PACKAGES for init in folder.rglob("__init__.py")}
    assert present == listed, (present - listed, listed - present)
