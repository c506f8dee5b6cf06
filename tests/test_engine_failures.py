"""Engine steps under failure, randomness and autocast (issue: hardening, items 8-10 and 12), and the
engines' argument checks."""
import gc
import types
import weakref

import pytest
import torch

pytest.importorskip("transformers")

import seqwrap  # noqa: E402
from seqwrap.engines import kv_store, seco as seco_mod  # noqa: E402

from .hf_tiny import VOCAB, max_rel_err, tiny_model  # noqa: E402
from .mamba_utils import tiny_mamba  # noqa: E402


def _batch(T=18, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _same(a, b):
    return all((a[n] is None and b[n] is None) or (a[n] is not None and b[n] is not None and torch.equal(a[n], b[n]))
               for n in a)


def _track_stores(monkeypatch):
    refs = []
    init = kv_store.ChunkKVStore.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        refs.append(weakref.ref(self))
    monkeypatch.setattr(kv_store.ChunkKVStore, "__init__", tracked)
    return refs


@pytest.mark.parametrize("engine", ["seco", "spaco"])
@pytest.mark.parametrize("earlier_grads", [False, True])
def test_failed_step_leaves_grads_and_nothing_behind(monkeypatch, engine, earlier_grads):
    model = tiny_model("llama")
    ids = _batch()
    if earlier_grads:  # a micro-batch already accumulated
        seqwrap.SeCO(model, chunk_size=6)(ids)
    before = _grads(model)
    refs = _track_stores(monkeypatch)
    calls = {"n": 0}
    loss = seco_mod.chunk_loss_sum

    def failing(*a, **k):  # the third chunk loss of pass 2 fails, after two chunk backwards ran
        calls["n"] += 1
        if torch.is_grad_enabled() and calls["n"] >= 3:
            raise RuntimeError("injected failure")
        return loss(*a, **k)
    monkeypatch.setattr(seco_mod, "chunk_loss_sum", failing)
    eng = seqwrap.SeCO(model, chunk_size=6) if engine == "seco" else seqwrap.SpaCO(model, chunk_size=6, rate=1.0)
    with pytest.raises(RuntimeError, match="injected failure"):
        eng(ids)
    assert _same(before, _grads(model)), "a failed step changed .grad"
    gc.collect()
    assert refs and all(r() is None for r in refs), "a K/V store of the failed step is still alive"


def test_bad_label_is_refused_before_the_step():
    model = tiny_model("llama")
    ids = _batch()
    labels = ids.clone()
    labels[1, 2] = VOCAB  # chunk 0, which pass 2 reaches last: found by the pre-check, before any backward
    with pytest.raises(ValueError, match=rf"outside \[0, {VOCAB}\)"):
        seqwrap.SeCO(model, chunk_size=6)(ids, labels=labels)
    assert all(p.grad is None for p in model.parameters())
    labels[1, 2] = -5
    with pytest.raises(ValueError, match="-5"):
        seqwrap.SeCO(model, chunk_size=6)(ids, labels=labels)


def test_failed_adjoint_step_restores_grads(monkeypatch):
    model = tiny_mamba()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    eng = seqwrap.AdjointSharding(model, chunk_size=4)
    eng(ids)
    before = _grads(model)
    calls = {"n": 0}
    chunk_loss = eng._chunk_loss

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return chunk_loss(*a, **k)
    monkeypatch.setattr(eng, "_chunk_loss", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        eng(ids)
    assert _same(before, _grads(model))


def test_rng_is_left_past_every_state_the_step_used(monkeypatch):
    """The replay rewinds the generator to each chunk's pass-1 state; afterwards the generator must not
    be left at one of those states (the next step's dropout masks would repeat this step's)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    model.train()  # LoRA dropout draws from the CPU generator in every chunk
    rewound = []
    set_state = seco_mod._set_rng_state

    def recording(state, dev):
        rewound.append(state[0].clone())
        set_state(state, dev)
    monkeypatch.setattr(seco_mod, "_set_rng_state", recording)
    torch.manual_seed(123)
    ids = _batch(T=24)
    seqwrap.SeCO(model, chunk_size=6)(ids)
    assert len(rewound) >= 3
    after = torch.get_rng_state()
    draw = torch.rand(64)
    # each replayed chunk rewinds (even entries) and then puts back the state it found (odd entries),
    # which is where the generator is left: past every state the step used
    rewinds, restores = rewound[0::2], rewound[1::2]
    assert len(rewinds) == len(restores) and all(torch.equal(state, after) for state in restores)
    for state in rewinds:
        assert not torch.equal(state, after)
        torch.set_rng_state(state)
        assert not torch.equal(torch.rand(64), draw)


def test_seco_under_cpu_autocast_matches_hf():
    model = tiny_model("llama", dtype=torch.float32)
    ids = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids, labels=ids).loss
    want.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = seqwrap.SeCO(model, chunk_size=7)(ids)
    assert abs(out.loss.item() - want.item()) < 0.01 * want.item()
    assert max_rel_err(model, ref) < 0.05


def test_engine_argument_checks():
    model = tiny_model("llama")
    ids = _batch()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        seqwrap.SeCO(None)
    with pytest.raises(TypeError, match="ignore_index"):
        seqwrap.SeCO(model, 6, ignore_index=None)
    with pytest.raises(TypeError, match="integer class indices"):
        seqwrap.SeCO(model, 6)(ids, labels=ids.float())
    with pytest.raises(ValueError, match="loss_scale"):
        seqwrap.SeCO(model, 6)(ids, loss_scale=float("nan"))
    mamba = tiny_mamba()
    with pytest.raises(ValueError, match="chunk_size"):
        seqwrap.AdjointSharding(mamba, chunk_size=True)
    mids = torch.randint(0, mamba.config.vocab_size, (1, 8))
    for bad in (0, -3, float("inf")):
        with pytest.raises(ValueError, match="num_items"):
            seqwrap.AdjointSharding(mamba, chunk_size=4)(mids, num_items=bad)
    assert all(p.grad is None for p in mamba.parameters())


def test_apply_minisequence_is_all_or_nothing(monkeypatch):
    from seqwrap.hf import minisequence

    model = tiny_model("llama")
    real = minisequence._patch
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(*a, **k)
    monkeypatch.setattr(minisequence, "_patch", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        seqwrap.apply_minisequence(model)
    assert not any("_seqwrap_mst" in m.__dict__ for m in model.modules())
    assert not seqwrap.hf.is_minisequence_applied(model)


def test_fully_masked_query_row_hf_eager_vs_seqwrap():
    """HF's behaviour, documented, not ours: a query whose keys are all padding gets the mean of the
    values from Gemma2's eager attention (uniform weights over the masked keys) and 0 from seqwrap's
    block attention (as from SDPA)."""
    from transformers.models.gemma2 import modeling_gemma2

    from seqwrap.ops.attention_blocks import attend, block_mask

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float32) for _ in range(3))
    padding = torch.tensor([[False, False, True]])  # keys 0 and 1 are padding: query 0 and 1 see nothing
    mask = block_mask(0, 3, 0, 3, key_padding=padding, dtype=torch.float32)
    out, _ = attend(q, [(k, v, mask)], 0.5)
    assert torch.equal(out[0, :, :2], torch.zeros(2, 2, 4, dtype=torch.float32))

    module = types.SimpleNamespace(num_key_value_groups=1, training=False, config=None)
    # HF's additive mask: the finite dtype minimum where a pair is masked
    hf_mask = torch.where(block_mask(0, 3, 0, 3, key_padding=padding, dtype=torch.float32) < 0,
                          torch.tensor(torch.finfo(torch.float32).min), torch.tensor(0.0))
    hf_out, _ = modeling_gemma2.eager_attention_forward(module, q, k, v, hf_mask, scaling=0.5)
    hf_out = hf_out.transpose(1, 2)  # (B, H, L, D)
    assert torch.allclose(hf_out[0, :, 0], v[0].mean(dim=1), atol=1e-6)  # uniform over all 3 keys
    assert torch.allclose(hf_out[0, :, 2], out[0, :, 2], atol=1e-6)      # rows with a visible key agree
