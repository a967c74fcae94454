"""umc compile / verify / verify-golden: build directory contents, atomicity, determinism, failures that must fail."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import umc
import umc.compiler
from conftest import SPECS, golden_files
from umc.cli import main
from umc.compiler import BuildError
from umc.runtime import BuildDirError, load
from umc.runtime.torch_ops import TORCH_IMPLS

TINY = str(SPECS / "ultramem-tiny.yaml")


def files_of(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_directory_contents(tmp_path):
    build = umc.compile(TINY, tmp_path / "b")
    names = set(files_of(build.path))
    for kind in ("prefill", "decode"):
        assert f"ir/{kind}.00-initial.txt" in names and f"graphs/{kind}.json" in names
        assert {f"ir/{kind}.{i:02d}-{p}.txt" for i, p in enumerate(build.passes, 1)} <= names
    assert {"manifest.json", "graph.dot", "report.json", "report.md", "spec.json"} <= names
    assert ("graph.svg" in names) == (shutil.which("dot") is not None)  # drawn only where Graphviz is installed
    manifest = json.loads((build.path / "manifest.json").read_text())
    assert manifest["passes"] == list(umc.compiler.PIPELINE)
    for name, digest in manifest["artifacts"].items():
        assert hashlib.sha256((build.path / name).read_bytes()).hexdigest() == digest
    report = json.loads((build.path / "report.json").read_text())
    assert [u["unit"] for u in report["units"]] == ["0:1", "2:3"]
    assert set(report["units"][0]["per_token"]) == {"1", "8", "64", "512"}
    assert report["decode_cost_batch1"]["final"]["flops"] < report["decode_cost_batch1"]["initial"]["flops"]


def test_value_bytes_follow_the_cost_model(tmp_path, tiny_spec):
    """DESIGN.md §6: min(B*H*m, N) rows x vdim x bytes per layer and step, so per token / B."""
    report = umc.compile(tiny_spec, tmp_path / "b").report
    mem = tiny_spec.memory
    for batch in (1, 8, 64, 512):
        rows = min(batch * mem.heads * mem.topm, mem.physical_values)
        expected = rows * mem.vdim * 4 / batch
        assert report["units"][0]["per_token"][str(batch)]["value_bytes"] == pytest.approx(expected)


def test_compiling_twice_gives_identical_bytes(tmp_path):
    umc.compile(TINY, tmp_path / "a")
    umc.compile(TINY, tmp_path / "b")
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


def test_existing_directory_needs_force(tmp_path):
    umc.compile(TINY, tmp_path / "b")
    with pytest.raises(BuildError, match="--force"):
        umc.compile(TINY, tmp_path / "b")
    (tmp_path / "b" / "ir" / "prefill.00-initial.txt").write_text("old")
    umc.compile(TINY, tmp_path / "b", force=True)  # a build's own files are replaced, edited or not
    assert (tmp_path / "b" / "ir" / "prefill.00-initial.txt").read_text() != "old"
    (tmp_path / "b" / "mine.txt").write_text("user file")
    with pytest.raises(BuildError, match="did not write"):
        umc.compile(TINY, tmp_path / "b", force=True)
    assert (tmp_path / "b" / "mine.txt").read_text() == "user file"


def test_failed_compile_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def broken(report):
        raise RuntimeError("disk full")

    monkeypatch.setattr(umc.compiler, "report_markdown", broken)
    with pytest.raises(RuntimeError):
        umc.compile(TINY, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_failed_recompile_keeps_the_old_build(tmp_path, monkeypatch):
    umc.compile(TINY, tmp_path / "b")
    before = files_of(tmp_path / "b")
    monkeypatch.setattr(umc.compiler, "report_markdown", lambda report: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        umc.compile(TINY, tmp_path / "b", force=True)
    assert files_of(tmp_path / "b") == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_modified_build_is_refused(tmp_path, tiny_spec):
    from umc.reference import build_model

    umc.compile(TINY, tmp_path / "b")
    path = tmp_path / "b" / "graphs" / "decode.json"
    path.write_text(path.read_text().replace('"grid_topm"', '"grid_topk"'))
    with pytest.raises(BuildDirError, match="modified"):
        load(tmp_path / "b", weights=build_model(tiny_spec).state_dict())


def test_pass_selection(tmp_path):
    build = umc.compile(TINY, tmp_path / "b", passes=("skip_layer_overlap", "cleanup"), disable=("cleanup",))
    assert build.passes == ("skip_layer_overlap",)
    with pytest.raises(BuildError, match="unknown pass"):
        umc.compile(TINY, tmp_path / "c", passes=("fuse_everything",))
    with pytest.raises(BuildError, match="dump-after"):
        umc.compile(TINY, tmp_path / "c", passes=("cleanup",), dump_after="query_conv_folding")


def test_cli_compile_and_verify(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["compile", TINY, "-o", str(tmp_path / "b"), "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["verify", str(tmp_path / "b"), "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert "decode 3" in result.output and "OK" in result.output
    again = runner.invoke(main, ["compile", TINY, "-o", str(tmp_path / "b")])
    assert again.exit_code == 2 and "--force" in again.output and "Traceback" not in again.output


def test_verify_fails_when_a_kernel_is_wrong(tmp_path, monkeypatch):
    """verify must be able to fail: perturb the fused pooling op's implementation."""
    umc.compile(TINY, tmp_path / "b")
    honest = TORCH_IMPLS["lookup_pool"]
    monkeypatch.setitem(TORCH_IMPLS, "lookup_pool", lambda attrs, *xs: tuple(1.01 * t for t in honest(attrs, *xs)))
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "b"), "--steps", "1"])
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_verify_of_a_non_build_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.json" in result.output and "Traceback" not in result.output


