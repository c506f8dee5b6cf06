"""Attention sinks (gpt-oss `s_aux`: one extra logit per query head in the softmax denominator, no value)
in the chunked attention, float64 against plain PyTorch autograd.

(a) the block primitives (attend / BlockBackward / sinks_grad) over several query and key blocks, causal,
    sliding window, key padding, GQA, against a plain softmax-with-sink reference: output and the
    gradients of q, k, v and the sinks;
(b) a tiny random gpt-oss (sliding + full layers, MoE) trained by SeCO in its default chunked attention,
    with and without offload, by SpaCO (exact expectation over every draw), and by SeCO over Ulysses on
    2 gloo processes, against full backprop: every parameter gradient, the sinks' included.
"""
import functools
import itertools
import math
import types

import pytest
import torch

import seqwrap
from seqwrap.ops import attention_blocks as blocks_mod
from seqwrap.ops.reference import attention_ref
from seqwrap.ops.attention_blocks import EMPTY, BlockBackward, attend, block_mask

from .hf_tiny import VOCAB, max_rel_err, perturb_with_sinks, reference
from .hybrid_tiny import pure_float64

transformers = pytest.importorskip("transformers")

TOL = 1e-10


# -- (a) block primitives ---------------------------------------------------------------------------
def sink_reference(q, k, v, sinks, scale, window=None, key_padding=None):
    """Softmax with one sink logit per head (HF's gpt-oss eager attention): seqwrap.ops.reference.attention_ref."""
    return attention_ref(q, k, v, scale=scale, window=window, key_padding=key_padding, sinks=sinks)[0]


def blockwise(q, k, v, sinks, scale, chunk, dout, window=None, key_padding=None, softcap=None):
    """attend + BlockBackward per query chunk over every key chunk (EMPTY blocks skipped), as the engines
    run them. Returns (out, dq, dk, dv, dsinks)."""
    t = q.shape[2]
    bounds = [(s, min(s + chunk, t)) for s in range(0, t, chunk)]
    outs, dq = [], []
    dk, dv, dsinks = torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(sinks)
    for q0, q1 in bounds:
        blocks = []
        for k0, k1 in bounds:
            m = block_mask(q0, q1, k0, k1, causal=True, window=window, key_padding=key_padding, dtype=q.dtype)
            if m is not EMPTY:
                blocks.append((k0, k1, m))
        qc = q[:, :, q0:q1]
        out, lse = attend(qc, [(k[:, :, a:e], v[:, :, a:e], m) for a, e, m in blocks], scale, softcap, sinks,
                          v.shape[-1])
        grads = BlockBackward(dout[:, :, q0:q1], qc, out, lse, k.shape[1], scale, softcap, sinks)
        for a, e, m in blocks:
            gk, gv = grads.block(k[:, :, a:e], v[:, :, a:e], m)
            dk[:, :, a:e] += gk
            dv[:, :, a:e] += gv
        outs.append(out)
        dq.append(grads.dq())
        dsinks += grads.sinks_grad()
    return torch.cat(outs, 2), torch.cat(dq, 2), dk, dv, dsinks


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-block", "torch-block"])
@pytest.mark.parametrize("hq, hkv, t, chunk, window, pad", [
    (4, 2, 23, 6, None, "right"),   # GQA, chunks that do not divide T, right padding
    (4, 1, 24, 6, 9, "left"),       # MQA, sliding window over chunk borders, left padding (rows with no key)
    (2, 2, 17, 4, 3, None),         # window smaller than a chunk: empty blocks
    (6, 2, 13, 13, None, "right"),  # one chunk
])
def test_blocks_with_sinks_match_reference(monkeypatch, fused, hq, hkv, t, chunk, window, pad):
    monkeypatch.setattr(blocks_mod, "_fused_available", lambda _q, softcap: fused and softcap is None)
    g = torch.Generator().manual_seed(hq * 100 + t)
    b, d = 2, 8
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(hq, generator=g, dtype=torch.float64, requires_grad=True)
    key_padding = None
    if pad is not None:
        key_padding = torch.ones(b, t, dtype=torch.bool)
        key_padding[1, t - 5:] = False if pad == "right" else True
        if pad == "left":
            key_padding[1, :7] = False
    scale = 0.4
    ref = sink_reference(q, k, v, sinks, scale, window, key_padding)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v, sinks), dout)
    with torch.no_grad():
        out, *grads = blockwise(q, k, v, sinks, scale, chunk, dout, window, key_padding)
    assert rel(out, ref) <= 1e-12
    for name, a, r in zip(("q", "k", "v", "sinks"), grads, ref_grads):
        assert rel(a, r) <= 1e-12, f"grad of {name}: relative error {rel(a, r):.3g}"
    # the sinks are not negligible here: dropping them changes the output and they get a real gradient
    assert rel(sink_reference(q, k, v, torch.full_like(sinks, -1e4), scale, window, key_padding), ref) > 1e-2
    assert ref_grads[3].abs().min() > 1e-6


