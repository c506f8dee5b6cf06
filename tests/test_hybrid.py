"""SeCO / SpaCO on SSM and hybrid HF models equal full backprop.

Float64 in `pure_float64()` (HF's mixers then compute in float64 throughout, see hybrid_tiny.py):
relative error <= 1e-10 on the loss and every gradient, for every supported family, batch 2, chunk
sizes that do and do not divide the length, ignored labels. Without it (HF's own float32 islands)
the match is to float32 rounding."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import seqwrap
from seqwrap.hf import UnsupportedModelError
from seqwrap.hf.compat import enable_checkpointing
from seqwrap.hf.hybrid import SUPPORTED

from .hf_tiny import max_rel_err
from .hybrid_tiny import FAMILIES, VOCAB, pure_float64, tiny_hybrid

TOL = 1e-10
T = 29


def options(family):
    return {"attention": "concat"} if family == "zamba2" else {}


def batch(seed=1, length=T, ignore=5):
    """ids (2, length), labels with `ignore` random positions of row 1 set to -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, length), generator=g)
    labels = ids.clone()
    labels[1, torch.randperm(length, generator=g)[:ignore]] = -100
    return ids, labels


def reference(model, ids, labels, mask=None):
    """HF full backprop: (loss, {name: grad}); the loss formed from HF's logits in the model's dtype."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB).to(torch.float64 if logits.dtype == torch.float64 else
                                                         torch.float32),
                           shift.reshape(-1), reduction="sum") / (shift != -100).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check(model, chunk, ids, labels, tol=TOL, engine=seqwrap.SeCO, mask=None, **kw):
    loss, grads = reference(model, ids, labels, mask)
    out = engine(model, chunk_size=chunk, **kw)(ids, labels=labels, attention_mask=mask)
    assert abs(out.loss.item() - loss.item()) <= tol * abs(loss.item())
    err = max_rel_err(model, grads)
    assert err <= tol, f"gradient relative error {err:.3g}"
    model.zero_grad(set_to_none=True)
    return out


def test_every_supported_family_has_a_tiny_model():
    assert sorted(FAMILIES) == sorted(SUPPORTED)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("chunk", [8, 6])  # 29 tokens: 8 leaves a 5-token tail, 6 leaves 5 too; 32 below
def test_families_float64_exact(family, chunk):
    model = tiny_hybrid(family)
    ids, labels = batch()
    with pure_float64():
        out = check(model, chunk, ids, labels, **options(family))
    assert out.num_chunks == -(-T // chunk) and out.backward_chunks == out.num_chunks


@pytest.mark.parametrize("family", ["mamba2", "bamba"])
def test_chunk_dividing_the_length(family):
    model = tiny_hybrid(family)
    ids, labels = batch(length=32)
    with pure_float64():
        out = check(model, 8, ids, labels)
    assert out.num_chunks == 4


def test_single_token_tail_is_merged():
    """17 tokens in chunks of 8: the last token joins the chunk before (HF runs one token through an
    in-place state update); still exact."""
    model = tiny_hybrid("nemotron_h")
    ids, labels = batch(length=17)
    with pure_float64():
        out = check(model, 8, ids, labels)
    assert out.num_chunks == 2


@pytest.mark.parametrize("family, tol", [("bamba", 1e-5), ("qwen3_next", 1e-3)])
def test_hf_float32_islands_match_to_float32_rounding(family, tol):
    """Without pure_float64: HF computes its scans and norms in float32 inside; the chunked step then
    matches full backprop to float32 rounding only (rounding depends on where the sequence is cut).
    Qwen3-Next's A_log and dt_bias gradients are ~1e-4 of the others' and relatively noisier (2e-4)."""
    model = tiny_hybrid(family)
    ids, labels = batch()
    check(model, 8, ids, labels, tol=tol)


def test_float32_model():
    model = tiny_hybrid("mamba2", dtype=torch.float32)
    ids, labels = batch()
    check(model, 8, ids, labels, tol=1e-4)


def test_lora_on_mixer_projections():
    peft = pytest.importorskip("peft")
    model = tiny_hybrid("bamba")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=["in_proj", "out_proj", "q_proj", "v_proj"]))
    ids, labels = batch()
    with pure_float64():
        check(lora, 7, ids, labels)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("mamba.in_proj.lora_A" in n for n in trainable) and any("self_attn.q_proj" in n for n in trainable)


def test_gradient_checkpointing():
    """HF (non-reentrant) checkpointing of the decoder layers: the recompute in backward reads the same state
    leaves and writes its end states again (ignored). Checkpoint recomputes run outside pure_float64, so the
    comparison is at float32 rounding."""
    model = tiny_hybrid("granitemoehybrid")
    enable_checkpointing(model)
    model.train()
    ids, labels = batch()
    check(model, 8, ids, labels, tol=1e-5)


def test_padding_mask():
    """Right padding: HF zeroes the padded positions' mixer inputs; the chunked step does the same per chunk."""
    model = tiny_hybrid("bamba")
    ids, labels = batch(ignore=0)
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0
    labels[1, -6:] = -100
    with pure_float64():
        check(model, 8, ids, labels, mask=mask)


