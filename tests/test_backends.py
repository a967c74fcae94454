"""The backend seam: a backend is one registered class; loading, verify and verify-golden reach it by name;
the graph backend binds load-time values once for prefill and decode and frees intermediates."""

import pytest
import torch
from click.testing import CliRunner

import umc
from conftest import GOLDEN, SPECS
from umc.cli import main
from umc.reference import build_model
from umc.runtime import BACKENDS, Backend, BackendError, list_backends, load, lookup_backend, register_backend
from umc.runtime.backends.graph import GraphBackend, Program
from umc.verify import verify_build, verify_golden

TINY = SPECS / "ultramem-tiny.yaml"


class SequentialGraph(GraphBackend):
    """What a new backend module holds: a class with a name (here: the graph backend without threads)."""

    name = "test-sequential"
    runs = 0

    def __init__(self, graphs, weights, threads=True, artifacts=None):
        super().__init__(graphs, weights, threads=False, artifacts=artifacts)

    def run(self, kind, feeds, sizes, force=None, observer=None):
        type(self).runs += 1
        return super().run(kind, feeds, sizes, force, observer)


class NeedsAccelerator(Backend):
    name = "test-accelerator"

    @classmethod
    def unavailable(cls):
        return "no accelerator on this machine"


@pytest.fixture(scope="module", autouse=True)
def registered():
    for cls in (SequentialGraph, NeedsAccelerator):
        register_backend(cls)
    yield
    for cls in (SequentialGraph, NeedsAccelerator):
        BACKENDS.pop(cls.name)


def test_registry_lists_backends_and_explains_refusals():
    listed = list_backends()
    assert listed["graph"] is None and listed["test-accelerator"] == "no accelerator on this machine"
    with pytest.raises(BackendError, match=r"unknown backend 'nope' \(available: cpu, graph, onnxruntime, test-sequential, triton\)"):
        lookup_backend("nope")
    with pytest.raises(BackendError, match="cannot run here: no accelerator"):
        lookup_backend("test-accelerator")
    with pytest.raises(ValueError, match="registered twice"):
        register_backend(SequentialGraph)


def test_a_registered_backend_is_reached_by_load_verify_and_the_cli(tmp_path):
    build = umc.compile(TINY, tmp_path / "b").path
    SequentialGraph.runs = 0
    session = load(build, backend="test-sequential", weights=build_model(umc.load_spec(TINY)).state_dict())
    session.prefill(torch.zeros(1, 2, dtype=torch.long))
    assert SequentialGraph.runs == 1
    assert all(c.ok for c in verify_build(build, backend="test-sequential", steps=1))
    assert all(c.ok for c in verify_golden(sorted(GOLDEN.glob("*.safetensors"))[0], backend="test-sequential"))
    result = CliRunner().invoke(main, ["verify", str(build), "--backend", "test-sequential", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert SequentialGraph.runs > 4
    refused = CliRunner().invoke(main, ["verify", str(build), "--backend", "test-accelerator"])
    assert refused.exit_code == 2 and "no accelerator on this machine" in refused.output


def test_prefill_and_decode_share_their_load_time_values(tmp_path):
    build = umc.compile(TINY, tmp_path / "b").path
    session = load(build, weights=build_model(umc.load_spec(TINY)).state_dict())
    backend = session.backend
    folds = {}
    for kind, graph in backend.graphs.items():
        folds[kind] = [backend.bound[kind][n.outputs[0].id] for n in graph.init_nodes if n.op == "fold_rank"]
    assert len(folds["prefill"]) == 4 and all(a is b for a, b in zip(folds["prefill"], folds["decode"]))


def test_intermediates_are_freed_after_their_last_use(tmp_path):
    graph = umc.compile(TINY, tmp_path / "b").graphs["decode"]
    program = Program(graph)
    freed = [v for step in program.free_after for v in step]
    per_call = {v.id for n in graph.nodes for v in n.outputs} - {v.id for v in graph.outputs}
    assert len(freed) == len(set(freed)) and set(freed) <= per_call | {v.id for v in graph.inputs}
    stream_of = {v.id: n.stream for n in graph.nodes for v in n.outputs}
    crossing = {v.id for n in graph.nodes for v in n.inputs if stream_of.get(v.id, 0) != n.stream}
    assert per_call - set(freed) <= crossing  # only values read across streams wait for the end


def test_every_op_keeps_to_the_device_of_its_inputs(tmp_path):
    """No torch implementation makes a tensor on the CPU behind its inputs' back (on a GPU that is a device
    mismatch): the tiny model's optimized graphs run with weights and inputs on the meta device."""
    build = umc.compile(TINY, tmp_path / "b")
    weights = {k: v.to("meta") for k, v in build_model(umc.load_spec(TINY)).state_dict().items()}
    backend = GraphBackend(build.graphs, weights, threads=False)
    prefill = backend.run("prefill", {"tokens": torch.zeros(2, 5, dtype=torch.long, device="meta")}, {"B": 2, "T": 5})
    feeds = {"tokens": torch.zeros(2, 1, dtype=torch.long, device="meta")}
    for slot in build.graphs["decode"].state:
        feeds[slot.input] = prefill[slot.output]
    decoded = backend.run("decode", feeds, {"B": 2, "S_past": 5})
    assert all(t.is_meta for t in (*prefill.values(), *decoded.values()))
