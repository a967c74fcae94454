"""`umc run`: greedy ids equal a greedy loop over the eager reference (the oracle) on every backend, seeded
sampling repeats and stays inside the top k of each step's logits (checked against the eager model's logits),
every bad input exits 2 with one line naming it, and a session refuses a state that is not its own."""

import json
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import umc
import umc.cli  # noqa: F401 - the command's module is imported the way the CLI imports it
from conftest import ROOT, SPECS
from umc.export.install import export
from umc.generate import generate, next_tokens, run_command
from umc.reference import build_model, save_weights
from umc.runtime import InputError, list_backends, load
from umc.spec import spec_from_dict

TINY = str(SPECS / "ultramem-tiny.yaml")
SPEC = umc.load_spec(TINY)
VOCAB = SPEC.model.vocab_size


@pytest.fixture(scope="module")
def eager():
    """The oracle: the eager reference with the spec's seeded weights."""
    return build_model(SPEC, seed=SPEC.seed)


@pytest.fixture(scope="module")
def build(tmp_path_factory, eager):
    """A tiny build shipping the seeded weights, exported to ONNX (the onnxruntime backend reads that export)."""
    root = tmp_path_factory.mktemp("generate")
    save_weights(eager, root / "w.safetensors")
    path = umc.compile(TINY, root / "tiny", weights=root / "w.safetensors").path
    export(path, "onnx")
    return path


def eager_greedy(model, prompts, count):
    """Greedy continuation of ``prompts`` (lists of ids) by ``count`` ids, the eager model's own loop."""
    tokens, out = torch.tensor(prompts), []
    with torch.no_grad():
        logits, state = model(tokens)
        while True:
            out.append(logits[:, -1].argmax(-1, keepdim=True))
            if len(out) == count:
                return torch.cat(out, 1).tolist()
            logits, state = model(out[-1], state)


def run(*args):
    """``umc run`` with ``args``; the click result (stdout and stderr apart)."""
    return CliRunner().invoke(run_command, [str(a) for a in args])


def ids(result):
    """The generated ids on stdout, one list per sequence; the run must have succeeded."""
    assert result.exit_code == 0, result.output
    return [[int(i) for i in line.split()] for line in result.stdout.splitlines()]


# ---------------------------------------------------------------- sampling rules


def test_greedy_ties_go_to_the_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    assert next_tokens(logits).tolist() == [[1], [0]]


def test_top_k_sampling_draws_only_from_the_k_highest_logits():
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0, 1.8, 0.5]])
    draws = {int(next_tokens(logits, 1.0, 3, torch.Generator().manual_seed(s))) for s in range(300)}
    assert draws == {1, 2, 4}
    assert {int(next_tokens(logits, 1.0, None, torch.Generator().manual_seed(s))) for s in range(300)} == set(range(6))
    assert {int(next_tokens(logits, 5.0, 1, torch.Generator().manual_seed(s))) for s in range(20)} == {1}


# ---------------------------------------------------------------- greedy against the oracle


def test_greedy_run_of_a_spec_equals_the_eager_greedy_loop(eager):
    result = run(TINY, "--prompt", "1 5 7 9", "--max-new-tokens", 12)
    assert ids(result) == eager_greedy(eager, [[1, 5, 7, 9]], 12)
    assert "greedy" in result.stderr and "seeded weights (seed 0)" in result.stderr
    prefill, decode = result.stderr.splitlines()[-2:]
    assert prefill.startswith("prefill: 1 x 4 tokens in ") and prefill.endswith(" tokens/s)")
    assert decode.startswith("decode: 11 new tokens (1 x 11 steps) in ") and " tokens/s)" in decode


def test_prompt_file_runs_as_one_batch_with_the_given_weights(tmp_path):
    other = build_model(SPEC, seed=1)
    save_weights(other, tmp_path / "w1.safetensors")
    prompts = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(3)).tolist()
    (tmp_path / "p.txt").write_text("\n".join(", ".join(map(str, p)) for p in prompts) + "\n\n")
    result = run(TINY, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", 10,
                 "--weights", tmp_path / "w1.safetensors")
    assert ids(result) == eager_greedy(other, prompts, 10)
    assert "prefill: 4 x 6 tokens" in result.stderr


