"""Decoding token by token (with the state) equals one full-sequence forward, for both memory kinds."""

import dataclasses

import pytest
import torch

from umc.reference import build_model


def with_conv(spec, kernel):
    return dataclasses.replace(spec, memory=dataclasses.replace(spec.memory, query_conv=kernel))


def run_incremental(model, tokens, chunks):
    """Feed tokens in the given chunk sizes, carrying the state; return all logits."""
    pieces, state, start = [], None, 0
    for size in chunks:
        logits, state = model(tokens[:, start:start + size], state)
        pieces.append(logits)
        start += size
    return torch.cat(pieces, dim=1), state


@pytest.mark.parametrize("kind", ["tiny_spec", "pkm_spec"])
@pytest.mark.parametrize("conv", [None, 3])
def test_decode_equals_prefill(kind, conv, request):
    spec = with_conv(request.getfixturevalue(kind), conv)
    model = build_model(spec, seed=3)
    tokens = torch.randint(0, spec.model.vocab_size, (3, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(tokens)
        stepped, state = run_incremental(model, tokens, [5] + [1] * 9)
        chunked, _ = run_incremental(model, tokens, [2, 4, 1, 7])
    assert state.length == 14
    assert (stepped - full).abs().max() <= 1e-5
    assert (chunked - full).abs().max() <= 1e-5


def test_query_conv_changes_the_output(tiny_spec):
    """The conv is really applied: same weights elsewhere, different kernels give different logits."""
    tokens = torch.randint(0, tiny_spec.model.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with_k3, _ = build_model(with_conv(tiny_spec, 3), seed=0)(tokens)
        without, _ = build_model(with_conv(tiny_spec, None), seed=0)(tokens)
    assert (with_k3 - without).abs().max() > 1e-3


def test_conv_state_holds_the_last_inputs(tiny_spec):
    model = build_model(tiny_spec)
    tokens = torch.randint(0, tiny_spec.model.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = model(tokens)
    kernel = tiny_spec.memory.query_conv
    assert all(c.shape == (2, kernel - 1, tiny_spec.model.d_model) for c in state.conv)
    assert all(k.shape[2] == 5 for k, _ in state.kv)


def test_sequence_longer_than_max_is_refused(tiny_spec):
    model = build_model(tiny_spec)
    tokens = torch.zeros(1, tiny_spec.model.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens)