def test_sinks_with_softcap_match_reference():
    """The soft-capped plain-torch block with sinks (no HF family combines them today; the math allows it)."""
    g = torch.Generator().manual_seed(5)
    b, hq, hkv, t, d, cap, scale = 1, 4, 2, 15, 8, 2.0, 0.5
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(hq, generator=g, dtype=torch.float64, requires_grad=True)
    ref, _ = attention_ref(q, k, v, scale=scale, sinks=sinks, softcap=cap)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v, sinks), dout)
    with torch.no_grad():
        out, *grads = blockwise(q, k, v, sinks, scale, 4, dout, softcap=cap)
    assert rel(out, ref) <= 1e-12
    for name, a, r in zip(("q", "k", "v", "sinks"), grads, ref_grads):
        assert rel(a, r) <= 1e-12, f"grad of {name}: relative error {rel(a, r):.3g}"


def test_no_key_at_all_gives_zero_output_and_sink_lse():
    q = torch.randn(2, 4, 3, 8, dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64)
    out, lse = attend(q, [], 0.3, sinks=sinks, value_dim=5)
    assert out.shape == (2, 4, 3, 5) and bool((out == 0).all())
    torch.testing.assert_close(lse, sinks.view(1, 4, 1).expand(2, 4, 3), rtol=0, atol=0)


# -- (b) a tiny gpt-oss through the engines --------------------------------------------------------------
def tiny_gpt_oss(seed=0, window=5, heads=4, kv_heads=2):
    """2 layers (sliding, full), 4 experts top-2, hidden 32, float64; RMSNorms computed in float64 (HF's
    cast to float32 would add rounding that depends on how the sequence is cut); random sinks of size ~1
    so they matter. output_router_logits stays False (router aux losses are another item)."""
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=window,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, experts_implementation="eager",
        output_router_logits=False)
    model = transformers.GptOssForCausalLM(cfg).to(torch.float64)
    return perturb_with_sinks(model, "GptOssRMSNorm")


def gpt_oss_batch(t=24, pad=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, t), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if pad:
        mask[1, t - pad:] = 0
        labels[1, t - pad:] = -100
    return ids, labels, mask


def sinks_of(grads):
    return {n: g for n, g in grads.items() if n.endswith("self_attn.sinks")}


@pytest.mark.parametrize("offload", [False, True], ids=["device", "offload"])
@pytest.mark.parametrize("chunk", [6, 7])  # divides 24 / does not
def test_gpt_oss_seco_equals_full_backprop(chunk, offload):
    model = tiny_gpt_oss()
    ids, labels, mask = gpt_oss_batch()
    loss, grads = reference(model, ids, labels, mask)
    assert len(sinks_of(grads)) == 2 and all(g.norm() > 1e-4 for g in sinks_of(grads).values())
    kw = dict(offload=True, offload_min_bytes=0) if offload else {}
    engine = seqwrap.SeCO(model, chunk_size=chunk, **kw)
    assert engine.attention == "chunked"  # the default mode
    out = engine(ids, labels=labels, attention_mask=mask)
    assert out.num_chunks == -(-24 // chunk)
    assert abs(out.loss.item() - loss.item()) <= TOL * abs(loss.item())
    err = max_rel_err(model, grads)
    assert err <= TOL, f"gradient relative error {err:.3g}"
    for name, p in model.named_parameters():
        if name.endswith("sinks"):
            assert rel(p.grad, grads[name]) <= TOL, name


def test_gpt_oss_seco_gqa_one_kv_head_no_padding():
    model = tiny_gpt_oss(seed=3, window=9, heads=4, kv_heads=1)
    ids, labels, _ = gpt_oss_batch(t=20, pad=0, seed=4)
    loss, grads = reference(model, ids, labels)
    out = seqwrap.SeCO(model, chunk_size=3)(ids, labels=labels)
    assert abs(out.loss.item() - loss.item()) <= TOL * abs(loss.item())
    assert max_rel_err(model, grads) <= TOL


def test_gpt_oss_spaco_exact_expectation():
    """SpaCO with Bernoulli draws: the expectation over all 2^3 selections of the weighted gradient (the
    sinks' included) is the exact gradient."""
    model = tiny_gpt_oss(seed=2)
    ids, labels, _ = gpt_oss_batch(t=12, pad=0, seed=5)
    _, grads = reference(model, ids, labels)
    names = [n for n, p in model.named_parameters() if n in grads]
    exact = torch.cat([grads[n].reshape(-1) for n in names])
    probs = [0.4, 0.7, 0.9]
    mean = torch.zeros_like(exact)
    for keep in itertools.product([0, 1], repeat=3):
        weights = [1 / qi if k else 0.0 for qi, k in zip(probs, keep)]
        engine = seqwrap.SpaCO(model, chunk_size=4, rate=1.0, seed=0)
        engine.chunk_weights = lambda counts, w=weights: list(w)
        model.zero_grad(set_to_none=True)
        out = engine(ids, labels=labels)
        assert out.backward_chunks == sum(keep)
        if any(keep):
            g = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names])
            mean += math.prod(qi if k else 1 - qi for qi, k in zip(probs, keep)) * g
    model.zero_grad(set_to_none=True)
    assert rel(mean, exact) <= TOL


