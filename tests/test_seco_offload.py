"""SeCO's block-by-block attention over the past (no concatenation) and host offload: still exact.

On this CPU-only machine offload runs its synchronous path (pool buffers, host-side relay sums,
parked activations); the CUDA side streams are the same code with asynchronous copies."""
import copy

import pytest
import torch

import seqwrap
from seqwrap.engines import kv_store as kv_mod
from seqwrap.engines.offload import HostPool, Transfers, park_activations, prefetched
from seqwrap.hf import UnsupportedModelError

from .hf_tiny import FAMILIES, max_rel_err, reference, tiny_model
from .test_seco import TOL, batch, check


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_offload_equals_full_backprop(family):
    model = tiny_model(family)
    ids, labels, mask = batch()
    engine_kw = dict(offload=True, offload_min_bytes=0)
    check(model, 7, ids, labels, mask, **engine_kw)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_concat_attention_still_exact(family):
    model = tiny_model(family)
    ids, labels, mask = batch()
    check(model, 5, ids, labels, mask, attention="concat")


def test_no_past_concatenation(monkeypatch):
    """The chunked path never calls torch.cat on K/V: the cache's update hands back the fresh K/V only."""
    model = tiny_model("llama")
    ids, labels, mask = batch()
    seen = []
    real_cat = torch.cat

    def spy(tensors, *a, **k):  # concatenations of (B, H, L, D) tensors along the sequence
        if k.get("dim", a[0] if a else 0) in (-2, 2) and all(t.dim() == 4 for t in tensors):
            seen.append([tuple(t.shape) for t in tensors])
        return real_cat(tensors, *a, **k)

    monkeypatch.setattr(kv_mod.torch, "cat", spy)
    check(model, 6, ids, labels, mask)
    assert seen == []
    check(model, 6, ids, labels, mask, attention="concat")
    assert seen, "the concat path does concatenate (the spy works)"


def test_offload_with_checkpointing_and_lora_parks_activations():
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen3")
    model.train()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    seqwrap.hf.enable_checkpointing(lora)
    ids, labels, mask = batch()
    loss, grads = reference(lora, ids, labels, mask)
    engine = seqwrap.SeCO(lora, chunk_size=7, offload=True, offload_min_bytes=0)
    out = engine(ids, labels=labels, attention_mask=mask)
    assert abs(out.loss.item() - loss.item()) <= TOL * loss.item()
    assert max_rel_err(lora, grads) <= TOL
    stats = engine.offload_stats
    assert stats["parked_bytes"] > 0 and stats["host_peak_bytes"] > 0


def test_pool_reused_across_steps_and_emptied():
    model = tiny_model("mistral")
    ids, labels, mask = batch()
    engine = seqwrap.SeCO(model, chunk_size=5, offload=True)
    engine(ids, labels=labels, attention_mask=mask)
    reserved = engine.pool.reserved
    assert reserved > 0 and engine.pool.in_use == 0
    engine(ids, labels=labels, attention_mask=mask)
    assert engine.pool.reserved == reserved, "the second step must reuse the first step's host buffers"
    assert engine.pool.in_use == 0


def test_spaco_with_offload_equals_spaco_without():
    ids, labels, mask = batch()
    grads = []
    for offload in (False, True):
        model = tiny_model("llama")
        out = seqwrap.SpaCO(model, chunk_size=4, rate=0.5, seed=11, offload=offload)(ids, labels=labels,
                                                                                      attention_mask=mask)
        assert 0 < out.backward_chunks < out.num_chunks
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-12, atol=1e-14)


def test_bfloat16_offload_close_to_float32():
    model = tiny_model("llama", dtype=torch.float32)
    ids, labels, mask = batch()
    loss, grads = reference(model, ids, labels, mask)
    model.to(torch.bfloat16)
    engine = seqwrap.SeCO(model, chunk_size=5, offload=True, offload_min_bytes=0)
    out = engine(ids, labels=labels, attention_mask=mask)
    assert abs(out.loss.item() - loss.item()) < 0.02 * loss.item()
    for n, p in model.named_parameters():
        assert (p.grad.float() - grads[n]).norm() / grads[n].norm() < 0.1, n


def test_attention_outside_the_registry_is_refused():
    """A layer whose attention does not go through transformers' registry would silently see only its
    own chunk: the engine notices. Asked for attention='chunked' it refuses before any gradient and points
    to attention='concat'; by default it switches to 'concat' (exact) with a warning."""
    model = tiny_model("llama")
    attn = model.model.layers[1].self_attn
    forward = attn.forward

    def own_attention(*args, **kwargs):  # this layer picks its attention itself (sdpa)
        shared, attn.config = attn.config, copy.copy(attn.config)
        attn.config._attn_implementation = "sdpa"
        try:
            return forward(*args, **kwargs)
        finally:
            attn.config = shared

    attn.forward = own_attention
    ids, labels, mask = batch()
    with pytest.raises(UnsupportedModelError, match="attention='concat'"):
        seqwrap.SeCO(model, chunk_size=6, attention="chunked")(ids, labels=labels, attention_mask=mask)
    assert all(p.grad is None for p in model.parameters()), "refused before any gradient"
    assert model.config._attn_implementation == "sdpa", "the attention implementation is restored"
    with pytest.raises(UnsupportedModelError, match="needs attention='chunked'"):
        seqwrap.SeCO(model, chunk_size=6, offload=True)(ids, labels=labels, attention_mask=mask)
    assert all(p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    check(model, 6, ids, labels, mask, attention="concat")
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="uses attention='concat'"):
        check(model, 6, ids, labels, mask)  # default: switches to 'concat' in the first chunk, exact


