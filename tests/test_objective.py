"""The engine's sequence-level objective hook (seqwrap/engines/objective.py): SeCO(..., objective=fn) against full
backprop of fn(S) in float64, S the per-row sums of the labels' log-probs from HF's full forward logits."""
import pytest
import torch
import torch.nn.functional as F

import seqwrap
from seqwrap.hf.float64 import pure_float64

from .exact_families import batch, build, labels_of

pytest.importorskip("transformers")


def full_sums(model, ids, labels, mask):
    """S (B,) from HF's full forward: sum over the counted (shifted) labels of log_softmax(logits)."""
    logits = model(ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V), predicts labels[:, 1:]
    target = labels[:, 1:]
    counted = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * counted).sum(dim=1)


def dpo_like(ref, beta=0.3):
    """A DPO-style loss of S = [chosen ; rejected] (2P,), reference sums `ref` (2P,) through the closure."""
    def fn(S):
        chosen, rejected = (S - ref).chunk(2)
        return -F.logsigmoid(beta * (chosen - rejected)).mean() + 0.01 * (S ** 2).mean() / 100
    return fn


def preference_batch(T=23):
    """4 rows (2 pairs), right padding in two rows, the first 6 tokens (the prompt) of each row not counted."""
    ids, _ = batch(B=4, T=T, seed=3)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    mask[3, -9:] = 0
    labels = labels_of(ids, mask).clone()
    labels[:, :6] = -100
    return ids, labels, mask


def reference(model, ids, labels, mask, fn):
    model.zero_grad(set_to_none=True)
    with pure_float64():
        S = full_sums(model, ids, labels, mask)
        loss = fn(S)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), S.detach(), grads


def lora(model):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("chunk", [5, 8])
def test_objective_step_equals_full_backprop_of_fn_of_S(chunk, use_lora):
    model = build("llama")
    if use_lora:
        pytest.importorskip("peft")
        model = lora(model)
    ids, labels, mask = preference_batch()
    with torch.no_grad(), pure_float64():
        ref_S = full_sums(model, ids, labels, mask) + torch.randn(4, dtype=torch.float64)  # some "reference"
    fn = dpo_like(ref_S)
    want_loss, want_S, want = reference(model, ids, labels, mask, fn)
    with pure_float64():
        out = seqwrap.SeCO(model, chunk_size=chunk)(ids, labels=labels, attention_mask=mask, objective=fn)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-12, abs=0)
    assert torch.allclose(out.sequence_logps, want_S, rtol=1e-12, atol=0)
    assert out.num_chunks == -(-23 // chunk) and out.backward_chunks == out.num_chunks
    assert set(got) == set(want) and (not use_lora or all("lora_" in n for n in got))
    for n, g in got.items():
        assert want[n].norm() > 0, n
        assert (g - want[n]).norm() <= 1e-10 * want[n].norm(), n


def test_objective_gradient_is_not_the_token_loss_gradient():
    """The check above can fail: the plain token-loss step (or c = 1 per row) gives other gradients."""
    model = build("llama")
    ids, labels, mask = preference_batch()
    fn = dpo_like(torch.zeros(4, dtype=torch.float64))
    _, _, want = reference(model, ids, labels, mask, fn)
    with pure_float64():
        seqwrap.SeCO(model, chunk_size=5)(ids, labels=labels, attention_mask=mask, objective=lambda S: -S.sum())
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert max(((g - want[n]).norm() / want[n].norm()).item() for n, g in got.items()) > 1e-3


def test_sequence_logps_and_evaluate_with_objective_write_no_gradient():
    model = build("llama")
    ids, labels, mask = preference_batch()
    fn = dpo_like(torch.zeros(4, dtype=torch.float64))
    want_loss, want_S, _ = reference(model, ids, labels, mask, fn)
    engine = seqwrap.SeCO(model, chunk_size=7)
    with pure_float64():
        S = engine.sequence_logps(ids, labels, attention_mask=mask)
        out = engine.evaluate(ids, labels, attention_mask=mask, objective=fn)
        with torch.no_grad():
            out2 = engine(ids, labels=labels, attention_mask=mask, objective=fn)
    assert S.dtype == torch.float64 and S.shape == (4,)
    assert torch.allclose(S, want_S, rtol=1e-12, atol=0)
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-12) and out2.loss.item() == out.loss.item()
    assert all(p.grad is None for p in model.parameters())


def test_objective_refusals():
    model = build("llama")
    ids, labels, mask = preference_batch()
    engine = seqwrap.SeCO(model, chunk_size=7)
    with pytest.raises(TypeError, match="objective must be a callable"):
        engine(ids, labels=labels, objective=3.0)
    with pytest.raises(TypeError, match="num_items does not apply"):
        engine(ids, labels=labels, objective=lambda S: S.sum(), num_items=4)
    with pytest.raises(ValueError, match="real 0-d tensor"):
        engine(ids, labels=labels, objective=lambda S: S)
    with pytest.raises(ValueError, match="does not depend on S"):
        engine(ids, labels=labels, objective=lambda S: torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(FloatingPointError, match="non-finite"):
        engine(ids, labels=labels, objective=lambda S: (S * float("inf")).sum())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(NotImplementedError, match="SeCO only"):
        seqwrap.SpaCO(model, chunk_size=7, rate=0.5, seed=0)(ids, labels=labels, objective=lambda S: S.sum())
    with pytest.raises(NotImplementedError, match="packed rows"):
        engine(ids[:1], labels=labels[:1], position_ids=torch.arange(23).remainder(12).unsqueeze(0),
               objective=lambda S: S.sum())
    assert all(p.grad is None for p in model.parameters())


def test_objective_with_router_aux_loss_is_refused():
    from .test_exactness import MOE

    model = build("mixtral", output_router_logits=True, experts_implementation="eager", **MOE["mixtral"])
    ids, labels, mask = preference_batch()
    with pytest.raises(NotImplementedError, match="router auxiliary loss"):
        seqwrap.SeCO(model, chunk_size=7)(ids, labels=labels, attention_mask=mask, objective=lambda S: S.sum())
    assert all(p.grad is None for p in model.parameters())


def test_objective_check_fails_when_the_row_weights_are_permuted(monkeypatch):
    """The key comparison above can fail: with c = dfn/dS given to the wrong rows, the gradients differ."""
    from seqwrap.engines import objective

    model = build("llama")
    ids, labels, mask = preference_batch()
    fn = dpo_like(torch.zeros(4, dtype=torch.float64))
    _, _, want = reference(model, ids, labels, mask, fn)
    weights = objective.weights

    def permuted(f, S, name):
        value, c = weights(f, S, name)
        return value, c.flip(0)

    monkeypatch.setattr(objective, "weights", permuted)
    with pure_float64():
        seqwrap.SeCO(model, chunk_size=5)(ids, labels=labels, attention_mask=mask, objective=fn)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert max(((g - want[n]).norm() / want[n].norm()).item() for n, g in got.items()) > 1e-3