# -- SeCO over Ulysses (2 gloo processes): the sinks sliced to each rank's heads ----------------------------
def _ulysses_worker(rank, world):
    import seqwrap.parallel as sp

    model = tiny_gpt_oss(seed=6)
    ids, labels, _ = gpt_oss_batch(t=24, pad=0, seed=7)
    sp.apply_ulysses(model)
    out = seqwrap.SeCO(model, chunk_size=10)(**sp.shard_batch({"input_ids": ids, "labels": labels}, None,
                                                                  chunk_size=10))
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@functools.lru_cache(maxsize=None)
def _ulysses_results(world):
    from .dist_utils import run_distributed

    return run_distributed(_ulysses_worker, world)


def test_gpt_oss_seco_over_ulysses():
    model = tiny_gpt_oss(seed=6)
    ids, labels, _ = gpt_oss_batch(t=24, pad=0, seed=7)
    loss, grads = reference(model, ids, labels)
    for rank, (r_loss, r_grads) in enumerate(_ulysses_results(2)):
        assert abs(r_loss - loss.item()) <= TOL * abs(loss.item()), rank
        worst = max(rel(r_grads[n], g) for n, g in grads.items())
        assert worst <= TOL, f"rank {rank}: gradient relative error {worst:.3g}"


def test_plain_ulysses_attention_refuses_sinks():
    """The plain Ulysses entry (no SeCO) has no sink logits inside a rank: it refuses s_aux instead of
    silently attending without them."""
    from seqwrap.hf.ulysses import UlyssesState, ulysses_attention_forward

    module = types.SimpleNamespace(_seqwrap_ulysses=UlyssesState(group=None, chunk_size=None), training=False)
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    k = v = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention sinks"):
        ulysses_attention_forward(module, q, k, v, None, s_aux=torch.zeros(4, dtype=torch.float64))


# the other families with s_aux in this transformers; their sink forms differ (Granite-SWA: output *
# sigmoid(lse - sink); Flint: float32 scores) but all are the same extra softmax logit
SINK_FAMILIES = {
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM", {}),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM",
                       dict(num_local_experts=4, num_experts_per_tok=2)),
    "flint": ("FlintConfig", "FlintForCausalLM", {}),
}


@pytest.mark.parametrize("family", sorted(SINK_FAMILIES))
def test_other_sink_families_seco_equals_full_backprop(family):
    cfg_name, model_name, kw = SINK_FAMILIES[family]
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_name}")
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=5, bos_token_id=None,
        eos_token_id=None, layer_types=["sliding_attention", "full_attention"], experts_implementation="eager",
        **kw)
    model = getattr(transformers, model_name)(cfg).to(torch.float64)
    perturb_with_sinks(model)
    ids, labels, mask = gpt_oss_batch()
    with pure_float64():  # drops dtype=float32 softmaxes too (Granite-SWA)
        loss, grads = reference(model, ids, labels, mask)
        assert len(sinks_of(grads)) == 2
        out = seqwrap.SeCO(model, chunk_size=7)(ids, labels=labels, attention_mask=mask)
    assert abs(out.loss.item() - loss.item()) <= TOL * abs(loss.item())
    err = max_rel_err(model, grads)
    assert err <= TOL, f"gradient relative error {err:.3g}"
