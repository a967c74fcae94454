"""Launch parameters and argument layout of umc's lookup_pool kernel as a TensorRT ahead-of-time plugin.

Pure Python (standard library only, Python >= 3.8) and used twice: by ``umc export --format tensorrt`` to check a
build's kernels before it writes the plugin package, and, copied verbatim into that package as ``launch.py``, by
the plugin when TensorRT asks how to launch the kernel. One copy of the arithmetic: what is checked at export is
what runs on the GPU machine.

The rules it enforces:
- TensorRT passes an AOT plugin's kernel its arguments in the order inputs, extra scalars (int32 only), outputs;
  parameters the PTX declares past those (Triton's hidden scratch pointers) receive null, which is only safe when
  the kernel never reads them.
- TensorRT's launch parameters are int32 expressions and CUDA bounds the grid (x <= 2**31-1, y and z <= 65535) and
  the block (<= 1024 threads); sizes past those are errors here, never a wrapped launch.
- A kernel is specialized for its sizes and dtypes: the plugin binds exactly the one whose constants agree with
  what TensorRT knows about the node, and the PTX whose target runs on the GPU.
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple

INT32_MAX = 2**31 - 1
GRID_YZ_MAX = 65535
BLOCK_THREADS_MAX = 1024
SHARED_DEFAULT_MAX = 48 * 1024  # dynamic shared memory per block without cudaFuncSetAttribute's opt-in


class LaunchError(ValueError):
    """A kernel or a size that cannot be launched as a TensorRT plugin (the message says which and why)."""


class PtxEntry(NamedTuple):
    """The kernel function of a PTX module: its name, the PTX ISA version and target, its parameters as
    (PTX type, name) in order, the threads per block it requires (``.reqntid``, None when not declared) and
    the body text (what follows the signature)."""

    name: str
    version: str
    target: str
    params: Tuple[Tuple[str, str], ...]
    threads: Optional[int]
    body: str


class ArgumentLayout(NamedTuple):
    """Kernel argument names as TensorRT passes them: inputs, int32 scalars, outputs; then the PTX parameters
    TensorRT does not pass (it gives them null)."""

    inputs: Tuple[str, ...]
    scalars: Tuple[str, ...]
    outputs: Tuple[str, ...]
    hidden: Tuple[str, ...]


class LaunchParams(NamedTuple):
    """One launch: grid (x, y, z), block (x, y, z) and dynamic shared memory in bytes. Entries are ints, or
    TensorRT shape expressions where sizes are only known at run time."""

    grid: tuple
    block: tuple
    shared_bytes: int


_ENTRY = re.compile(r"^[ \t]*\.visible[ \t]+\.entry[ \t]+([A-Za-z_$][\w$]*)\s*\((.*?)\)(.*?)\{", re.M | re.S)
_PARAM = re.compile(r"\.param\s+\.(\w+)(?:\s+\.ptr)?(?:\s+\.(?:global|shared|const|local))?(?:\s+\.align\s+\d+)?"
                    r"\s+([A-Za-z_$][\w$]*)")
_TARGET = re.compile(r"sm_(\d+)(a?)")
_POINTER_PTX = ("u64", "b64")
_INT32_PTX = ("u32", "s32", "b32")


def read_ptx_entry(ptx: str) -> PtxEntry:
    """Parse the one ``.visible .entry`` of a PTX module (name, parameters, ``.reqntid``, version, target), so the
    plugin's argument layout and block size are checked against what the compiler emitted rather than assumed."""
    entries = list(_ENTRY.finditer(ptx))
    if len(entries) != 1:
        raise LaunchError(f"the PTX has {len(entries)} .visible .entry functions; a kernel's PTX has exactly one")
    entry = entries[0]
    params = []
    for text in filter(None, (p.strip() for p in entry.group(2).split(","))):
        match = _PARAM.fullmatch(text)
        if match is None:
            raise LaunchError(f"kernel {entry.group(1)}: cannot read the PTX parameter {text!r}")
        params.append((match.group(1), match.group(2)))
    threads = None
    required = re.search(r"\.reqntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", entry.group(3))
    if required:
        threads = 1
        for size in filter(None, required.groups()):
            threads *= int(size)
    version = re.search(r"^\s*\.version\s+(\S+)", ptx, re.M)
    target = re.search(r"^\s*\.target\s+([\w.]+)", ptx, re.M)
    if version is None or target is None:
        raise LaunchError(f"kernel {entry.group(1)}: the PTX declares no .version or .target")
    return PtxEntry(entry.group(1), version.group(1), target.group(1), tuple(params), threads, ptx[entry.end():])


