"""seqwrap.ops.ssd_scan (Mamba-2 / SSD) against a sequential float64 PyTorch reference, gradcheck,
HF's own chunked SSD, and the Mamba-1 selective scan it specialises."""
import pytest
import torch
import torch.nn.functional as F

from seqwrap.ops import selective_scan, ssd_scan

from .conftest import requires_cuda
from .ssd_reference import random_ssd_inputs, ssd_ref

pytestmark = pytest.mark.ccore


def grads(y, h, inputs, seed=1, round_to=torch.float64):
    """Gradients of <y, gy> + <h, gh> for fixed random cotangents (rounded to `round_to` first)."""
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(round_to).to(y.dtype)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(round_to).to(h.dtype)
    return torch.autograd.grad((y.float() * gy.float()).sum() + (h.float() * gh.float()).sum(),
                               [t for t in inputs if t is not None], allow_unused=True)


@pytest.mark.parametrize("block", [1, 4, 64])
@pytest.mark.parametrize("heads,groups", [(4, 1), (4, 2), (4, 4), (6, 3)])
def test_matches_reference_float64(bridge, block, heads, groups):
    x = random_ssd_inputs(batch=2, length=13, heads=heads, headdim=3, groups=groups, dstate=5, seed=heads + groups)
    y, h = ssd_scan(*x, return_final_state=True, block=block)
    yr, hr = ssd_ref(*x)
    assert torch.allclose(y, yr, rtol=1e-12, atol=1e-12)
    assert torch.allclose(h, hr, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(y, h, x), grads(yr, hr, x)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("with_optional", [True, False])
def test_gradcheck_float64(with_optional):
    x, dt, A, B, C, D, z, h0 = random_ssd_inputs(batch=2, length=6, heads=2, headdim=2, groups=1, dstate=3, seed=3)
    if with_optional:
        f = lambda *a: ssd_scan(*a, return_final_state=True, block=4)  # noqa: E731  (y and final state)
        assert torch.autograd.gradcheck(f, (x, dt, A, B, C, D, z, h0), atol=1e-8, rtol=1e-6)
    else:
        f = lambda x, dt, A, B, C: ssd_scan(x, dt, A, B, C, return_final_state=True)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, dt, A, B, C), atol=1e-8, rtol=1e-6)


def test_final_state_chains_two_calls():
    """Scanning [0, L) equals scanning [0, m) then [m, L) from the first call's final state, gradients too:
    what the chunk engines rely on."""
    x = random_ssd_inputs(batch=1, length=12, heads=4, headdim=2, groups=2, dstate=4, seed=5)
    xs, dt, A, B, C, D, z, h0 = x
    y, h = ssd_scan(*x, return_final_state=True, block=5)
    m = 5
    y1, h1 = ssd_scan(xs[:, :m], dt[:, :m], A, B[:, :m], C[:, :m], D, z[:, :m], h0, True, block=5)
    y2, h2 = ssd_scan(xs[:, m:], dt[:, m:], A, B[:, m:], C[:, m:], D, z[:, m:], h1, True, block=5)
    assert torch.allclose(torch.cat([y1, y2], 1), y, rtol=1e-13, atol=1e-13)
    assert torch.allclose(h2, h, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads(y, h, x), grads(torch.cat([y1, y2], 1), h2, x)):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-12)


def test_is_the_selective_scan_with_scalar_A_per_head():
    """One group at a time, the SSD recurrence is Mamba-1's selective scan with A broadcast over the
    state and dt over the head's channels: the two kernels agree (forward and gradients)."""
    x, dt, A, B, C, D, z, h0 = random_ssd_inputs(batch=2, length=9, heads=4, headdim=3, groups=2, dstate=4, seed=11)
    y, h = ssd_scan(x, dt, A, B, C, D, z, h0, return_final_state=True)
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    hpg = H // G
    ys, hs = [], []
    for g in range(G):
        heads = slice(g * hpg, (g + 1) * hpg)
        u = x[:, :, heads].reshape(b, L, hpg * P).transpose(1, 2)                         # (b, dim, L)
        dtu = dt[:, :, heads, None].expand(b, L, hpg, P).reshape(b, L, hpg * P).transpose(1, 2)
        Au = A[heads, None, None].expand(hpg, P, N).reshape(hpg * P, N)
        Du = D[heads, None].expand(hpg, P).reshape(hpg * P)
        zu = z[:, :, heads].reshape(b, L, hpg * P).transpose(1, 2)
        h0u = h0[:, heads].reshape(b, hpg * P, N)
        yg, hg = selective_scan(u, dtu, Au, B[:, :, g].transpose(1, 2), C[:, :, g].transpose(1, 2), Du, zu, h0u,
                                return_final_state=True)
        ys.append(yg.transpose(1, 2).reshape(b, L, hpg, P))
        hs.append(hg.reshape(b, hpg, P, N))
    y1, h1 = torch.cat(ys, 2), torch.cat(hs, 1)
    assert torch.allclose(y, y1, rtol=1e-12, atol=1e-12) and torch.allclose(h, h1, rtol=1e-12, atol=1e-12)
    inputs = (x, dt, A, B, C, D, z, h0)
    for a, c in zip(grads(y, h, inputs), grads(y1, h1, inputs)):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-11)


