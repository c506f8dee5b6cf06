"""seqwrap.ops.selective_scan against a sequential PyTorch reference, gradcheck in float64."""
import pytest
import torch

from seqwrap.ops import selective_scan
from seqwrap.ops.selective_scan import _scan

from .scan_reference import random_inputs, scan_ref

pytestmark = pytest.mark.ccore


def grads(y, h, inputs, seed=1, round_to=torch.float64):
    """Gradients of <y, gy> + <h, gh> for fixed random cotangents (rounded to `round_to` first)."""
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(round_to).to(y.dtype)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(round_to).to(h.dtype)
    return torch.autograd.grad((y.float() * gy.float()).sum() + (h.float() * gh.float()).sum(), inputs,
                               allow_unused=True)


@pytest.mark.parametrize("block", [1, 4, 64])
def test_matches_reference_float64(bridge, block):
    x = random_inputs(batch=2, dim=3, dstate=5, length=13)
    y, h = _scan(*x, block=block)
    yr, hr = scan_ref(*x)
    assert torch.allclose(y, yr, rtol=1e-12, atol=1e-12)
    assert torch.allclose(h, hr, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(y, h, x), grads(yr, hr, x)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("with_optional", [True, False])
def test_gradcheck_float64(with_optional):
    u, dt, A, B, C, D, z, h0 = random_inputs(batch=2, dim=2, dstate=3, length=7, seed=3)
    if with_optional:
        f = lambda *a: _scan(*a, block=3)  # noqa: E731  (y, final state) both checked
        assert torch.autograd.gradcheck(f, (u, dt, A, B, C, D, z, h0), atol=1e-8, rtol=1e-6)
    else:
        f = lambda u, dt, A, B, C: selective_scan(u, dt, A, B, C, return_final_state=True)  # noqa: E731
        assert torch.autograd.gradcheck(f, (u, dt, A, B, C), atol=1e-8, rtol=1e-6)


def test_final_state_chains_two_calls():
    """Scanning [0, L) equals scanning [0, m) then [m, L) from the first call's final state, gradients too."""
    x = random_inputs(batch=1, dim=3, dstate=4, length=12, seed=5)
    u, dt, A, B, C, D, z, h0 = x
    y, h = selective_scan(*x, return_final_state=True)
    m = 5
    y1, h1 = selective_scan(u[..., :m], dt[..., :m], A, B[..., :m], C[..., :m], D, z[..., :m], h0, True)
    y2, h2 = selective_scan(u[..., m:], dt[..., m:], A, B[..., m:], C[..., m:], D, z[..., m:], h1, True)
    assert torch.allclose(torch.cat([y1, y2], -1), y, rtol=1e-13, atol=1e-13)
    assert torch.allclose(h2, h, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads(y, h, x), grads(torch.cat([y1, y2], -1), h2, x)):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5)])
def test_low_precision_inputs(dtype, tol):
    """Half inputs are read exactly and the state runs in float32: compared with the reference on the
    same (rounded) inputs, the only differences are float32 rounding. y is rounded to the input dtype."""
    x = random_inputs(batch=2, dim=4, dstate=4, length=40, dtype=dtype, seed=7)
    y, h = selective_scan(*x, return_final_state=True)
    yr, hr = scan_ref(*x)
    assert y.dtype == dtype and h.dtype == torch.float32
    out_tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert torch.allclose(y.float(), yr.float(), rtol=out_tol, atol=out_tol)
    assert torch.allclose(h, hr, rtol=tol, atol=tol)
    x64 = [t.detach().double().requires_grad_() for t in x]
    ref = grads(*scan_ref(*x64), x64, round_to=dtype)
    for a, b in zip(grads(y, h, x, round_to=dtype), ref):
        scale = b.abs().max().item() + 1e-6
        g_tol = out_tol if a.dtype == dtype and dtype != torch.float32 else 1e-4
        assert (a.double() - b).abs().max().item() <= g_tol * scale


def windowed_reference(x, T, grad_len=None):
    """Truncated adjoint by brute force: the loss of step t reaches only steps t-T+1..t (state h_{t-T}
    is detached); with grad_len, steps >= grad_len pass gradients on but keep none themselves."""
    u, dt, A, B, C, D, z, h0 = x
    length = u.shape[-1]
    gl = length if grad_len is None else grad_len
    g = torch.Generator().manual_seed(11)
    gy = torch.randn(u.shape, generator=g, dtype=torch.float64)
    total = 0
    for t in range(length):
        h = h0
        for i in range(t + 1):
            if i == t - T:
                h = h.detach()
            own = i < gl
            pick = lambda v: v if own else v.detach()  # noqa: E731
            a = torch.exp(pick(dt)[:, :, i, None] * pick(A))
            h = a * h + pick(dt)[:, :, i, None] * pick(B)[:, None, :, i] * pick(u)[:, :, i, None]
            if t - T == i:
                h = h.detach()
        own = t < gl
        pick = lambda v: v if own else v.detach()  # noqa: E731
        yt = (h * pick(C)[:, None, :, t]).sum(-1) + pick(D) * pick(u)[:, :, t]
        yt = yt * torch.nn.functional.silu(pick(z)[:, :, t])
        total = total + (yt * gy[:, :, t]).sum()
    return torch.autograd.grad(total, x, allow_unused=True), gy


@pytest.mark.parametrize("T,grad_len", [(1, None), (3, None), (4, 6), (20, None)])
def test_truncated_and_lookahead(T, grad_len):
    x = random_inputs(batch=1, dim=2, dstate=3, length=10, seed=9)
    ref, gy = windowed_reference(x, T, grad_len)
    y, h = _scan(*x, block=4, truncation=T, grad_len=grad_len)
    got = torch.autograd.grad((y * gy).sum(), x, allow_unused=True)
    for name, a, b in zip("u dt A B C D z h0".split(), got, ref):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


def test_parallel_path_matches_reference():
    """Large enough (batch*dim*len*dstate >= 2^18) for the OpenMP team and its private dB/dC buffers."""
    x = random_inputs(batch=2, dim=64, dstate=16, length=128, seed=13)
    y, h = _scan(*x, block=32)
    yr, hr = scan_ref(*x)
    assert torch.allclose(y, yr, rtol=1e-11, atol=1e-11) and torch.allclose(h, hr, rtol=1e-11, atol=1e-11)
    for a, b in zip(grads(y, h, x), grads(yr, hr, x)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
