"""Value heads of another size than the query/key heads (Dv != D, MiMo-V2-Flash) in the chunked attention,
float64 against plain PyTorch autograd.

torch's fused CPU attention kernel refuses Dv != D ("Q/K/V should have the same head size"): the block
attention picks the plain-torch block for such shapes (by shape, before any kernel call), so a step
neither dies mid-way nor depends on catching an error.
"""

import pytest
import torch

import seqwrap
from seqwrap.ops import attention_blocks as blocks_mod

from .hf_tiny import VOCAB, max_rel_err, perturb_with_sinks, reference
from .test_attention_sinks import blockwise, rel, sink_reference

transformers = pytest.importorskip("transformers")

TOL = 1e-10


@pytest.mark.parametrize("with_sinks", [False, True], ids=["plain", "sinks"])
@pytest.mark.parametrize("d, dv", [(12, 8), (8, 16)])
def test_blocks_value_dim_match_reference(monkeypatch, d, dv, with_sinks):
    # the fused kernel counts as available: the shape rule alone must keep Dv != D away from it
    monkeypatch.setattr(blocks_mod, "_fused_available", lambda _q, softcap: softcap is None)
    g = torch.Generator().manual_seed(d * 10 + dv)
    b, hq, hkv, t, chunk, window, scale = 2, 4, 2, 21, 5, 8, 0.3
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, t, dv, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(hq, generator=g, dtype=torch.float64, requires_grad=True)
    key_padding = torch.ones(b, t, dtype=torch.bool)
    key_padding[1, t - 4:] = False
    # no sinks: the same reference with a sink that carries no weight
    ref_sinks = sinks if with_sinks else torch.full((hq,), -1e4, dtype=torch.float64, requires_grad=True)
    ref = sink_reference(q, k, v, ref_sinks, scale, window, key_padding)
    assert ref.shape == (b, hq, t, dv)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v, ref_sinks), dout)
    with torch.no_grad():
        out, dq, dk, dv_, dsinks = blockwise(q, k, v, ref_sinks, scale, chunk, dout, window, key_padding)
    assert out.shape == (b, hq, t, dv) and dv_.shape == v.shape and dq.shape == q.shape
    assert rel(out, ref) <= 1e-12
    for name, a, r in zip(("q", "k", "v"), (dq, dk, dv_), ref_grads):
        assert rel(a, r) <= 1e-12, f"grad of {name}: relative error {rel(a, r):.3g}"
    if with_sinks:
        assert rel(dsinks, ref_grads[3]) <= 1e-12


def test_shape_rule_picks_block_by_shape():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    assert blocks_mod._same_head_dim(q, torch.randn(1, 2, 5, 8))
    assert not blocks_mod._same_head_dim(q, torch.randn(1, 2, 5, 6))
    # the fused CPU kernel itself refuses the shape (what the rule keeps away from it)
    with pytest.raises(RuntimeError, match="same head size"):
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, torch.randn(1, 2, 5, 8, dtype=torch.float64),
                                                                 torch.randn(1, 2, 5, 6, dtype=torch.float64), 0.0,
                                                                 False, scale=0.5)


def tiny_mimo(seed=0):
    """MiMo-V2-Flash with D = 12, Dv = 8, 4 query heads over 1 K/V head (2 in the sliding layer, which
    also has sinks), a sliding and a full layer, partial RoPE, value scale; float64 with float64 RMSNorms.
    MLPs dense: the MoE router casts to float32 with .type() (rounding that depends on how the sequence
    is cut), and routers are not what this file tests."""
    torch.manual_seed(seed)
    cfg = transformers.MiMoV2FlashConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=12, v_head_dim=8, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "dense"],
        max_position_embeddings=128)
    model = transformers.MiMoV2FlashForCausalLM(cfg).to(torch.float64)
    return perturb_with_sinks(model, "MiMoV2FlashRMSNorm")


@pytest.mark.parametrize("offload", [False, True], ids=["device", "offload"])
@pytest.mark.parametrize("chunk", [6, 7])
def test_mimo_v2_flash_seco_equals_full_backprop(chunk, offload):
    model = tiny_mimo()
    attn = model.model.layers[0].self_attn
    assert attn.head_dim != attn.v_head_dim and attn.sinks is not None
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss, grads = reference(model, ids, labels, mask)
    kw = dict(offload=True, offload_min_bytes=0) if offload else {}
    out = seqwrap.SeCO(model, chunk_size=chunk, **kw)(ids, labels=labels, attention_mask=mask)
    assert abs(out.loss.item() - loss.item()) <= TOL * abs(loss.item())
    err = max_rel_err(model, grads)
    assert err <= TOL, f"gradient relative error {err:.3g}"
