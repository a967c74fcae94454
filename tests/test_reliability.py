"""No silent wrong result, builds that cannot be forged or half-trusted, exit codes scripts can rely on,
and runs that cannot fit refused up front. Each test injects the mistake and watches the check fire."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import umc
from conftest import GOLDEN, SPECS
from umc.cli import main
from umc.reference import build_model, save_weights
from umc.runtime import BindError, BuildDirError, InputError, load
from umc.runtime.torch_ops import TORCH_IMPLS
from umc.verify import compare, compare_low_precision

TINY = str(SPECS / "ultramem-tiny.yaml")


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    return umc.compile(TINY, tmp_path_factory.mktemp("builds") / "tiny").path


@pytest.fixture(scope="module")
def session(tiny_build):
    return load(tiny_build, weights=build_model(umc.load_spec(TINY)).state_dict())


def relist(build, name):
    """Record a changed build file's hash in the manifest (what a forger would do)."""
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["artifacts"][name] = hashlib.sha256((build / name).read_bytes()).hexdigest()
    (build / "manifest.json").write_text(json.dumps(manifest))


def forged(tmp_path, forge, kinds=("decode",)):
    """A fresh build whose graph JSON of each of ``kinds`` was edited by ``forge`` and re-hashed into its manifest."""
    build = umc.compile(TINY, tmp_path / "b").path
    for kind in kinds:
        path = build / "graphs" / f"{kind}.json"
        graph = json.loads(path.read_text())
        forge(graph)
        path.write_text(json.dumps(graph))
        relist(build, f"graphs/{kind}.json")
    return build


# ---------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize("tokens, message", [
    ([[3, -1, 5]], r"tokens\[0, 1\] = -1 is outside the vocabulary \(allowed: 0..511"),
    ([[3, 5], [512, 0]], r"tokens\[1, 0\] = 512 is outside the vocabulary"),
])
def test_token_ids_outside_the_vocabulary_are_refused(session, tokens, message):
    with pytest.raises(InputError, match=message):
        session.prefill(torch.tensor(tokens))
    _, state = session.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(InputError, match="outside the vocabulary"):
        session.decode(torch.tensor([[-5]]), state)


@pytest.mark.parametrize("tokens, message", [
    (torch.zeros(1, 0, dtype=torch.long), r"tokens is empty \(shape \[1, 0\]\)"),
    (torch.zeros(0, 3, dtype=torch.long), r"tokens is empty \(shape \[0, 3\]\)"),
    (torch.zeros(1, 3), r"int64 tensor of shape \(batch, length\), got torch.float32"),
])
def test_empty_or_mistyped_tokens_are_refused(session, tokens, message):
    with pytest.raises(InputError, match=message):
        session.prefill(tokens)


def test_missing_or_foreign_state_is_refused(session):
    _, state = session.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(InputError, match="state must be the dict a previous prefill/decode returned, got NoneType"):
        session.decode(torch.tensor([[1]]), None)
    partial = dict(state)
    del partial["conv.1"]
    with pytest.raises(InputError, match="state lacks conv.1"):
        session.decode(torch.tensor([[1]]), partial)


def test_a_state_from_another_build_or_batch_is_refused(session, tmp_path):
    """States are tagged with the build's graphs and their batch: the tag is what refuses them (a plain dict copy
    of the same tensors passes the batch check only where the shapes bind, and is accepted for the right build)."""
    _, state = session.prefill(torch.tensor([[1, 2], [3, 4]]))
    other_spec = tmp_path / "other.yaml"
    other_spec.write_text((SPECS / "ultramem-tiny.yaml").read_text().replace("vocab_size: 512", "vocab_size: 500"))
    other = load(umc.compile(other_spec, tmp_path / "other").path,
                 weights=build_model(umc.load_spec(other_spec)).state_dict())
    with pytest.raises(InputError, match="the state comes from another build"):
        other.decode(torch.tensor([[1], [2]]), state)
    with pytest.raises(InputError, match="the state holds 2 sequences but tokens has 1 rows"):
        session.decode(torch.tensor([[1]]), state)
    logits, _ = session.decode(torch.tensor([[1], [2]]), dict(state))
    assert logits.shape == (2, 1, 512)


def test_non_finite_values_fail_every_comparison():
    finite = torch.ones(4)
    for bad in (float("nan"), float("inf")):
        broken = torch.tensor([1.0, bad, 1.0, 1.0])
        assert not compare("x", "", broken, finite, 1e-4).ok
        assert not compare("x", "", finite, broken, 1e-4).ok
        assert not compare_low_precision("x", "", broken, finite, finite.double(), "bfloat16").ok
    assert "non-finite" in compare("x", "", torch.tensor([float("nan")]), finite[:1], 1e-4).note


