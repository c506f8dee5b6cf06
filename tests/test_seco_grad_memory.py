"""SeCO's gradient bookkeeping (issue 24, item 1): the step accumulates straight into .grad, keeps at most
one copy of the gradients for a rollback (none when .grad starts None or zeroed), and a failed step still
leaves .grad bitwise as it was, the same tensor objects included."""
import pytest
import torch

pytest.importorskip("transformers")

import seqwrap  # noqa: E402
from seqwrap.engines import seco as seco_mod  # noqa: E402
from seqwrap.parallel.grad_sync import keep_grads, rollback_grads  # noqa: E402

from .hf_tiny import VOCAB, reference, tiny_model  # noqa: E402

STARTS = ["none", "zeros", "earlier"]


def _batch(T=18, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


def _start(model, start):
    """.grad None / zero_grad(set_to_none=False) / a micro-batch already accumulated (random values)."""
    if start == "none":
        model.zero_grad(set_to_none=True)
        return
    for p in model.parameters():
        p.grad = torch.randn_like(p) if start == "earlier" else torch.zeros_like(p)


def _snapshot(model):
    """name -> (the .grad object, its bytes) so identity and bitwise values are both compared."""
    return {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _assert_as_before(model, before):
    for n, p in model.named_parameters():
        obj, val = before[n]
        if obj is None:
            assert p.grad is None, f"{n}: .grad was None before the failed step"
            continue
        assert p.grad is obj, f"{n}: .grad is no longer the tensor it was"
        assert torch.equal(p.grad.view(torch.int64), val.view(torch.int64)), f"{n}: .grad changed (bitwise)"


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("where", ["last_chunk_loss", "after_all_backwards"])
def test_failed_step_leaves_grad_bitwise(monkeypatch, start, where):
    model = tiny_model("llama")
    ids = _batch()
    _start(model, start)
    before = _snapshot(model)
    if where == "last_chunk_loss":  # 3 chunks: pass 2's third loss is chunk 0's, after two backwards
        calls = {"n": 0}
        loss = seco_mod.chunk_loss_sum

        def failing(*a, **k):
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("injected failure")
            return loss(*a, **k)
        monkeypatch.setattr(seco_mod, "chunk_loss_sum", failing)
    else:  # every chunk's backward has written into .grad, then the step fails
        passes = seco_mod.SeCO._passes

        def failing(self, *a, **k):
            passes(self, *a, **k)
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in self._params())
            raise RuntimeError("injected failure")
        monkeypatch.setattr(seco_mod.SeCO, "_passes", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        seqwrap.SeCO(model, chunk_size=6)(ids)
    _assert_as_before(model, before)


@pytest.mark.parametrize("start", STARTS)
def test_step_accumulates_into_grad_like_full_backprop(start):
    model = tiny_model("llama")
    ids = _batch(seed=1)
    _start(model, start)
    old = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    objs = {n: p.grad for n, p in model.named_parameters()}
    seqwrap.SeCO(model, chunk_size=5)(ids)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if objs[n] is not None:
            assert p.grad is objs[n], f"{n}: accumulation replaced the .grad tensor"
    _, ref = reference(model, ids)  # full backprop, float64 (HF's own loss would cast logits to float32)
    for n, p in model.named_parameters():
        want = ref[n] if old[n] is None else old[n] + ref[n]
        assert (got[n] - want).norm() <= 1e-10 * want.norm(), n


def test_keep_grads_copies_only_what_a_rollback_needs():
    a, b, c, d = (torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)) for _ in range(4))
    b.grad = torch.zeros_like(b)
    c.grad = torch.randn_like(c)
    d.grad = torch.full_like(d, -0.0)  # all zeros by value, not bitwise: zero_() would change it
    kept = keep_grads([a, b, c, d])
    assert [k.copy is None for k in kept] == [True, True, False, False]
    assert kept[2].copy.data_ptr() != c.grad.data_ptr()
    before = [None, b.grad, c.grad.clone(), d.grad.clone()]
    gb, gc_, gd = b.grad, c.grad, d.grad
    for p in (a, b, c, d):  # a step writes into (or creates) every .grad
        p.grad = torch.ones_like(p) if p.grad is None else p.grad.add_(1.0)
    rollback_grads([a, b, c, d], kept)
    assert a.grad is None and b.grad is gb and c.grad is gc_ and d.grad is gd
    assert not b.grad.view(torch.int64).any()
    assert torch.equal(c.grad, before[2])
    assert torch.equal(d.grad.view(torch.int64), before[3].view(torch.int64))  # -0.0 kept bitwise