@pytest.mark.parametrize("backend", sorted(list_backends()))
def test_greedy_ids_are_identical_on_every_backend(tmp_path, build, eager, backend):
    reason = list_backends()[backend]
    if reason is not None:
        pytest.skip(f"backend {backend} cannot run here: {reason}")
    prompts = [[172, 47], [314, 193]]  # chosen so that every greedy id differs from the others and the prompt's
    (tmp_path / "p.txt").write_text("172 47\n314 193\n")
    # few tokens: the triton backend runs its kernels through Triton's interpreter on a CPU
    result = run(build, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", 3, "--backend", backend)
    expected = eager_greedy(eager, prompts, 3)
    assert all(len(set(p + e)) == 5 for p, e in zip(prompts, expected))
    assert ids(result) == expected


def test_a_spec_runs_on_onnxruntime_through_its_temporary_export(eager):
    if list_backends().get("onnxruntime", "not registered") is not None:
        pytest.skip(f"onnxruntime cannot run here: {list_backends().get('onnxruntime', 'not registered')}")
    assert ids(run(TINY, "--prompt", "2 7 1", "--max-new-tokens", 5, "--backend", "onnxruntime")) == \
        eager_greedy(eager, [[2, 7, 1]], 5)


def test_a_build_without_weights_runs_the_seeded_weights_and_says_so(tmp_path, eager):
    bare = umc.compile(TINY, tmp_path / "bare").path
    result = run(bare, "--prompt", "4 4 8", "--max-new-tokens", 4)
    assert ids(result) == eager_greedy(eager, [[4, 4, 8]], 4)
    assert f"{bare} ships no weights.safetensors; using the eager reference's seeded weights (seed 0)" in result.stderr


# ---------------------------------------------------------------- sampling


def test_seeded_sampling_repeats_and_the_seed_matters(build):
    args = (build, "--prompt", "1 2 3", "--max-new-tokens", 12, "--temperature", 1.0, "--top-k", 50)
    first, again, other = ids(run(*args, "--seed", 7)), ids(run(*args, "--seed", 7)), ids(run(*args, "--seed", 8))
    assert first == again and first != other
    unseeded = run(*args)
    seed = int(re.search(r"sampling, .* seed (\d+)$", unseeded.stderr, re.M).group(1))  # printed to repeat the run
    assert ids(run(*args, "--seed", seed)) == ids(unseeded)


def test_sampled_ids_are_within_the_top_k_of_their_step(build, eager):
    session = load(build)
    prompt = torch.tensor([[5, 9, 2], [0, 511, 17]])
    out = generate(session, prompt, 16, temperature=2.0, top_k=3, seed=11).tokens
    with torch.no_grad():
        logits, _ = eager(torch.cat([prompt, out[:, :-1]], 1))  # logits at position t predict id t + 1
    steps = logits[:, prompt.shape[1] - 1:]
    chosen = steps.gather(-1, out[..., None])[..., 0]
    third = steps.topk(3, dim=-1).values[..., -1]
    assert (chosen >= third - 1e-4 * steps.abs().max()).all()
    assert (out != steps.argmax(-1)).any()  # it did sample: not every id is the greedy one
    assert torch.equal(generate(session, prompt, 8, temperature=1.0, top_k=1).tokens,
                       generate(session, prompt, 8).tokens)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["--prompt", "1 512 3"], "--prompt: item 2 is 512, outside the vocabulary (allowed: 0..511)"),
    (["--prompt", "1,-1"], "--prompt: item 2 is -1, outside the vocabulary"),
    (["--prompt", "1 x 3"], "--prompt: item 2 'x' is not an integer token id"),
    (["--prompt", "1 2.5"], "--prompt: item 2 '2.5' is not an integer token id"),
    (["--prompt", ""], "--prompt is empty: give at least one token id"),
    (["--prompt", " , "], "--prompt is empty: give at least one token id"),
    (["--prompt", " ".join(["1"] * 250)],
     "a prompt of 250 tokens + 32 new tokens = 282 exceeds the spec's max_seq_len 256"),
    (["--prompt", " ".join(["1"] * 257)], "the prompt has 257 tokens, more than the spec's max_seq_len 256"),
    (["--prompt", "1", "--max-new-tokens", "0"], "max_new_tokens must be at least 1, got 0"),
    (["--prompt", "1", "--prompt-file", "{tmp}/p.txt"], "give exactly one of --prompt and --prompt-file (got both)"),
    ([], "give exactly one of --prompt and --prompt-file (got neither)"),
    (["--prompt-file", "{tmp}/missing.txt"], "--prompt-file {tmp}/missing.txt: cannot read it"),
    (["--prompt-file", "{tmp}/p.txt"], "--prompt-file {tmp}/p.txt: prompt 2 has 3 ids, prompt 1 has 2"),
    (["--prompt-file", "{tmp}/blank.txt"], "--prompt-file {tmp}/blank.txt is empty"),
    (["--prompt-file", "{tmp}/bad.txt"], "--prompt-file {tmp}/bad.txt line 2: item 1 '٣' is not an integer token id"),
    (["--prompt", "1", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--prompt", "1", "--temperature", "nan"], "temperature must be a finite number >= 0 (0 means greedy), got nan"),
    (["--prompt", "1", "--temperature", "1", "--top-k", "0"], "top_k must be at least 1, got 0"),
    (["--prompt", "1", "--backend", "cuda-magic"], "unknown backend 'cuda-magic'"),
])
def test_bad_input_exits_2_with_one_line_naming_it(tmp_path, args, message):
    (tmp_path / "p.txt").write_text("1 2\n3 4 5\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "bad.txt").write_text("1\n٣\n", encoding="utf-8")
    result = run(TINY, *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {message.format(tmp=tmp_path)}")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output and not result.stdout


def test_a_missing_target_exits_2(tmp_path):
    result = run(tmp_path / "nope.yaml", "--prompt", "1")
    assert result.exit_code == 2 and "Traceback" not in result.output and len(result.stderr.splitlines()) == 1


# ---------------------------------------------------------------- state from elsewhere (the session's checks)


def test_decode_refuses_a_state_from_another_build(tmp_path, build):
    """A build of another spec whose state has the very same names and shapes: only the build's tag tells them
    apart."""
    other_spec = spec_from_dict({**SPEC.to_dict(), "name": "ultramem-tiny-other", "seed": 1})
    other = load(umc.compile(other_spec, tmp_path / "other").path,
                 weights=build_model(other_spec, seed=1).state_dict())
    _, foreign = other.prefill(torch.tensor([[1, 2, 3]]))
    mine = load(build)
    _, own = mine.prefill(torch.tensor([[1, 2, 3]]))
    assert {k: v.shape for k, v in foreign.items()} == {k: v.shape for k, v in own.items()}
    with pytest.raises(InputError):
        mine.decode(torch.tensor([[4]]), foreign)


def test_decode_refuses_a_state_of_another_batch_size(build):
    session = load(build)
    _, state = session.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(InputError):
        session.decode(torch.tensor([[7]]), state)


def test_decode_takes_a_state_from_another_session_of_the_same_build(build):
    first, second = load(build), load(build)
    logits, state = first.prefill(torch.tensor([[1, 2, 3]]))
    expected, _ = first.decode(torch.tensor([[4]]), state)
    assert torch.equal(second.decode(torch.tensor([[4]]), state)[0], expected)


# ---------------------------------------------------------------- the module itself


def test_importing_the_command_loads_neither_torch_nor_a_cycle():
    """``umc.cli`` imports this module for every command: it must stay light, and importable first."""
    script = "import json, sys; import umc.generate; import umc.cli; print(json.dumps('torch' in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) is False