def test_verify_fails_on_a_kernel_that_returns_nan(tiny_build, monkeypatch):
    honest = TORCH_IMPLS["lookup_pool"]
    monkeypatch.setitem(TORCH_IMPLS, "lookup_pool", lambda attrs, *xs: (honest(attrs, *xs)[0] * float("nan"),))
    result = CliRunner().invoke(main, ["verify", str(tiny_build), "--steps", "1"])
    assert result.exit_code == 1 and "non-finite" in result.output


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_when_loaded(tmp_path, tiny_build, bad):
    weights = build_model(umc.load_spec(TINY)).state_dict()
    weights["blocks.1.ffn.up_proj.weight"][0, :3] = bad
    with pytest.raises(BindError, match=r"weight blocks.1.ffn.up_proj.weight has 3 non-finite values"):
        load(tiny_build, weights=weights)
    save_file(weights, str(tmp_path / "w.safetensors"))
    result = CliRunner().invoke(main, ["eager", TINY, "--weights", str(tmp_path / "w.safetensors"), "--steps", "1"])
    assert result.exit_code == 2 and "3 non-finite values" in result.output and "Traceback" not in result.output


def test_a_shuffle_that_is_not_a_permutation_is_refused(tiny_build):
    weights = build_model(umc.load_spec(TINY)).state_dict()
    weights["memories.1.shuffle_index"][5] = weights["memories.1.shuffle_index"][6]
    with pytest.raises(BindError, match="memories.1.shuffle_index is not a permutation of 0..255"):
        load(tiny_build, weights=weights)


# ---------------------------------------------------------------- builds that cannot be forged


def test_weights_the_manifest_does_not_list_are_never_loaded(tmp_path):
    build = umc.compile(TINY, tmp_path / "b").path
    save_weights(build_model(umc.load_spec(TINY)), build / "weights.safetensors")  # slipped in after the build
    with pytest.raises(BuildDirError, match="manifest lists no weights.safetensors"):
        load(build)
    result = CliRunner().invoke(main, ["verify", str(build), "--steps", "1"])
    assert result.exit_code == 0 and "warning: 1 file(s) in the build are not in its manifest" in result.output


@pytest.mark.parametrize("forge, message", [
    (lambda g: g["nodes"][3].update(op="rm_rf"), "unknown op 'rm_rf'"),
    (lambda g: g["nodes"][3].pop("inputs"), "missing key 'inputs'"),
    (lambda g: g["nodes"][3].update(inputs=[123456]), "%123456 is read but never defined"),
    (lambda g: g["nodes"][0].update(attrs=[["axis", "all"]]), "unknown attribute axis"),
])
def test_forged_graphs_are_one_clear_error(tmp_path, forge, message):
    build = forged(tmp_path, forge)
    with pytest.raises(BuildDirError, match=message):
        load(build, weights=build_model(umc.load_spec(TINY)).state_dict())
    result = CliRunner().invoke(main, ["verify", str(build), "--steps", "1"])
    assert result.exit_code == 2 and message.split("'")[0] in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- exit codes


def crash(*args, **kwargs):
    raise RuntimeError("deliberate bug")


