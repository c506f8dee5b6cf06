"""apply_minisequence: loss and every parameter gradient equal the unpatched model's (float64).

Each listed family, with and without peft LoRA, with HF gradient checkpointing off,
non-reentrant and reentrant; length 13 with 4 or 5 mini-sequences (not divisible),
a right-padded row with ignored labels, num_items_in_batch and shift_labels.
"""
import pytest
import torch

import seqwrap
from seqwrap.models.mst_mlp import MiniSequenceMLP

from .hf_tiny import FAMILIES, batch, grads, max_rel_error, pair

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
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
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