def argument_layout(signature: Mapping[str, str], n_inputs: int, n_outputs: int, entry: PtxEntry) -> ArgumentLayout:
    """Split a Triton kernel's runtime arguments (``signature``: name -> Triton type in declaration order,
    constexprs excluded) into what TensorRT passes: ``n_inputs`` tensor pointers, then int32 scalars, then
    ``n_outputs`` tensor pointers; check each against the PTX parameter at its position, and that every PTX
    parameter past them (Triton's hidden scratch pointers, which TensorRT leaves null) is a pointer the kernel
    never reads."""
    runtime = [(name, kind) for name, kind in signature.items() if kind != "constexpr"]
    if n_inputs + n_outputs > len(runtime):
        raise LaunchError(f"kernel {entry.name} takes {len(runtime)} runtime arguments, fewer than the plugin's "
                          f"{n_inputs} inputs and {n_outputs} outputs")
    first_output = len(runtime) - n_outputs
    inputs, scalars, outputs = runtime[:n_inputs], runtime[n_inputs:first_output], runtime[first_output:]
    for name, kind in inputs + outputs:
        if not kind.startswith("*"):
            raise LaunchError(f"kernel {entry.name}: argument {name} ({kind}) sits where TensorRT passes a tensor "
                              "pointer (TensorRT's order is inputs, scalars, outputs)")
    for name, kind in scalars:
        if kind != "i32":
            raise LaunchError(f"kernel {entry.name}: argument {name} is {kind}, but TensorRT passes extra scalar "
                              "arguments as int32 only (and between the inputs and the outputs)")
    if len(entry.params) < len(runtime):
        raise LaunchError(f"kernel {entry.name}: the PTX declares {len(entry.params)} parameters, fewer than its "
                          f"{len(runtime)} runtime arguments")
    for (name, kind), (ptx_type, ptx_name) in zip(runtime, entry.params):
        expected = _POINTER_PTX if kind.startswith("*") else _INT32_PTX
        if ptx_type not in expected:
            raise LaunchError(f"kernel {entry.name}: PTX parameter {ptx_name} is .{ptx_type}, but argument {name} "
                              f"is {kind}")
    hidden = entry.params[len(runtime):]
    for ptx_type, ptx_name in hidden:
        if ptx_type not in _POINTER_PTX or re.search(rf"(?<![\w$]){re.escape(ptx_name)}(?![\w$])", entry.body):
            raise LaunchError(f"kernel {entry.name} uses its hidden parameter {ptx_name} (Triton scratch memory): "
                              "TensorRT passes null for parameters past the plugin's arguments")
    return ArgumentLayout(tuple(n for n, _ in inputs), tuple(n for n, _ in scalars), tuple(n for n, _ in outputs),
                          tuple(n for _, n in hidden))


