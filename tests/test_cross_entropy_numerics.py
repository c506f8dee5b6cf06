"""Cross-entropy at the edges of the float range, and options that do not fit the compute dtype
(issue 16, item 11)."""
import math

import pytest
import torch
import torch.nn.functional as F

import seqwrap

pytestmark = pytest.mark.ccore
C = seqwrap._C


def huge_inputs(V=5):
    """hidden (2, 1), weight (V, 1): every logit is 3e38 (row 0) or near it (row 1)."""
    h = torch.tensor([[1.0], [0.5]])
    w = torch.full((V, 1), 3e38)
    w[1, 0] = 3.2e38
    return h, w, torch.tensor([0, 2])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_with_logits_near_the_float32_limit(reduction):
    h, w, y = huge_inputs()
    w.requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ours = seqwrap.linear_cross_entropy(h, w, y, label_smoothing=0.1, reduction=reduction)
    ref = F.cross_entropy(F.linear(h.double(), w64), y, label_smoothing=0.1, reduction=reduction)
    assert torch.isfinite(ours).all(), ours
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(w.grad.double() / 3e38, w64.grad / 3e38, rtol=1e-5, atol=1e-6)


def test_the_example_of_the_issue():
    h, w = torch.ones(1, 1), torch.full((5, 1), 3e38)
    loss = seqwrap.linear_cross_entropy(h, w, torch.tensor([1]), label_smoothing=0.1)
    assert loss.item() == pytest.approx(math.log(5), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [0.0, 1e38])
def test_kernel_loss_and_gradient_near_the_limit(bridge, dtype, softcap):
    # every dtype path of the kernel: float32 fast path (no cap), the generic path (bfloat16, or a cap)
    logits = torch.tensor([[3e38, 3e38, 2.5e38, 3e38, 1e38], [-1.0, 2.0, 0.5, 3.0, 0.0]]).to(dtype)
    labels = torch.tensor([2, 1])
    x64 = logits.double().requires_grad_()
    s = softcap * torch.tanh(x64 / softcap) if softcap else x64
    ref = F.cross_entropy(s, labels, label_smoothing=0.2, reduction="none")
    ref.sum().backward()
    loss, lse = torch.empty(2), torch.empty(2)
    work = logits.clone()
    C.cross_entropy_chunk(work, labels, loss, lse, None, -100, 0.2, 0.0, softcap, True, None, 0)
    assert torch.isfinite(loss).all() and torch.isfinite(work.float()).all(), (loss, work)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(work.double(), x64.grad, rtol=tol, atol=tol)


def test_softcap_that_rounds_to_zero_in_float32_is_refused():
    h, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,))
    for cap in (1e-300, 1e-46, 1e39):
        with pytest.raises(ValueError, match=r"softcap .* does not fit float32"):
            seqwrap.linear_cross_entropy(h, w, y, softcap=cap)
        with pytest.raises(ValueError, match=r"softcap .* does not fit float32"):
            seqwrap.linear_cross_entropy(h.bfloat16(), w.bfloat16(), y, softcap=cap)
        with pytest.raises(ValueError, match=r"softcap .* does not fit float32"):
            C.cross_entropy_chunk(torch.randn(4, 5), y, torch.empty(4), torch.empty(4), None, -100, 0.0, 0.0, cap,
                                  True, None, 0)


def test_tiny_softcap_in_float64_is_applied():
    h, w, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    loss = seqwrap.linear_cross_entropy(h, w, y, softcap=1e-300)
    # every capped logit is about +-1e-300: the softmax is uniform
    assert loss.item() == pytest.approx(math.log(5), rel=1e-12)
