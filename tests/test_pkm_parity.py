"""The eager PKM layer against the public `product-key-memory` package (its PKM class, LayerNorm query)."""

import torch
from product_key_memory import PKM

from umc.reference import MemoryLayer
from umc.spec import MemorySpec, MemoryUnit


def pkm_spec(heads, knum, dim_head, topm, d_model, share_query=False):
    return MemorySpec(
        kind="pkm", units=(MemoryUnit(0, 0),), knum=knum, kdim=2 * dim_head, vdim=d_model, topm=topm, heads=heads,
        share_query=share_query, tucker_rank=1, cores=1, value_expansion=1, query_conv=None,
        score_activation="softmax", query_norm="layernorm_bias", key_norm="none", output_projection=False,
        norm_eps=1e-5, init="official",
    )


def test_pkm_matches_public_package():
    torch.manual_seed(0)
    d_model, heads, knum, dim_head, topm = 48, 3, 12, 10, 5
    theirs = PKM(d_model, heads=heads, num_keys=knum, topk=topm, dim_head=dim_head, use_layernorm=True).eval()
    with torch.no_grad():
        theirs.norm.weight.normal_(1.0, 0.3)
        theirs.norm.bias.normal_(0.0, 0.3)
    ours = MemoryLayer(pkm_spec(heads, knum, dim_head, topm, d_model), d_model).eval()
    # their query layout is (side, head, d) and keys (head, n, side, d); ours are (head, side, d) and (head, side, n, d)
    q = theirs.to_queries.weight.view(2, heads, dim_head, d_model).transpose(0, 1).reshape(-1, d_model)
    ours.load_state_dict({
        "query_proj.weight": q,
        "query_norm.weight": theirs.norm.weight,
        "query_norm.bias": theirs.norm.bias,
        "keys": theirs.keys.permute(0, 2, 1, 3),
        "values_for_look_up": theirs.values.weight,
    })
    x = torch.randn(2, 7, d_model)
    with torch.no_grad():
        want = theirs(x)
        got, _ = ours(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
