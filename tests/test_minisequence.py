"""apply_minisequence: loss and every parameter gradient equal the unpatched model's (float64).

Each listed family, with and without peft LoRA, with HF gradient checkpointing off,
non-reentrant and reentrant; length 13 with 4 or 5 mini-sequences (not divisible),
a right-padded row with ignored labels, num_items_in_batch and shift_labels.
"""
import pytest
import torch

import seqwrap
from seqwrap.hf.mst_mlp import MiniSequenceMLP

from .mst_tiny import DEFAULT_LORA_TARGETS, FAMILIES, batch, causal_lm_loss_exact, grads, max_rel_error, pair, tiny_model

RTOL = 1e-10


@pytest.fixture
def count_mlp_calls(monkeypatch):
    calls = []
    original = MiniSequenceMLP.apply

    def counting(*args):
        calls.append(len(args[2]))  # number of mini-sequences
        return original(*args)

    monkeypatch.setattr(MiniSequenceMLP, "apply", counting)
    return calls


def _gc(model, mode):
    if mode == "off":
        return
    seqwrap.hf.enable_checkpointing(model, use_reentrant=mode == "reentrant")
    if mode == "reentrant" and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad


def _step(model, inputs):
    model.train()
    out = model(**inputs)
    out.loss.backward()
    return out


@pytest.mark.parametrize("gc", ["off", "non-reentrant", "reentrant"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_grads_match(family, lora, gc, count_mlp_calls):
    ref, twin = pair(family, lora=lora)
    _gc(ref, gc)
    _gc(twin, gc)
    seqwrap.apply_minisequence(twin, mlp_chunks=4)
    inputs = batch(13)
    want = _step(ref, inputs)
    got = _step(twin, inputs)
    assert got.logits is None  # training with labels: no full logits
    assert got.loss.dtype == torch.float64
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)
    assert max_rel_error(grads(ref), grads(twin)) < RTOL
    assert count_mlp_calls and set(count_mlp_calls) == {4}  # the mini-sequence path really ran


@pytest.mark.parametrize("family", FAMILIES)
def test_num_items_in_batch_and_shift_labels(family):
    ref, twin = pair(family)
    seqwrap.apply_minisequence(twin, mlp_chunks=5)
    inputs = batch(17, seed=family.__len__())
    n_items = torch.tensor(23)
    want = _step(ref, dict(inputs, num_items_in_batch=n_items))
    got = _step(twin, dict(inputs, num_items_in_batch=n_items))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)
    assert max_rel_error(grads(ref), grads(twin)) < RTOL

    # shift_labels given explicitly: used as is, no shift inside
    ref.zero_grad(), twin.zero_grad()
    labels = inputs.pop("labels")
    shift = torch.roll(labels, -2, dims=1)
    want = _step(ref, dict(inputs, labels=labels, shift_labels=shift))
    got = _step(twin, dict(inputs, labels=labels, shift_labels=shift))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)
    assert max_rel_error(grads(ref), grads(twin)) < RTOL


def test_matches_transformers_float32_loss():
    """Against the real ForCausalLMLoss (float32 logits inside) at float32 tolerance."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    ref, twin = pair("gemma2")
    ref.loss_function = ForCausalLMLoss
    seqwrap.apply_minisequence(twin, mlp_chunks=3)
    inputs = batch(11)
    want, got = _step(ref, inputs), _step(twin, inputs)
    assert want.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss.float(), want.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunks", [None, 1, 2, 13, 50])
def test_chunk_counts(chunks, count_mlp_calls):
    """None (auto: 1 at this length, plain forward), 1, up to more chunks than tokens."""
    ref, twin = pair("llama")
    seqwrap.apply_minisequence(twin, mlp_chunks=chunks)
    inputs = batch(13)
    want, got = _step(ref, inputs), _step(twin, inputs)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)
    assert max_rel_error(grads(ref), grads(twin)) < RTOL
    expected = set() if chunks is None else {min(chunks, 13)}
    assert set(count_mlp_calls) == expected


def test_auto_chunks_at_length(count_mlp_calls):
    """mlp_chunks=None, from memory: one token of a shard holds (6 I + 3 H) * 8 = 576 * 8 bytes (H 32, I 80,
    float64), the target is the call's hidden states (tokens * 32 * 8): ceil(576 / 32) = 18 shards, at
    most tokens // 256."""
    ref, twin = pair("llama")
    seqwrap.apply_minisequence(twin)
    mlp_ref, mlp = ref.model.layers[0].mlp, twin.model.layers[0].mlp
    for tokens, chunks in ((255, None), (600, 2), (5000, 18)):
        count_mlp_calls.clear()
        x = torch.randn(1, tokens, 32, dtype=torch.float64, requires_grad=True)
        y = mlp(x)
        assert count_mlp_calls == ([] if chunks is None else [chunks])
        g = torch.autograd.grad(y.sum(), [x, *mlp.parameters()])
        want = torch.autograd.grad(mlp_ref(x).sum(), [x, *mlp_ref.parameters()])
        for a, b in zip(g, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family, shards", [("llama", 6), ("phi3", 7)])
def test_memory_budget_picks_uneven_shards_and_stays_exact(family, shards, count_mlp_calls):
    """mlp_memory = 23040 bytes, 2 x 13 = 26 tokens, float64, H 32, I 80. Llama (gated, 6 I + 3 H = 576
    per token): ceil(26 * 576 * 8 / 23040) = 6 shards; Phi3 (fused gate_up, 8 I + 3 H = 736):
    ceil(26 * 736 * 8 / 23040) = 7. Over 13 positions: slices of 2 and 3 tokens (uneven)."""
    ref, twin = pair(family)
    seqwrap.apply_minisequence(twin, mlp_memory=23040)
    inputs = batch(13)
    want, got = _step(ref, inputs), _step(twin, inputs)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)
    assert max_rel_error(grads(ref), grads(twin)) < RTOL
    assert set(count_mlp_calls) == {shards}


def test_applied_before_peft():
    """apply_minisequence first, get_peft_model after: LoRA layers inside the MLP are found at call time."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("qwen2")
    twin_base = tiny_model("qwen2")
    seqwrap.apply_minisequence(twin_base, mlp_chunks=3)
    cfg = dict(r=4, target_modules=DEFAULT_LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(3)
    ref = get_peft_model(base, LoraConfig(**cfg)).double()
    torch.manual_seed(3)
    twin = get_peft_model(twin_base, LoraConfig(**cfg)).double()
    ref.get_base_model().loss_function = causal_lm_loss_exact
    inputs = batch(12)
    want, got = _step(ref, inputs), _step(twin, inputs)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)
    assert max_rel_error(grads(ref), grads(twin)) < RTOL


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_float32_and_cpu_autocast_against_transformers(autocast):
    """Float32 model against transformers' own loss; under bfloat16 autocast within bfloat16 rounding."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    ref, twin = pair("llama", dtype=torch.float32)
    ref.loss_function = ForCausalLMLoss
    seqwrap.apply_minisequence(twin, mlp_chunks=3)
    inputs = batch(16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want, got = ref(**inputs), twin(**inputs)
    want.loss.backward(), got.loss.backward()
    assert got.loss.dtype == torch.float32
    tol = 5e-2 if autocast else 1e-5
    torch.testing.assert_close(got.loss, want.loss, rtol=tol / 10, atol=0)
    assert max_rel_error(grads(ref), grads(twin)) < tol
