"""Generated Triton kernels, run on the CPU through Triton's interpreter: each kernel against its op's
decomposition and its torch implementation on several shapes (sizes that are not powers of two, one head,
one core, E = 1 and 9, rank 3, float16/bfloat16 storage); whole layers and the tiny model through the
triton backend; the generated source as checked-in text; and kernel files that are not what umc renders."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

import umc
from conftest import GOLDEN, SPECS
from op_samples import check_instance, run_impl
from snapshots import assert_matches_expected
from umc.cli import main
from umc.ir import GraphBuilder, Scope, TensorType
from umc.ir.dims import Sym
from umc.kernels import RENDERERS, KernelFileError, kernel_sources, load
from umc.lower import lower
from umc.passes import run_pipeline
from umc.reference import build_model
from umc.runtime import BackendError, load as load_build
from umc.verify import verify_build, verify_golden

B, T = Sym.of("B"), Sym.of("T")


def node_of(op: str, types: dict, **attrs):
    """A single ``op`` node on inputs of the given types (name -> (dtype, shape))."""
    b = GraphBuilder(op)
    b.scope = Scope("score", unit=0)
    inputs = [b.input(name, TensorType(dtype, shape)) for name, (dtype, shape) in types.items()]
    b.emit(op, *inputs, **attrs)
    return b.nodes[0]


def coarse(heads, n, kd, m):
    return node_of("coarse_topm", {"q": ("f32", (B, T, heads, kd)), "keys": ("f32", (heads, n, kd))}, k=m)


def grid(heads, n, kd, rank, cores, m):
    side = ("f32", (B, T, heads, kd))
    keys = ("f32", (heads, n, kd, rank))
    picks = ("i64", (B, T, heads, m))
    return node_of("grid_topm", {"q_row": side, "q_col": side, "keys_row": keys, "keys_col": keys, "i_row": picks,
                                 "i_col": picks, "cores": ("f32", (heads, cores, rank, rank))}, n=n)


def pool(rows, vdim, heads, m, cores, blocks, shuffle):
    types = {"table": ("f32", (rows, vdim)), "address": ("i64", (B, T, heads, m)),
             "scores": ("f32", (B, T, heads, m, cores))}
    if shuffle:
        types["perm"] = ("i64", (rows * blocks,))
    return node_of("lookup_pool", types, N=rows, E=blocks)


CASES = {
    "coarse tiny": coarse(2, 16, 16, 6),
    "coarse one head, n kd m not powers of two": coarse(1, 12, 10, 5),
    "coarse several key blocks": coarse(2, 70, 8, 3),
    "coarse several key-dim blocks": coarse(1, 70, 70, 5),
    "coarse m 17 of 33": coarse(2, 33, 8, 17),
    "grid tiny": grid(2, 16, 16, 2, 2, 6),
    "grid one head, one core, rank 3, odd sizes": grid(1, 12, 10, 3, 1, 5),
    "grid rank 1, three cores": grid(2, 9, 8, 1, 3, 3),
    "grid several row and key-dim blocks": grid(1, 40, 70, 3, 2, 20),
    "pool tiny E=4": pool(16, 32, 2, 6, 2, 4, True),
    "pool E=9, one head, one core, vdim 20": pool(9, 20, 1, 5, 1, 9, True),
    "pool E=1 without shuffle, two column blocks": pool(25, 70, 2, 3, 2, 1, False),
}
LOW_PRECISION = ["coarse tiny", "grid tiny", "pool tiny E=4", "coarse m 17 of 33", "grid several row and key-dim blocks",
                 "pool E=9, one head, one core, vdim 20"]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without a GPU the kernels run in Triton's interpreter


def kernel(node):
    """The node's generated kernel as a function of CPU tensors (run on the GPU when there is one)."""
    module = load(RENDERERS[node.op](node))
    return lambda inputs: [out.cpu() for out in module.launch(*(x.to(DEVICE) for x in inputs))]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_kernel_equals_decomposition_and_torch_implementation(case):
    node = CASES[case]
    types, attrs, run = [v.type for v in node.inputs], node.attrs, kernel(node)
    for dtype in ["f32"] + (["bf16", "f16"] if case in LOW_PRECISION else []):
        check_instance(node.op, types, attrs, run, seed=1, dtype=dtype)
        check_instance(node.op, types, attrs, run, seed=2, dtype=dtype,
                       reference=lambda inputs: run_impl(node.op, attrs, inputs))


