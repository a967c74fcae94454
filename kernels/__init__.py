"""Triton kernels generated from the optimized IR: one renderer per kernel-sized op, keyed by op name.

``render(node)`` specializes an op's template to the node's sizes and dtypes (``KernelSource``);
``kernel_sources(graphs)`` collects every kernel a build needs, one file per distinct specialization;
``load(source, directory)`` imports a kernel file after checking it is exactly what this umc renders.
The kernels run on a GPU, or on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, for
correctness only).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Callable

from umc.ir.core import Graph, IRError, Node
from umc.kernels import templates
from umc.kernels.source import BODY_MARK, KernelSource, describe, pow2, render
from umc.registry import registrar

Renderer = Callable[[Node], KernelSource]
RENDERERS: dict[str, Renderer] = {}


renderer = registrar(RENDERERS, "kernel renderers")  # @renderer(op): fn(node) -> KernelSource


def _specialization(node: Node, names: tuple[str, ...]) -> str:
    ins = describe(dict(zip(names, (v.type for v in node.inputs))))
    attrs = ", ".join(f"{k}={v}" for k, v in node.attrs)
    return f"{ins}{', ' + attrs if attrs else ''} -> {', '.join(str(v.type) for v in node.outputs)}"


@renderer("coarse_topm")
def _coarse_topm(node: Node) -> KernelSource:
    q, keys = (v.type for v in node.inputs)
    heads, n, kd = keys.shape
    m = node.attr("k")
    m_pad = pow2(m)
    constants = {"HEADS": heads, "N": n, "KD": kd, "BLOCK_D": min(pow2(kd), 64), "M": m, "M_PAD": m_pad,
                 "BLOCK_N": max(m_pad, min(pow2(n), 64))}
    pointers = {"q_ptr": q, "keys_ptr": keys, "values_ptr": node.outputs[0].type, "indices_ptr": node.outputs[1].type}
    return render("coarse_topm", templates.COARSE_TOPM, constants, pointers, _specialization(node, ("q", "keys")))


@renderer("grid_topm")
def _grid_topm(node: Node) -> KernelSource:
    types = [v.type for v in node.inputs]
    heads, n, kd, rank = types[2].shape
    cores = types[6].shape[1]
    m = types[4].shape[-1]
    m_pad = pow2(m)
    constants = {"HEADS": heads, "N": n, "KD": kd, "BLOCK_D": min(pow2(kd), 32), "R": rank, "R_PAD": pow2(rank),
                 "CORES": cores, "M": m, "M_PAD": m_pad, "BLOCK_I": min(m_pad, 16)}
    names = ("q_row", "q_col", "keys_row", "keys_col", "i_row", "i_col", "cores")
    pointers = {f"{name}_ptr": t for name, t in zip(names, types)}
    pointers.update({"address_ptr": node.outputs[0].type, "scores_ptr": node.outputs[1].type})
    if n != node.attr("n"):
        raise IRError(f"grid_topm: keys per side {n} != n={node.attr('n')}")
    return render("grid_topm", templates.GRID_TOPM, constants, pointers, _specialization(node, names))


@renderer("lookup_pool")
def _lookup_pool(node: Node) -> KernelSource:
    table, address, scores, *perm = (v.type for v in node.inputs)
    picks = address.shape[2] * address.shape[3]
    vdim = table.shape[1]
    constants = {"K": picks, "K_PAD": pow2(picks), "VDIM": vdim, "BLOCK_V": min(pow2(vdim), 32),
                 "CORES": scores.shape[-1], "NPHYS": node.attr("N"), "E": node.attr("E"), "HAS_PERM": bool(perm)}
    pointers = {"table_ptr": table, "address_ptr": address, "scores_ptr": scores, "perm_ptr": perm[0] if perm else address,
                "out_ptr": node.outputs[0].type}
    names = ("table", "address", "scores", "perm")
    return render("lookup_pool", templates.LOOKUP_POOL, constants, pointers, _specialization(node, names))


def kernel_sources(graphs: dict[str, Graph]) -> dict[str, tuple[KernelSource, tuple[str, ...]]]:
    """Every kernel the graphs' kernel-sized nodes need: file stem -> (source, the scopes using it)."""
    found: dict[str, tuple[KernelSource, list[str]]] = {}
    for kind, graph in graphs.items():
        for node in graph.nodes:
            if node.op in RENDERERS:
                source = RENDERERS[node.op](node)
                users = found.setdefault(source.name, (source, []))[1]
                if f"{kind}:{node.scope}" not in users:
                    users.append(f"{kind}:{node.scope}")
    return {name: (source, tuple(users)) for name, (source, users) in found.items()}


@cache
def _private_directory() -> Path:
    """This process's directory of kernel files to import (removed when this process exits, not a forked child)."""
    path, owner = Path(tempfile.mkdtemp(prefix="umc-kernels-")), os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, True))
    return path


class KernelFileError(ValueError):
    """A kernel file in a build that is not what this umc renders for its graphs (edited, or forged)."""


def load(source: KernelSource, directory: Path | None = None, listed: frozenset[str] = frozenset()):
    """The imported module of a kernel. With a build's ``directory``, its ``<name>.py`` must be listed in the build's
    manifest (``listed``: the manifest's artifact names) and its code be exactly what this umc renders for the node;
    either way the module imported is umc's own rendering (written to a private directory), never the file's
    bytes, so a file cannot bring code of its own. Modules are cached by name."""
    module_name = f"umc_kernel_{source.name}"
    if directory is not None:
        file = directory / f"{source.name}.py"
        if f"kernels/{file.name}" not in listed:
            raise KernelFileError(f"{file} is not listed in the build's manifest: recompile the build")
        data = file.read_bytes()
        if data.decode("utf-8", errors="replace").partition(BODY_MARK)[2] != source.body:
            raise KernelFileError(f"{file} is not the kernel this umc generates for its graph "
                                  f"(sha256 {hashlib.sha256(data).hexdigest()[:12]}): recompile the build")
    if module_name in sys.modules:
        return sys.modules[module_name]
    target = _private_directory() / f"{source.name}.py"
    target.write_text(source.text(), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(module_name, target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