def test_matches_hf_mamba2_chunk_scan():
    """HF's SSD (the chunked "dual" form of transformers' Mamba2 mixer, float32 inside) computes the same
    recurrence: equal to float32 rounding, including the final state from an initial state."""
    pytest.importorskip("transformers")
    from transformers.models.mamba2 import modeling_mamba2 as m2

    x, dt_raw, A, B, C, D, _, h0 = random_ssd_inputs(batch=2, length=37, heads=4, headdim=3, groups=2, dstate=5,
                                                     seed=4, requires_grad=False)
    dt_bias = torch.randn(4, dtype=torch.float64)
    y_hf, h_hf = m2.mamba2_chunk_scan(x, dt_raw, A, B, C, chunk_size=8, D=D, dt_bias=dt_bias, initial_states=h0,
                                      dt_softplus=True, return_final_states=True)
    y, h = ssd_scan(x, F.softplus(dt_raw + dt_bias), A, B, C, D, None, h0, return_final_state=True)
    assert torch.allclose(y, y_hf.double(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(h, h_hf.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """Half inputs are read exactly and the state runs in float32: compared with the float64 reference on
    the same (rounded) inputs, the differences are float32 rounding (y also rounded to the input dtype)."""
    x = random_ssd_inputs(batch=2, length=40, heads=4, headdim=4, groups=2, dstate=4, dtype=dtype, seed=7)
    y, h = ssd_scan(*x, return_final_state=True)
    assert y.dtype == dtype and h.dtype == torch.float32
    x64 = [t.detach().double().requires_grad_() for t in x]
    yr, hr = ssd_ref(*x64)
    out_tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert (y.double() - yr).abs().max() <= out_tol * (yr.abs().max() + 1)
    assert (h.double() - hr).abs().max() <= 2e-5 * (hr.abs().max() + 1)
    ref = grads(yr, hr, x64, round_to=dtype)
    for a, b in zip(grads(y, h, x, round_to=dtype), ref):
        scale = b.abs().max().item() + 1e-6
        g_tol = out_tol if a.dtype == dtype and dtype != torch.float32 else 1e-4
        assert (a.double() - b).abs().max().item() <= g_tol * scale


def test_without_initial_state_starts_from_zero():
    x, dt, A, B, C, D, z, h0 = random_ssd_inputs(seed=9)
    y, h = ssd_scan(x, dt, A, B, C, D, z, None, return_final_state=True)
    yr, hr = ssd_ref(x, dt, A, B, C, D, z, torch.zeros_like(h0))
    assert torch.allclose(y, yr, rtol=1e-12, atol=1e-12) and torch.allclose(h, hr, rtol=1e-12, atol=1e-12)


@requires_cuda
def test_cuda_matches_cpu():
    x = random_ssd_inputs(batch=2, length=70, heads=6, headdim=5, groups=3, dstate=4, seed=2)
    xc = [t.detach().cuda().requires_grad_() for t in x]
    y, h = ssd_scan(*x, return_final_state=True, block=16)
    yc, hc = ssd_scan(*xc, return_final_state=True, block=16)
    assert torch.allclose(yc.cpu(), y, rtol=1e-12, atol=1e-12) and torch.allclose(hc.cpu(), h, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(y.sum() + h.sum(), x)
    gc = torch.autograd.grad(yc.sum() + hc.sum(), xc)
    for a, b in zip(g, gc):
        assert torch.allclose(a, b.cpu(), rtol=1e-10, atol=1e-12)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_low_precision_matches_reference(dtype):
    x = random_ssd_inputs(batch=2, length=300, heads=8, headdim=16, groups=2, dstate=16, dtype=dtype, seed=6)
    xc = [t.detach().cuda().requires_grad_() for t in x]
    y, h = ssd_scan(*xc, return_final_state=True)
    x64 = [t.detach().double().requires_grad_() for t in x]
    yr, hr = ssd_ref(*x64)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert (y.cpu().double() - yr).abs().max() <= tol * (yr.abs().max() + 1)
    for a, b in zip(grads(y, h, xc, round_to=dtype), grads(yr, hr, x64, round_to=dtype)):
        assert (a.cpu().double() - b).abs().max() <= 1e-2 * (b.abs().max() + 1e-6)


def test_multithreaded_path_matches_reference():
    """Sizes above the kernels' threading threshold (OpenMP team over rows / heads, private dB/dC sums)."""
    x = random_ssd_inputs(batch=2, length=160, heads=8, headdim=8, groups=2, dstate=16, seed=12)
    y, h = ssd_scan(*x, return_final_state=True, block=32)
    yr, hr = ssd_ref(*x)
    assert torch.allclose(y, yr, rtol=1e-11, atol=1e-11) and torch.allclose(h, hr, rtol=1e-11, atol=1e-11)
    for a, b in zip(grads(y, h, x), grads(yr, hr, x)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
