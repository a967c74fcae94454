"""Gather-pool microbenchmark on a CUDA GPU: the generated ``lookup_pool`` kernel at the 1.6B-x12 layer's sizes
against ``torch.nn.functional.embedding_bag(per_sample_weights=...)`` (the closest standard op: the same value
rows read, one weight per row, one bag per token, no per-core slices or virtual blocks) and against umc's torch
implementation, at several batch sizes, each as effective bandwidth (bytes of value rows, indices and scores
read plus the output written, per second) and as a fraction of the device's copy bandwidth measured in the same
run. Contenders are timed round-robin with CUDA events; medians are reported.

``python -m umc.kernels.bench [--batches 1,64,512,4096] [--json OUT]`` needs a CUDA GPU (exit 2 without one).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

BATCHES = (1, 64, 512, 4096)
REPEATS = 20


def bytes_moved(batch: int, heads: int, topm: int, cores: int, vdim: int, rows: int, blocks: int, itemsize: int) -> int:
    """Bytes one lookup_pool call must move: the distinct value rows it can read (at most the table), the
    addresses and their shuffle entries (int64), the per-core scores, and the pooled output written."""
    picks = batch * heads * topm
    values = min(picks, rows) * vdim * itemsize
    return values + picks * 8 * 2 + picks * cores * itemsize + batch * blocks * vdim * itemsize


def table(results: list[dict]) -> str:
    """The results as an aligned text table."""
    lines = [f"{'batch':>6} {'contender':<22} {'median ms':>10} {'GB/s':>8} {'of copy BW':>10}"]
    for r in results:
        lines.append(f"{r['batch']:>6} {r['contender']:<22} {r['ms']:>10.3f} {r['gbps']:>8.1f} {r['fraction']:>10.1%}")
    return "\n".join(lines)


def _node(spec, batch):
    """A lookup_pool node at the spec's layer sizes for ``batch`` tokens."""
    from umc.ir import GraphBuilder, Scope, TensorType
    from umc.dtypes import ir_name

    mem, dtype = spec.memory, ir_name(spec.dtype)
    b = GraphBuilder("bench")
    b.scope = Scope("pool", unit=0)
    table_ = b.input("table", TensorType(dtype, (mem.physical_values, mem.vdim)))
    address = b.input("address", TensorType("i64", (batch, 1, mem.heads, mem.topm)))
    scores = b.input("scores", TensorType(dtype, (batch, 1, mem.heads, mem.topm, mem.cores)))
    perm = b.input("perm", TensorType("i64", (mem.virtual_values,)))
    b.emit("lookup_pool", table_, address, scores, perm, N=mem.physical_values, E=mem.value_expansion)
    return b.nodes[0]


def _time(fn, torch) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def run(batches=BATCHES, spec_path: str = "specs/ultramem-1.6b-x12.yaml") -> dict:
    """Measure every contender at every batch; the device's copy bandwidth in the same run."""
    import torch
    import torch.nn.functional as F

    import umc
    from umc.dtypes import torch_dtype
    from umc.kernels import RENDERERS, load
    from umc.runtime.torch_ops import TORCH_IMPLS

    spec = umc.load_spec(spec_path)
    mem = spec.memory
    dtype = torch_dtype(spec.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    values = torch.randn(mem.physical_values, mem.vdim, device="cuda", generator=gen).to(dtype)
    perm = torch.randperm(mem.virtual_values, device="cuda", generator=gen)
    copy_src = torch.empty(2**29, dtype=torch.uint8, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copies = []
    results = []
    for batch in batches:
        node = _node(spec, batch)
        kernel = load(RENDERERS["lookup_pool"](node)).launch
        address = torch.randint(0, mem.virtual_values, (batch, 1, mem.heads, mem.topm), device="cuda", generator=gen)
        scores = torch.randn(batch, 1, mem.heads, mem.topm, mem.cores, device="cuda", generator=gen).to(dtype)
        rows = (perm[address] % mem.physical_values).flatten()
        offsets = torch.arange(0, rows.numel(), mem.heads * mem.topm, device="cuda")
        weights = scores[..., 0].flatten()
        attrs = {"N": mem.physical_values, "E": mem.value_expansion}
        contenders = {
            "umc lookup_pool kernel": lambda: kernel(values, address, scores, perm),
            "torch implementation": lambda: TORCH_IMPLS["lookup_pool"](attrs, values, address, scores, perm),
            "embedding_bag": lambda: F.embedding_bag(rows, values, offsets, mode="sum", per_sample_weights=weights),
        }
        times = {name: [] for name in contenders}
        for fn in contenders.values():
            fn()
        for _ in range(REPEATS):
            for name, fn in contenders.items():
                times[name].append(_time(fn, torch))
            copies.append(_time(lambda: copy_dst.copy_(copy_src), torch))
        moved = bytes_moved(batch, mem.heads, mem.topm, mem.cores, mem.vdim, mem.physical_values, mem.value_expansion,
                            values.element_size())
        for name, samples in times.items():
            ms = statistics.median(samples)
            results.append({"batch": batch, "contender": name, "ms": ms, "bytes": moved, "gbps": moved / ms / 1e6})
    copy_gbps = 2 * copy_src.numel() / statistics.median(copies) / 1e6  # read + write
    for r in results:
        r["fraction"] = r["gbps"] / copy_gbps
    return {"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps, "spec": spec.name, "results": results}


def main(argv=None) -> int:
    """Command line: run, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m umc.kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: the gather-pool benchmark needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    batches = tuple(int(b) for b in args.batches.split(","))
    found = run(batches)
    print(f"{found['device']}: copy bandwidth {found['copy_gbps']:.0f} GB/s; {found['spec']} layer sizes")
    print(table(found["results"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(found, f, indent=2)
    return 0 if all(math.isfinite(r["ms"]) for r in found["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