def test_cli_verify_golden():
    files = [str(p) for p in golden_files()]
    result = CliRunner().invoke(main, ["verify-golden", *files])
    assert result.exit_code == 0, result.output
    assert f"OK: {len(files)} golden files match" in result.output


def test_largest_spec_compiles_without_weights(tmp_path):
    """21B parameters: compiled from shapes only, in a fresh process whose peak memory stays small."""
    script = (
        "import resource, umc;"
        f"umc.compile({str(SPECS / 'ultramem-1.6b-x12.yaml')!r}, {str(tmp_path / 'b')!r});"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    peak_kib = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert peak_kib < 2 * 1024 * 1024
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["params"]["total"] > 21e9


def test_weights_ship_with_the_build(tmp_path, tiny_spec):
    import torch

    from umc.reference import build_model, save_weights

    eager = build_model(tiny_spec, seed=7)
    save_weights(eager, tmp_path / "w.safetensors")
    result = CliRunner().invoke(main, ["compile", TINY, "-o", str(tmp_path / "b"), "--quiet",
                                       "--weights", str(tmp_path / "w.safetensors")])
    assert result.exit_code == 0, result.output
    session = load(tmp_path / "b")  # weights.safetensors from the build
    tokens = torch.randint(0, tiny_spec.model.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = eager(tokens)
    got, _ = session.prefill(tokens)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "b"), "--steps", "2"]).exit_code == 0


def test_weights_that_do_not_fit_are_refused(tmp_path, pkm_spec):
    from umc.reference import build_model, save_weights

    save_weights(build_model(pkm_spec), tmp_path / "w.safetensors")
    result = CliRunner().invoke(main, ["compile", TINY, "-o", str(tmp_path / "b"), "--weights",
                                       str(tmp_path / "w.safetensors")])
    assert result.exit_code == 2 and "tensor" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_build_verifies(tmp_path, tiny_spec, dtype):
    """Low precision: top-m swaps happen; verify forces the build's selections on the eager side,
    checks every swap is a rounding-level tie, and holds logits to the at-least-as-close rule."""
    import dataclasses

    from umc.verify import verify_build

    umc.compile(dataclasses.replace(tiny_spec, dtype=dtype), tmp_path / "b")
    checks = verify_build(tmp_path / "b", steps=3)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_force_replaces_only_builds(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not a umc build"):
        umc.compile(TINY, project, force=True)
    (project / "manifest.json").write_text('{"name": "my app"}')  # someone else's manifest
    with pytest.raises(BuildError, match="not a umc build"):
        umc.compile(TINY, project, force=True)
    assert (project / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(BuildError, match="not a directory"):
        umc.compile(TINY, tmp_path / "file", force=True)
    (tmp_path / "empty").mkdir()
    assert umc.compile(TINY, tmp_path / "empty", force=True).path == (tmp_path / "empty").resolve()


@pytest.mark.parametrize("failure, raised", [(OSError(16, "Device or resource busy"), BuildError),
                                             (KeyboardInterrupt(), KeyboardInterrupt)], ids=["error", "ctrl-c"])
def test_interrupted_swap_puts_the_old_build_back(tmp_path, monkeypatch, failure, raised):
    import os

    umc.compile(TINY, tmp_path / "b")
    before = files_of(tmp_path / "b")
    real = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old build has moved aside; putting the new one in place fails
            raise failure
        return real(src, dst)

    monkeypatch.setattr(umc.compiler.os, "replace", fail_second)
    with pytest.raises(raised):
        umc.compile(TINY, tmp_path / "b", force=True)
    monkeypatch.undo()
    assert files_of(tmp_path / "b") == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize("manifest", ["{not json", "{}", "[]"])
def test_corrupt_manifest_is_a_clear_error(tmp_path, manifest):
    umc.compile(TINY, tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text(manifest)
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "b")])
    assert result.exit_code == 2 and "not a valid manifest" in result.output and "Traceback" not in result.output


def test_verify_mistakes_exit_2(tmp_path):
    from safetensors.torch import save_file
    import torch

    umc.compile(TINY, tmp_path / "b")
    too_long = CliRunner().invoke(main, ["verify", str(tmp_path / "b"), "--steps", "500"])
    assert too_long.exit_code == 2 and "max_seq_len" in too_long.output
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    no_config = CliRunner().invoke(main, ["verify-golden", str(tmp_path / "plain.safetensors")])
    assert no_config.exit_code == 2 and "no 'config' metadata" in no_config.output
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    junk = CliRunner().invoke(main, ["verify-golden", str(tmp_path / "junk.safetensors")])
    assert junk.exit_code == 2 and "cannot read" in junk.output and "Traceback" not in junk.output


def test_session_checks_its_inputs(tmp_path, tiny_spec):
    import torch

    from umc.reference import build_model
    from umc.runtime import InputError

    umc.compile(tiny_spec, tmp_path / "b")
    session = load(tmp_path / "b", weights=build_model(tiny_spec).state_dict())
    _, state = session.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="tokens"):
        session.decode(torch.zeros(2, 2, dtype=torch.long), state)  # decode takes one token per sequence
    with pytest.raises(InputError, match="the state holds 2 sequences but tokens has 3 rows"):
        session.decode(torch.zeros(3, 1, dtype=torch.long), state)
    with pytest.raises(InputError, match="past_k.0 .*B = 2 here but 3 elsewhere"):  # an untagged state: the feed check
        session.decode(torch.zeros(3, 1, dtype=torch.long), dict(state))
    with pytest.raises(InputError, match="max_seq_len"):
        session.prefill(torch.zeros(1, tiny_spec.model.max_seq_len + 1, dtype=torch.long))
