"""Decoding token by token (with the state) equals one full-sequence forward, for both memory kinds."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from umc.reference import build_model
from umc.reference.memory import QueryConv


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


def test_conv_and_no_conv_models_share_every_other_weight(tiny_spec):
    """Per-name seeding: adding a query conv adds its taps and changes nothing else."""
    conv = build_model(with_conv(tiny_spec, 3), seed=0).state_dict()
    plain = build_model(with_conv(tiny_spec, None), seed=0).state_dict()
    assert set(conv) - set(plain) == {f"memories.{j}.query_conv.{p}" for j in (0, 1) for p in ("weight", "bias")}
    assert all(torch.equal(conv[name], plain[name]) for name in plain)


def test_query_conv_changes_the_output(tiny_spec):
    """Identity taps (tap 0 = 1, others and bias 0) give exactly the no-conv model; the random taps do not."""
    tokens = torch.randint(0, tiny_spec.model.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    conv_model = build_model(with_conv(tiny_spec, 3), seed=0)
    with torch.no_grad():
        without, _ = build_model(with_conv(tiny_spec, None), seed=0)(tokens)
        with_taps, _ = conv_model(tokens)
        for layer in conv_model.memories:
            layer.query_conv.weight.zero_()
            layer.query_conv.weight[:, 0] = 1.0
            layer.query_conv.bias.zero_()
        with_identity, _ = conv_model(tokens)
    assert torch.equal(with_identity, without)
    assert (with_taps - without).abs().max() > 1e-3


def conv1d_reference(weight, bias, x, past):
    """The causal depthwise conv by torch's conv1d: the K-1 past inputs are the left padding, and since
    conv1d correlates, tap j (j steps back) sits at kernel position K-1-j."""
    window = torch.cat([past, x], dim=1).transpose(1, 2)  # (B, D, K-1+T)
    kernel = weight.flip(-1).unsqueeze(1)  # (D, 1, K)
    return F.conv1d(window, kernel, bias, groups=x.shape[-1]).transpose(1, 2)


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_query_conv_equals_torch_conv1d(kernel):
    gen = torch.Generator().manual_seed(kernel)
    conv = QueryConv(8, kernel).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(8, kernel, generator=gen))
        conv.bias.copy_(torch.randn(8, generator=gen))
        x = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
        past = torch.randn(2, kernel - 1, 8, generator=gen, dtype=torch.float64)
        fresh, fresh_past = conv(x, None)
        continued, continued_past = conv(x, past)
        want_fresh = conv1d_reference(conv.weight, conv.bias, x, torch.zeros_like(past))
        want_continued = conv1d_reference(conv.weight, conv.bias, x, past)
    assert (fresh - want_fresh).abs().max() <= 1e-12
    assert (continued - want_continued).abs().max() <= 1e-12
    assert torch.equal(fresh_past, x[:, x.shape[1] - (kernel - 1):])
    assert torch.equal(continued_past, fresh_past)


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
