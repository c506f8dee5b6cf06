"""linear_cross_entropy under CPU torch.autocast (bf16) matches what HF's loss path computes
there: F.linear in the autocast dtype, then a float32 cross-entropy (issue 16, item 12, the
op's half). Before, reductions mean and sum, and a backward run inside the autocast region,
failed in an mm(out=) whose output autocast turned to bf16."""
import pytest
import torch
import torch.nn.functional as F

import seqwrap

pytestmark = pytest.mark.ccore


def inputs(bias):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 12, 32, generator=g, requires_grad=True)
    w = (torch.randn(50, 32, generator=g) * 0.2).requires_grad_()
    b = (torch.randn(50, generator=g) * 0.1).requires_grad_() if bias else None
    y = torch.randint(0, 50, (2, 12), generator=g)
    y[0, :3] = -100
    return h, w, b, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_autocast_reference(reduction, bias):
    h, w, b, y = inputs(bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = seqwrap.linear_cross_entropy(h, w, y, b, reduction=reduction, chunk_size=7)
        ref = F.cross_entropy(F.linear(h, w, b).transpose(1, 2), y, reduction=reduction)
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # same bf16 logits, float32 softmax
    up = torch.rand_like(ref)
    params = (h, w) + ((b,) if bias else ())
    got = torch.autograd.grad(ours, params, up)
    want = torch.autograd.grad(ref, params, up)
    for name, a, r in zip("hwb", got, want):
        assert a.dtype == r.dtype == torch.float32, name
        err = (a - r).norm() / r.norm()
        assert err < 2e-2, f"grad of {name}: relative error {err:.3g}"


def test_backward_inside_the_autocast_region():
    h, w, b, y = inputs(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = seqwrap.linear_cross_entropy(h, w, y, b, reduction="none")
        loss.sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_float64_is_left_alone_under_autocast():
    h, w, _, y = inputs(False)
    h64, w64 = h.detach().double(), w.detach().double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = seqwrap.linear_cross_entropy(h64, w64, y)
    ref = F.cross_entropy(F.linear(h64, w64).transpose(1, 2), y)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