@pytest.mark.parametrize("command, target", [
    (["check", TINY], "umc.cli.spec_cost"),
    (["eager", TINY, "--steps", "1"], "umc.reference.build_model"),
    (["compile", TINY, "-o", "{tmp}/b"], "umc.compiler.lower"),
    (["verify", "{build}", "--steps", "1"], "umc.verify.build_model"),
    (["verify-golden", "{golden}"], "umc.verify.lower_layer"),
])
def test_internal_errors_exit_3_with_one_line_and_a_traceback_file(tmp_path, tiny_build, monkeypatch, command, target):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # crash reports go to the temporary directory
    module, _, name = target.rpartition(".")
    monkeypatch.setattr(__import__(module, fromlist=[name]), name, crash)
    args = [a.format(tmp=tmp_path, build=tiny_build, golden=sorted(GOLDEN.glob("*.safetensors"))[0]) for a in command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    line = [l for l in result.output.splitlines() if l.startswith("internal error")][0]
    assert "RuntimeError: deliberate bug; traceback in " in line and "Traceback" not in result.output
    report = line.rsplit("traceback in ", 1)[1]
    assert report.startswith(str(tmp_path)) and "deliberate bug" in open(report).read()
    monkeypatch.setenv("UMC_DEBUG", "1")
    assert "Traceback" in CliRunner().invoke(main, args).output


@pytest.mark.parametrize("command, exit_code", [
    (["check", TINY], 0),
    (["check", str(SPECS / "nope.yaml")], 2),
    (["eager", TINY, "--steps", "1"], 0),
    (["eager", TINY, "--steps", "5000"], 2),
    (["compile", TINY, "-o", "{tmp}/b", "--quiet"], 0),
    (["compile", TINY, "-o", "{tmp}/c", "--passes", ""], 2),
    (["compile", TINY, "-o", "{tmp}/c", "--passes", "cleanup", "--disable-pass", "cleanup"], 2),
    (["verify", "{build}", "--steps", "1"], 0),
    (["verify", "{build}", "--seed", str(2**70)], 2),
    (["verify", "{build}", "--backend", "cuda-magic"], 2),
    (["verify", "{build}", "--units", "0,x"], 2),
    (["verify", "{build}", "--units", "7"], 2),
    (["verify-golden", "{golden}"], 0),
    (["verify-golden", "{tmp}/missing.safetensors"], 2),
])
def test_exit_codes(tmp_path, tiny_build, command, exit_code):
    args = [a.format(tmp=tmp_path, build=tiny_build, golden=sorted(GOLDEN.glob("*.safetensors"))[0]) for a in command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    if exit_code == 2:
        assert "rror" in result.output.splitlines()[-1]


def test_a_mismatch_exits_1_in_every_verifying_command(tmp_path, tiny_build, monkeypatch):
    honest = TORCH_IMPLS["lookup_pool"]
    monkeypatch.setitem(TORCH_IMPLS, "lookup_pool", lambda attrs, *xs: tuple(1.01 * t for t in honest(attrs, *xs)))
    assert CliRunner().invoke(main, ["verify", str(tiny_build), "--steps", "1"]).exit_code == 1
    golden = str(sorted(GOLDEN.glob("*.safetensors"))[0])
    assert CliRunner().invoke(main, ["verify-golden", golden]).exit_code == 1
    assert CliRunner().invoke(main, ["verify", str(tiny_build), "--units", "0", "--blocks", "1", "--steps", "1"]).exit_code == 1
    monkeypatch.setattr("umc.reference.model.MemoryLM.forward", lambda self, tokens, state=None, **kw: (
        torch.full((tokens.shape[0], tokens.shape[1], 512), float(tokens.shape[1])), state))
    assert CliRunner().invoke(main, ["eager", TINY, "--steps", "1"]).exit_code == 1


# ---------------------------------------------------------------- runs that cannot fit


def test_runs_that_cannot_fit_are_refused_up_front(tiny_build, monkeypatch):
    monkeypatch.setattr("umc.resources.available_memory", lambda: 1000)
    for args in (["verify", str(tiny_build)], ["eager", TINY], ["verify", str(tiny_build), "--units", "all"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "needs about" in result.output and "this machine has 1.0 kB available" in result.output


def test_the_largest_spec_is_refused_whole_and_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr("umc.resources.available_memory", lambda: 24 * 2**30)  # this machine kind: 24 GiB
    build = umc.compile(SPECS / "ultramem-1.6b-x12.yaml", tmp_path / "big").path
    result = CliRunner().invoke(main, ["verify", str(build), "--steps", "1"])
    assert result.exit_code == 2 and "needs about 43" in result.output and "--units all --blocks all" in result.output


def test_slices_verify_units_and_blocks_one_at_a_time(tiny_build):
    result = CliRunner().invoke(main, ["verify", str(tiny_build), "--units", "all", "--blocks", "0,3", "--steps", "2"])
    assert result.exit_code == 0, result.output
    for name in ("mem0.selection", "mem1.output", "block0.x", "block3.v"):
        assert name in result.output


def test_slices_check_the_builds_own_graphs(tmp_path):
    """A build whose graphs were edited (and re-hashed) fails slice verification too: slices are cut from the
    build's graphs, never recompiled."""
    def large_eps(graph):
        for node in graph["nodes"]:
            node["attrs"] = [[key, 10.0 if key == "eps" else value] for key, value in node["attrs"]]

    build = forged(tmp_path, large_eps, ("prefill", "decode"))
    for args in (["--units", "all"], ["--blocks", "1"]):
        result = CliRunner().invoke(main, ["verify", str(build), "--steps", "1", *args])
        assert result.exit_code == 1, result.output


@pytest.mark.parametrize("forge, message", [
    (lambda g: g["nodes"][3]["attrs"].append(["eps", 10**400]), "attribute"),
    (lambda g: g["inputs"][0].update(shape="B1"), "expected a list of dims"),
    (lambda g: g["nodes"][0]["scope"].update(block="x"), "scope's block"),
    (lambda g: g.update(taps=g["taps"][:-1]), "taps do not match"),
    (lambda g: g["state"][0].update(index=99), "state slots do not match"),
])
def test_more_forged_graphs_are_one_clear_error(tmp_path, forge, message):
    build = forged(tmp_path, forge, ("prefill",))
    result = CliRunner().invoke(main, ["verify", str(build), "--steps", "1"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_a_symlink_or_an_unresolvable_target_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for target, message in (("link", "is a symbolic link"), ("loop/b", "cannot resolve the path")):
        result = CliRunner().invoke(main, ["compile", TINY, "-o", str(tmp_path / target), "--quiet"])
        assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "elsewhere").exists()


def test_golden_files_with_misshapen_expectations_are_refused(tmp_path):
    golden = sorted(GOLDEN.glob("*.safetensors"))[0]
    import safetensors

    with safetensors.safe_open(str(golden), "pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors["expected_indices"] = tensors["expected_indices"][:0]
    save_file(tensors, str(tmp_path / "g.safetensors"), metadata=metadata)
    result = CliRunner().invoke(main, ["verify-golden", str(tmp_path / "g.safetensors")])
    assert result.exit_code == 2 and "tensor expected_indices has shape [0," in result.output