def test_a_wrong_kernel_is_caught(monkeypatch):
    """The comparison can fail: a pooling kernel that forgets the virtual block (all rows into block 0)."""
    node = CASES["pool tiny E=4"]
    module = load(RENDERERS[node.op](node))
    wrong = lambda inputs: [out.cpu() for out in module.launch(*(x.to(DEVICE) for x in (
        inputs[0], inputs[1] % node.attr("N"), *inputs[2:])))]
    with pytest.raises(AssertionError):
        check_instance(node.op, [v.type for v in node.inputs], node.attrs, wrong, seed=1, dtype="f32")


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.safetensors")), ids=lambda p: p.stem)
def test_golden_layers_through_the_triton_backend(path):
    checks = verify_golden(path, backend="triton")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_tiny_model_through_the_triton_backend(tmp_path):
    build = umc.compile(SPECS / "ultramem-tiny.yaml", tmp_path / "b").path
    checks = verify_build(build, backend="triton", steps=2, prompt=4)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_generated_source_of_the_tiny_spec():
    graphs = {kind: run_pipeline(g)[-1].graph for kind, g in lower(umc.load_spec(SPECS / "ultramem-tiny.yaml")).items()}
    sources = kernel_sources(graphs)
    assert sorted(s.op for s, _ in sources.values()) == ["coarse_topm", "grid_topm", "lookup_pool"]
    for name, (source, users) in sources.items():
        assert_matches_expected(f"kernels/ultramem-tiny.{source.op}.py", source.text(users))


def forge_kernel(build, edit, relist=True):
    """Edit the build's lookup_pool kernel file; with ``relist``, record its new hash in the manifest."""
    path = next((build / "kernels").glob("lookup_pool_*.py"))
    path.write_text(edit(path.read_text()))
    manifest = json.loads((build / "manifest.json").read_text())
    if relist:
        manifest["artifacts"][f"kernels/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        del manifest["artifacts"][f"kernels/{path.name}"]
    (build / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, relist, message", [
    (lambda text: text.replace("tl.sum(", "tl.max("), True, "is not the kernel this umc generates"),
    (lambda text: "raise SystemExit('forged code ran')\n" + text, True, "ran"),
    (lambda text: text, False, "is not listed in the build's manifest"),
], ids=["edited body", "code in the header", "unlisted"])
def test_kernel_files_that_umc_did_not_render_are_never_run(tmp_path, edit, relist, message):
    build = umc.compile(SPECS / "ultramem-tiny.yaml", tmp_path / "b").path
    forge_kernel(build, edit, relist)
    weights = build_model(umc.load_spec(SPECS / "ultramem-tiny.yaml")).state_dict()
    if message == "ran":  # the header is not code umc runs: the build loads, umc's own rendering is imported
        session = load_build(build, backend="triton", weights=weights)
        session.prefill(torch.zeros(1, 2, dtype=torch.long))
        return
    with pytest.raises(KernelFileError, match=message):
        load_build(build, backend="triton", weights=weights)
    result = CliRunner().invoke(main, ["verify", str(build), "--backend", "triton", "--steps", "0"])
    assert result.exit_code == 2 and message in result.output


def test_the_triton_backend_runs_kernels_for_the_kernel_sized_ops(tmp_path):
    from umc.runtime.torch_ops import TORCH_IMPLS

    build = umc.compile(SPECS / "ultramem-tiny.yaml", tmp_path / "b").path
    session = load_build(build, backend="triton", weights=build_model(umc.load_spec(SPECS / "ultramem-tiny.yaml")).state_dict())
    for kind, program in session.backend.programs.items():
        kernels = [i for i, n in enumerate(program.graph.nodes) if n.op in RENDERERS]
        assert len(kernels) == 8 and all(program.impls[i] is not TORCH_IMPLS[program.graph.nodes[i].op] for i in kernels)
    unfused = umc.compile(SPECS / "ultramem-tiny.yaml", tmp_path / "c", disable=("kernel_fusion",)).path
    with pytest.raises(BackendError, match="no kernel-sized op"):
        load_build(unfused, backend="triton", weights=build_model(umc.load_spec(SPECS / "ultramem-tiny.yaml")).state_dict())


def test_overlapping_branches_through_the_interpreter(tmp_path):
    """Triton's interpreter keeps global state: concurrent memory-unit branches must not launch kernels at once."""
    import dataclasses

    spec = umc.load_spec(SPECS / "ultramem-tiny.yaml")
    spec = dataclasses.replace(spec, memory=dataclasses.replace(spec.memory, units=tuple(
        type(spec.memory.units[0])(r, w) for r, w in ((0, 3), (0, 3), (1, 3), (1, 2)))))
    build = umc.compile(spec, tmp_path / "b").path
    weights = build_model(spec).state_dict()
    tokens = torch.randint(0, spec.model.vocab_size, (1, 3), generator=torch.Generator().manual_seed(0))
    want, _ = load_build(build, backend="graph", weights=weights).prefill(tokens)
    got, _ = load_build(build, backend="triton", weights=weights).prefill(tokens)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_gpu_benchmark_refuses_to_run_without_a_gpu(capsys, monkeypatch):
    from umc.kernels import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--batches", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
