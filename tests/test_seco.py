"""SeCO equals full backprop (float64, relative error <= 1e-10) for every listed family."""
import pytest
import torch
import transformers

import seqwrap
from seqwrap.hf import UnsupportedModelError
from seqwrap.hf.compat import enable_checkpointing

from .hf_tiny import FAMILIES, VOCAB, max_rel_err, reference, tiny_model

TOL = 1e-10
T = 24


def batch(seed=1, pad=4, left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, T), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if pad:
        sl = slice(0, pad) if left else slice(T - pad, T)
        mask[1, sl] = 0
        labels[1, sl] = -100
    return ids, labels, mask


def check(model, chunk, ids, labels=None, mask=None, num_items=None, **kw):
    loss, grads = reference(model, ids, labels, mask, num_items)
    out = seqwrap.SeCO(model, chunk_size=chunk, **kw)(ids, labels=labels, attention_mask=mask, num_items=num_items)
    assert abs(out.loss.item() - loss.item()) <= TOL * abs(loss.item())
    err = max_rel_err(model, grads)
    assert err <= TOL, f"gradient relative error {err:.3g}"
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("chunk", [6, 7])  # divides 24 / does not
def test_families_batch2_padding(family, chunk):
    model = tiny_model(family)
    ids, labels, mask = batch()
    out = check(model, chunk, ids, labels, mask)
    assert out.num_chunks == -(-T // chunk) and out.backward_chunks == out.num_chunks
    assert out.num_items == float((labels[:, 1:] != -100).sum())
    assert out.num_tokens == int(mask.sum())


def test_left_padding_and_labels_none():
    model = tiny_model("llama")
    ids, _, mask = batch(pad=3, left=True)
    check(model, 5, ids, None, mask)


def test_single_chunk_and_chunk_longer_than_input():
    model = tiny_model("qwen2")
    ids, labels, _ = batch(pad=0)
    out = check(model, 100, ids, labels)
    assert out.num_chunks == 1


def test_one_token_chunks_and_1d_input():
    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, VOCAB, (9,))
    loss, grads = reference(model, ids[None])
    out = seqwrap.SeCO(model, chunk_size=1)(ids)
    assert out.num_chunks == 9
    assert abs(out.loss.item() - loss.item()) <= TOL * loss.item()
    assert max_rel_err(model, grads) <= TOL


def test_num_items_override_and_accumulation():
    model = tiny_model("mistral")
    ids, labels, mask = batch()
    loss, grads = reference(model, ids, labels, mask, num_items=100)
    engine = seqwrap.SeCO(model, chunk_size=5)
    half = {n: g / 2 for n, g in grads.items()}
    out = engine(ids, labels=labels, attention_mask=mask, num_items=torch.tensor(200))
    assert abs(out.loss.item() * 2 - loss.item()) <= TOL * loss.item()
    assert max_rel_err(model, half) <= TOL
    engine(ids, labels=labels, attention_mask=mask, num_items=200)  # gradients accumulate
    assert max_rel_err(model, grads) <= TOL


def test_lora_only_adapter_grads():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    ids, labels, mask = batch()
    check(lora, 7, ids, labels, mask)
    trainable = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert trainable and all("lora_" in n for n in trainable)


def test_gradient_checkpointing_inside_chunk():
    model = tiny_model("qwen3")
    model.train()
    ids, labels, mask = batch()
    loss, grads = reference(model, ids, labels, mask)
    enable_checkpointing(model)
    out = seqwrap.SeCO(model, chunk_size=7)(ids, labels=labels, attention_mask=mask)
    assert abs(out.loss.item() - loss.item()) <= TOL * loss.item()
    assert max_rel_err(model, grads) <= TOL
    assert not any("_can_checkpoint_with_cache" in m.__dict__ for m in model.modules())


def test_bfloat16_runs_close_to_float32():
    model = tiny_model("llama", dtype=torch.float32)
    ids, labels, mask = batch()
    loss, grads = reference(model, ids, labels, mask)
    model.to(torch.bfloat16)
    out = seqwrap.SeCO(model, chunk_size=5)(ids, labels=labels, attention_mask=mask)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - loss.item()) < 0.02 * loss.item()
    for n, p in model.named_parameters():
        rel = (p.grad.float() - grads[n]).norm() / grads[n].norm()
        assert rel < 0.1, n


def test_bad_inputs():
    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, VOCAB, (2, 10))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be > 0"):
            seqwrap.SeCO(model, chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        seqwrap.SeCO(model, chunk_size=2.5)
    with pytest.raises(TypeError, match="unknown option"):
        seqwrap.SeCO(model, chunk_size=4, chunk=3)
    engine = seqwrap.SeCO(model, chunk_size=4)
    with pytest.raises(ValueError, match=r"labels shape \(2, 9\) does not match input_ids shape \(2, 10\)"):
        engine(ids, labels=ids[:, :9])
    with pytest.raises(ValueError, match="attention_mask shape"):
        engine(ids, attention_mask=torch.ones(2, 11))
    with pytest.raises(TypeError, match="integer token ids"):
        engine(ids.float())
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=32))
    with pytest.raises(ValueError, match=r"33 tokens is longer than the model's limit \(max_position_embeddings=32"):
        seqwrap.SeCO(gpt2, chunk_size=8)(torch.randint(0, VOCAB, (1, 33)))  # learned absolute positions
    assert all(p.grad is None for p in gpt2.parameters())
    with pytest.raises(ValueError, match="num_items must be > 0"):
        engine(ids, num_items=0)
    assert all(p.grad is None for p in model.parameters()), "a refused call must not touch gradients"


def test_unsupported_models_named():
    import transformers

    mamba = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(
        vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2))
    with pytest.raises(UnsupportedModelError, match="model_type 'falcon_mamba'"):
        seqwrap.SeCO(mamba, chunk_size=4)(torch.randint(0, VOCAB, (1, 8)))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        seqwrap.SeCO(bert, chunk_size=4)
    with pytest.raises(UnsupportedModelError, match="Linear"):
        seqwrap.SeCO(torch.nn.Linear(2, 2))


def test_import_seqwrap_without_transformers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; import seqwrap; seqwrap.sample_chunks(2, probs=[1, 1])\n"
            "try:\n    seqwrap.SeCO\nexcept ImportError:\n    print('lazy')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"
