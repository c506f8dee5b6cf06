"""The CPU half-precision layout of the grad_hidden product (cross_entropy._fast_lhs): same values,
column-major order, and gradients of bf16 / fp16 inputs that match float64 autograd."""
import pytest
import torch
import torch.nn.functional as F

import seqwrap
from seqwrap.ops import cross_entropy as ce


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_lhs_is_column_major_copy_for_half_cpu(dtype):
    g = torch.randn(5, 37).to(dtype)
    out = ce._fast_lhs(g)
    assert torch.equal(out, g)
    assert out.stride() == (1, 5)  # column-major: the layout torch's half CPU matmul is fast with
    assert out.data_ptr() != g.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_lhs_leaves_full_precision_alone(dtype):
    g = torch.randn(5, 37, dtype=dtype)
    assert ce._fast_lhs(g) is g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradients_match_float64(dtype):
    torch.manual_seed(0)
    n, hdim, v = 40, 24, 96
    h = torch.randn(n, hdim).to(dtype).requires_grad_()
    w = (torch.randn(v, hdim) / hdim**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,))
    y[3] = -100
    loss = seqwrap.linear_cross_entropy(h, w, y, chunk_size=16)
    gh, gw = torch.autograd.grad(loss, (h, w))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, w64), y)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-3 * abs(float(ref))
    # the logits gradient is rounded to the input dtype before the products: relative error ~ its eps
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert (gh.double() - rh).norm() <= tol * rh.norm()
    assert (gw.double() - rw).norm() <= tol * rw.norm()