def test_engine_option_errors():
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="attention must be 'chunked' or 'concat'"):
        seqwrap.SeCO(model, chunk_size=4, attention="flash")
    with pytest.raises(ValueError, match="offload=True needs attention='chunked'"):
        seqwrap.SeCO(model, chunk_size=4, attention="concat", offload=True)
    with pytest.raises(ValueError, match="offload_min_bytes must be an int >= 0"):
        seqwrap.SeCO(model, chunk_size=4, offload=True, offload_min_bytes=-1)
    engine = seqwrap.SeCO(model, chunk_size=4)
    ids = torch.randint(0, 61, (1, 8))
    with pytest.raises(TypeError, match="num_items or num_items_in_batch, not both"):
        engine(ids, num_items=3, num_items_in_batch=3)
    with pytest.raises(ValueError, match="position_ids shape"):
        engine(ids, position_ids=torch.arange(7)[None])
    model.model.layers[0].self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="attention dropout is not supported"):
        engine(ids)


def test_position_ids_and_shift_labels_match_hf():
    model = tiny_model("llama")
    ids, labels, _ = batch(pad=0)
    loss, grads = reference(model, ids, labels)
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    out = seqwrap.SeCO(model, chunk_size=5)(ids, shift_labels=shift, position_ids=pos)
    assert abs(out.loss.item() - loss.item()) <= TOL * loss.item()
    assert max_rel_err(model, grads) <= TOL


# -- the offload pieces --------------------------------------------------------------------------

def test_host_pool_reuses_and_checks():
    pool = HostPool(pin=False)
    a = pool.get((3, 4), torch.float32)
    pool.release(a)
    b = pool.get((12,), torch.float32)  # same byte size: the same buffer
    assert b.data_ptr() == a.data_ptr() and pool.reserved == 48 and pool.in_use == 48
    with pytest.raises(ValueError, match="not a buffer handed out by this pool"):
        pool.release(torch.zeros(12))
    pool.release(b)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(b)
    assert pool.in_use == 0 and pool.peak_in_use == 48
    pool.clear()
    assert pool.reserved == 0 and pool.get((2,), torch.float64).numel() == 2 and pool.reserved == 16


def test_prefetched_keeps_order_and_passes_device_tensors():
    xfer = Transfers(torch.device("cpu"), HostPool(pin=False))
    host = [xfer.to_host(torch.full((2,), float(i)))[0] for i in range(3)]
    items = [(i, (h,), True) for i, h in enumerate(host)] + [("dev", (torch.ones(1),), False)]
    got = [(key, t[0].tolist()) for key, t in prefetched(items, xfer)]
    assert got == [(0, [0.0, 0.0]), (1, [1.0, 1.0]), (2, [2.0, 2.0]), ("dev", [1.0])]


def test_park_activations_round_trip_and_skips():
    xfer = Transfers(torch.device("cpu"), HostPool(pin=False))
    w = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    stats = {}
    with park_activations(xfer, {w.untyped_storage().data_ptr()}, 0, stats):
        y = (torch.tanh(x @ w) ** 2).sum()
    y.backward()
    parked = stats["parked_bytes"]
    assert parked > 0
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (torch.tanh(x @ w) ** 2).sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)
    stats = {}
    with park_activations(xfer, set(), 10**9, stats):  # everything under the size floor stays
        (x * 2).sum()
    assert stats.get("parked_bytes", 0) == 0


def test_pool_counters_agree_with_the_memory_model():
    """bf16 Llama, offload, 35 chunks of 2 tokens: the pool's own per-kind peaks (stored past K/V, relayed
    K/V gradient sums) equal the memory model's host terms, byte for byte. Chunks 0 and 1 get more than
    RELAY_PLAIN_MAX_ADDS = 32 additions, so their sums carry a bf16 compensation, but only from their 33rd
    addition on (from about the 23rd: relay_plain_adds), when most later sums are freed: the peak is the 68 tokens
    of sums of the first replay. (tests/test_kv_store.py checks a schedule where the compensations set it.)"""
    from seqwrap.memory_model import DecoderShape, seco_peak

    assert kv_mod.RELAY_PLAIN_MAX_ADDS == 32
    model = tiny_model("llama", dtype=torch.float32).to(torch.bfloat16)
    T, C = 70, 2
    ids = torch.randint(3, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    engine = seqwrap.SeCO(model, chunk_size=C, offload=True, offload_min_bytes=0)
    engine(ids, labels=ids.clone())
    shape = DecoderShape.from_config(model.config)
    est = seco_peak(shape, T, C, dtype_bytes=2, lora_params=0, grad_ckpt=False, offload=True).host
    kv_tok = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2  # bytes of bf16 K and V per token
    assert est["past K/V"] == 68 * kv_tok and est["relayed K/V gradient sums"] == 68 * kv_tok
    assert engine.pool.peak_by["kv"] == est["past K/V"]
    assert engine.pool.peak_by["relay"] == est["relayed K/V gradient sums"]
    assert engine.pool.in_use_by["kv"] == engine.pool.in_use_by["relay"] == 0  # all handed back