def launch_params(kernel: Mapping, target: str, batch, seq) -> LaunchParams:
    """The launch of a lookup_pool kernel over ``batch`` x ``seq`` tokens, as its own ``launch`` does it: one
    program per token (grid x) and per BLOCK_V value columns (grid y), the compiled target's threads per block and
    dynamic shared memory. ``kernel`` is a record of the package's kernels.json. ``batch`` and ``seq`` are
    ints (then checked against int32 and CUDA's limits: LaunchError past them) or TensorRT shape expressions (then
    only the constant parts are checked; TensorRT evaluates the product per call)."""
    constants = kernel["constants"]
    tokens = batch * seq
    if isinstance(tokens, int) and tokens > INT32_MAX:
        raise LaunchError(f"B*T = {batch}*{seq} = {tokens} tokens exceed 2**31-1 = {INT32_MAX}: the kernel's grid "
                          "has one program per token and TensorRT's launch parameters are int32; call the engine "
                          "with fewer tokens (a smaller batch or sequence)")
    columns = -(-constants["VDIM"] // constants["BLOCK_V"])
    compiled = kernel["targets"][target]
    params = LaunchParams((tokens, columns, 1), (compiled["threads"], 1, 1), compiled["shared_bytes"])
    return check_launch(params)


def check_launch(params: LaunchParams) -> LaunchParams:
    """``params`` unchanged when every int in it is within CUDA's launch limits and int32; LaunchError naming the
    first that is not. Symbolic entries (TensorRT shape expressions) are left to TensorRT."""
    bounds = [("grid x", params.grid[0], INT32_MAX), ("grid y", params.grid[1], GRID_YZ_MAX),
              ("grid z", params.grid[2], GRID_YZ_MAX)]
    bounds += [(f"block {axis}", size, BLOCK_THREADS_MAX) for axis, size in zip("xyz", params.block)]
    for what, value, limit in bounds:
        if isinstance(value, int) and not 1 <= value <= limit:
            raise LaunchError(f"{what} = {value} is outside 1..{limit}: CUDA cannot launch it"
                              + (" (a launch over no tokens must be skipped)" if value < 1 else ""))
    if all(isinstance(size, int) for size in params.block):
        threads = params.block[0] * params.block[1] * params.block[2]
        if threads > BLOCK_THREADS_MAX:
            raise LaunchError(f"a block of {threads} threads exceeds CUDA's {BLOCK_THREADS_MAX}")
    if not 0 <= params.shared_bytes <= SHARED_DEFAULT_MAX:
        raise LaunchError(f"{params.shared_bytes} bytes of dynamic shared memory per block: beyond "
                          f"{SHARED_DEFAULT_MAX} CUDA needs an opt-in that TensorRT's AOT launch is not known to make")
    return params


def select_target(targets: Mapping[str, Mapping], capability: int) -> str:
    """Which of a kernel's targets (name -> record with ``ptx_target``, e.g. "sm_80" or "sm_90a") runs on a GPU of
    compute capability ``capability`` (major * 10 + minor, e.g. 86): PTX for ``sm_XY`` is compiled by the driver for
    any GPU of capability >= XY; PTX for ``sm_XYa`` (architecture-specific features, what Triton emits for sm_90)
    runs only on capability XY. The newest usable target wins; LaunchError when none is usable."""
    usable = []
    for name, record in targets.items():
        match = _TARGET.fullmatch(record["ptx_target"])
        if match is None:
            raise LaunchError(f"target {name}: unknown PTX target {record['ptx_target']!r}")
        cc, specific = int(match.group(1)), bool(match.group(2))
        if capability == cc or (not specific and capability > cc):
            usable.append((cc, name))
    if not usable:
        have = ", ".join(f"{name} (.target {record['ptx_target']})" for name, record in sorted(targets.items()))
        raise LaunchError(f"no PTX runs on a GPU of compute capability {capability // 10}.{capability % 10}: the "
                          f"package has {have or 'none'}; re-export from a build compiled for sm_{capability}")
    return max(usable)[1]


def select_kernel(kernels: Sequence[Mapping], known: Mapping[str, Optional[object]]) -> Mapping:
    """The one kernel record whose ``dtype`` and constants agree with every value in ``known`` (name -> value, or
    None where TensorRT does not know it when it builds); LaunchError when none or several agree, since a kernel
    specialized for other sizes would compute garbage without an error."""
    def agrees(kernel: Mapping) -> bool:
        facts = dict(kernel["constants"], dtype=kernel["dtype"])
        return all(value is None or facts.get(name) == value for name, value in known.items())

    found = [kernel for kernel in kernels if agrees(kernel)]
    if len(found) != 1:
        described = ", ".join(f"{name}={value}" for name, value in sorted(known.items()) if value is not None)
        names = ", ".join(k["name"] for k in found) or "none of " + ", ".join(k["name"] for k in kernels)
        raise LaunchError(f"{'no' if not found else 'more than one'} lookup_pool kernel for a node with "
                          f"{described} (matching: {names})")
    return found[0]
