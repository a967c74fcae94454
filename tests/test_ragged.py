"""Ragged decode batches: sequences with different past lengths decoded together equal each decoded alone, on
every backend that runs here (greedy ids equal, logits within float32 rounding)."""

import pytest
import torch

from conftest import SPECS
from umc.compiler import compile as compile_spec
from umc.export.install import export
from umc.reference import build_model
from umc.runtime import InputError, list_backends, load
from umc.spec import load_spec

PROMPTS = [[5, 17, 3], [9, 2, 44, 100, 7, 31], [1, 2, 3, 4, 5, 6, 7, 8]]
STEPS = 5
SMALL = {"triton"}  # Triton's interpreter is slow: two sequences, one step
BACKENDS = [name for name, reason in list_backends().items() if reason is None and not name.startswith("test-")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("ragged") / "build"
    compile_spec(SPECS / "ultramem-tiny.yaml", out)
    spec = load_spec(SPECS / "ultramem-tiny.yaml")
    weights = build_model(spec, seed=spec.seed).state_dict()
    if "onnxruntime" in BACKENDS:
        export(out, "onnx", weights=weights)
    return out, weights


def greedy_alone(session, prompt, count=STEPS):
    """Greedy ids and per-step logits of one sequence decoded by itself."""
    logits, state = session.prefill(torch.tensor([prompt]))
    token = logits[:, -1].argmax(-1, keepdim=True)
    ids, steps = [], []
    for _ in range(count):
        ids.append(int(token))
        step, state = session.decode(token, state)
        steps.append(step[0, 0])
        token = step[:, -1].argmax(-1, keepdim=True)
    return ids, steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ragged_batch_decodes_like_each_sequence_alone(tiny, backend):
    out, weights = tiny
    session = load(out, backend=backend, weights=weights, threads=False)
    prompts, count = (PROMPTS[1:], 1) if backend in SMALL else (PROMPTS, STEPS)
    alone = [greedy_alone(session, prompt, count) for prompt in prompts]
    states, tokens = [], []
    for prompt in prompts:
        logits, state = session.prefill(torch.tensor([prompt]))
        states.append(state)
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    state = session.batch(states)
    assert state.lengths.tolist() == [len(p) for p in prompts]
    token = torch.cat(tokens)
    for step in range(count):
        assert token[:, 0].tolist() == [ids[step] for ids, _ in alone]
        logits, state = session.decode(token, state)
        for b, (_, steps) in enumerate(alone):
            torch.testing.assert_close(logits[b, 0], steps[step], atol=1e-5, rtol=1e-4)
        token = logits[:, -1].argmax(-1, keepdim=True)
    assert state.lengths.tolist() == [len(p) + count for p in prompts]
    for b, single in enumerate(session.unbatch(state)):  # each sequence continues alone from its part
        assert single.lengths is None and single["kv_k.0"].shape[2] == len(prompts[b]) + count
        logits, _ = session.decode(token[b:b + 1], single)
        assert logits.shape == (1, 1, 512)


def test_batching_equal_lengths_is_an_ordinary_state_and_foreign_states_are_refused(tiny, tmp_path):
    out, weights = tiny
    session = load(out, weights=weights)
    a = session.prefill(torch.tensor([[1, 2, 3]]))[1]
    b = session.prefill(torch.tensor([[4, 5, 6]]))[1]
    joined = session.batch([a, b])
    assert joined.lengths is None and joined.batch == 2
    with pytest.raises(InputError, match="non-empty list of states"):
        session.batch([a, dict(b)])
    with pytest.raises(InputError, match="non-empty list of states"):
        session.batch([])


def test_a_wrong_padding_side_is_caught(tiny, monkeypatch):
    """The equality above can fail: padding a shorter past at the end instead of the front changes the logits."""
    import umc.runtime.session as session_module

    out, weights = tiny
    session = load(out, weights=weights)
    _, steps = greedy_alone(session, PROMPTS[0])
    monkeypatch.setattr(session_module, "_left_fit", lambda cache, length: torch.cat(
        [cache, cache.new_zeros(*cache.shape[:2], length - cache.shape[2], cache.shape[3])], 2))
    states = [session.prefill(torch.tensor([p]))[1] for p in PROMPTS[:2]]
    first = session.prefill(torch.tensor([PROMPTS[0]]))[0][:, -1].argmax(-1, keepdim=True)
    second = session.prefill(torch.tensor([PROMPTS[1]]))[0][:, -1].argmax(-1, keepdim=True)
    logits, _ = session.decode(torch.cat([first, second]), session.batch(states))
    assert not torch.allclose(logits[0, 0], steps[0], atol=1e-5, rtol=1e-4)