def test_spaco_rate_one_equals_seco():
    model = tiny_hybrid("zamba2")
    ids, labels = batch()
    seqwrap.SeCO(model, chunk_size=8, attention="concat")(ids, labels=labels)
    seco = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = seqwrap.SpaCO(model, chunk_size=8, rate=1.0, seed=2, attention="concat")(ids, labels=labels)
    assert out.backward_chunks == out.num_chunks == 4
    assert all(torch.equal(p.grad, seco[n]) for n, p in model.named_parameters() if p.grad is not None)


def test_spaco_bernoulli_exact_expectation_by_enumeration():
    """E[estimate] over the 2^4 chunk selections is the exact gradient: the state adjoint relayed through a
    recomputed chunk carries that chunk's 1/q like its K/V gradients."""
    model = tiny_hybrid("bamba")
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    q = [0.3, 0.9, 0.5, 0.7]
    with pure_float64():
        loss, grads = reference(model, ids, ids)
        names = [n for n, _ in model.named_parameters() if n in grads]
        exact = torch.cat([grads[n].reshape(-1) for n in names])
        mean = torch.zeros_like(exact)
        for keep in itertools.product([0, 1], repeat=4):
            engine = seqwrap.SpaCO(model, chunk_size=4, rate=1.0, seed=0)
            engine.chunk_weights = lambda counts, keep=keep: [1 / qi if k else 0.0 for qi, k in zip(q, keep)]
            out = engine(ids)
            assert abs(out.loss.item() - loss.item()) <= 1e-12 * loss.item()
            prob = math.prod(qi if k else 1 - qi for qi, k in zip(q, keep))
            params = dict(model.named_parameters())
            if any(params[n].grad is not None for n in names):
                mean += prob * torch.cat([(params[n].grad if params[n].grad is not None else
                                           torch.zeros_like(params[n])).reshape(-1) for n in names])
            model.zero_grad(set_to_none=True)
    assert ((mean - exact).norm() / exact.norm()).item() <= 1e-10


def test_gradients_accumulate_over_steps():
    model = tiny_hybrid("mamba2")
    ids, labels = batch()
    with pure_float64():
        _, grads = reference(model, ids, labels)
        engine = seqwrap.SeCO(model, chunk_size=8)
        engine(ids, labels=labels, loss_scale=0.5)
        engine(ids, labels=labels, loss_scale=0.5)
    assert max_rel_err(model, grads) <= TOL


# -- refused ---------------------------------------------------------------------------------------
def test_falcon_mamba_refused_with_reason():
    import transformers

    model = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(
        vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'falcon_mamba'.*ignores the cached SSM state"):
        seqwrap.SeCO(model, chunk_size=4)


def test_unlisted_recurrent_family_refused():
    import transformers

    falcon = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=4,
        mamba_n_groups=1, mamba_chunk_size=8))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'falcon_h1'.*checked to continue a sequence"):
        seqwrap.SeCO(falcon, chunk_size=4)


def test_model_conditions_refused():
    with pytest.raises(UnsupportedModelError, match=r"'zamba2' shares its attention blocks.*attention='concat'"):
        seqwrap.SeCO(tiny_hybrid("zamba2"), chunk_size=8)
    with pytest.raises(UnsupportedModelError, match=r"z_loss_coefficient=0.1"):
        seqwrap.SeCO(tiny_hybrid("bamba", z_loss_coefficient=0.1), chunk_size=8)
    with pytest.raises(ValueError, match=r"chunk_size must be >= 2 for model_type 'mamba2'"):
        seqwrap.SeCO(tiny_hybrid("mamba2"), chunk_size=1)
