"""Each CUDA kernel against the CPU kernel and against its float64 reference (seqwrap.ops.reference),
on fresh random inputs. Skipped without a CUDA device; `make gpu-check` runs them (`pytest -m cuda`).

TOLERANCES below is the contract, one row per kernel; `make gpu-check` prints it beside the results.
Only the Kahan accumulation and the sampler are bitwise equal across devices: the cross-entropy CPU
kernel uses a polynomial exp (csrc/sw_fastexp.h), the CUDA kernel expf, and the other kernels sum in
different orders, so those comparisons are tolerance-based.
"""
import pytest
import torch

import seqwrap
from seqwrap.ops import chunked_attention, reference
from seqwrap.ops.selective_scan import _scan

from .conftest import requires_cuda
from .scan_reference import random_inputs

# kernel -> (CUDA vs CPU kernel, CUDA vs the float64 reference); "bitwise" or a relative tolerance per dtype
TOLERANCES = {
    "kahan": ("bitwise (float32 / bf16 / fp16 addends)",
              "|acc - exact| <= 4 eps32 (|exact| + max|g|) (exact = float64 sum)"),
    "cross_entropy": ("float64 1e-12; float32 1e-5; bf16/fp16 2e-2 (CPU exp is a polynomial)",
                      "float64 1e-12; float32 2e-5; bf16/fp16 loss 1e-2, gradients 2e-2 (norm)"),
    "lse_merge (chunked_attention)": ("float64 1e-12; float32 2e-5; bf16 3e-2 (norm)",
                                      "float64 1e-12; float32 2e-5; bf16 3e-2 (norm)"),
    "selective_scan": ("float64 1e-10; float32 1e-5; bf16 2e-2 (max abs / max |ref|)",
                       "float64 1e-10; float32 1e-4; bf16 2e-2 (max abs / max |ref|)"),
    "sampler": ("bitwise", "bitwise against the Python splitmix64 reference"),
}

DEV = "cuda"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    """Relative error in norm, float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def rel_max(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# -- Kahan accumulation ------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kahan(dtype):
    g = gen(1)
    shapes = [(1000,), (3, 333), (1,), (300000,), (17, 19)]
    accs = [torch.randn(s, generator=g) for s in shapes]
    comps = [torch.zeros(s) for s in shapes]
    exact = [a.double() for a in accs]   # reference.kahan_accumulate_ref, step by step: the exact sum
    d_accs, d_comps = [a.to(DEV, copy=True) for a in accs], [c.to(DEV, copy=True) for c in comps]
    scale = 0.37
    biggest = 0.0
    for _ in range(50):
        grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        seqwrap.kahan_accumulate_(accs, comps, grads, scale)
        seqwrap.kahan_accumulate_(d_accs, d_comps, [x.to(DEV) for x in grads], scale)
        exact = reference.kahan_accumulate_ref(exact, grads, scale)
        biggest = max(biggest, max(x.double().abs().max().item() for x in grads))
    torch.cuda.synchronize()
    eps = torch.finfo(torch.float32).eps
    for a, c, da, dc, e in zip(accs, comps, d_accs, d_comps, exact):
        assert torch.equal(da.cpu(), a) and torch.equal(dc.cpu(), c), "CUDA and CPU Kahan sums differ"
        assert ((da.cpu().double() - e).abs() <= 4 * eps * (e.abs() + biggest)).all()


# -- cross-entropy ----------------------------------------------------------------------------------

CE_TOL = {torch.float64: (1e-12, 1e-12, 1e-12), torch.float32: (1e-5, 2e-5, 2e-5),
          torch.bfloat16: (2e-2, 1e-2, 2e-2), torch.float16: (2e-2, 1e-2, 2e-2)}  # vs CPU, loss vs f64, grads vs f64


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1000, 32003])
def test_cross_entropy(dtype, vocab):
    g = gen(2)
    N, H = 200, 64
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[::7] = -100
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, chunk_size=64)
    vs_cpu, loss_tol, grad_tol = CE_TOL[dtype]

    def run(device):
        h, w, b = (t.to(device).requires_grad_() for t in (hidden, weight, bias))
        loss = seqwrap.linear_cross_entropy(h, w, labels.to(device), b, **opts)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w, b)))

    cpu, gpu = run("cpu"), run(DEV)
    for name, a, c in zip(("loss", "d hidden", "d weight", "d bias"), gpu, cpu):
        assert rel(a, c) <= vs_cpu, f"{name}: CUDA vs CPU {rel(a, c):.3g} > {vs_cpu}"
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    ref, _ = reference.linear_cross_entropy_ref(h64, w64, labels, b64, label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    want = (ref.detach(), *torch.autograd.grad(ref, (h64, w64, b64)))
    assert rel(gpu[0], want[0]) <= loss_tol, f"loss vs float64: {rel(gpu[0], want[0]):.3g}"
    for name, a, r in zip(("d hidden", "d weight", "d bias"), gpu[1:], want[1:]):
        assert rel(a, r) <= grad_tol, f"{name} vs float64: {rel(a, r):.3g} > {grad_tol}"


# -- LSE merge (through chunked attention) ----------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_lse_merge_through_chunked_attention(dtype, tol):
    g = gen(3)
    q = torch.randn(2, 4, 90, 32, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(2, 2, 90, 32, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    up = torch.randn(2, 4, 90, 32, generator=g, dtype=torch.float64)

    def run(device):
        x = [t.to(device).requires_grad_() for t in (q, k, v)]
        out = chunked_attention(*x, chunk_size=16, window=50)
        return (out.detach(), *torch.autograd.grad(out, x, up.to(device, dtype)))

    gpu, cpu = run(DEV), run("cpu")
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention_ref(*x64, window=50)
    want = (ref.detach(), *torch.autograd.grad(ref, x64, up.to(dtype).double()))
    for name, a, c, r in zip(("out", "dq", "dk", "dv"), gpu, cpu, want):
        assert rel(a, c) <= tol, f"{name}: CUDA vs CPU {rel(a, c):.3g} > {tol}"
        assert rel(a, r) <= tol, f"{name}: CUDA vs float64 {rel(a, r):.3g} > {tol}"


# -- selective scan ---------------------------------------------------------------------------------

SCAN_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_selective_scan(dtype):
    x = random_inputs(batch=2, dim=5, dstate=4, length=150, dtype=dtype, seed=4, requires_grad=False)
    g = gen(5)
    gy = torch.randn(2, 5, 150, generator=g, dtype=torch.float64)
    gh = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    vs_cpu, vs_ref = SCAN_TOL[dtype]

    def run(inputs, device, scan):
        xs = [t.to(device).requires_grad_() for t in inputs]
        y, h = scan(*xs)
        loss = (y.double() * gy.to(device)).sum() + (h.double() * gh.to(device)).sum()
        return (y.detach(), h.detach(), *torch.autograd.grad(loss, xs))

    gpu = run(x, DEV, lambda *a: _scan(*a, block=16))
    cpu = run(x, "cpu", lambda *a: _scan(*a, block=16))
    ref = run([t.double() for t in x], "cpu", reference.selective_scan_ref)
    names = ("y", "h_last", "du", "ddt", "dA", "dB", "dC", "dD", "dz", "dh0")
    for name, a, c, r in zip(names, gpu, cpu, ref):
        assert rel_max(a, c) <= vs_cpu, f"{name}: CUDA vs CPU {rel_max(a, c):.3g} > {vs_cpu}"
        assert rel_max(a, r) <= vs_ref, f"{name}: CUDA vs float64 {rel_max(a, r):.3g} > {vs_ref}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("truncation", [0, 5])
def test_selective_scan_with_resets(dtype, truncation):
    """Document resets (packed rows, reset at step 0 of one row too): CUDA vs the CPU kernel, which
    tests/test_scan_resets.py checks against per-document scans."""
    x = random_inputs(batch=2, dim=5, dstate=4, length=150, dtype=dtype, seed=6, requires_grad=False)
    reset = torch.rand(2, 150, generator=gen(7)) < 0.05
    reset[0, 0] = True
    gy = torch.randn(2, 5, 150, generator=gen(8), dtype=torch.float64)
    vs_cpu = SCAN_TOL[dtype][0]

    def run(device):
        xs = [t.to(device).requires_grad_() for t in x]
        y, h = _scan(*xs, block=16, truncation=truncation, reset=reset.to(device, torch.int32))
        loss = (y.double() * gy.to(device)).sum() + (h.double() ** 2).sum()
        return (y.detach(), h.detach(), *torch.autograd.grad(loss, xs))

    names = ("y", "h_last", "du", "ddt", "dA", "dB", "dC", "dD", "dz", "dh0")
    for name, a, c in zip(names, run(DEV), run("cpu")):
        assert rel_max(a, c) <= vs_cpu, f"{name}: CUDA vs CPU {rel_max(a, c):.3g} > {vs_cpu}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_attention_packed(dtype):
    """Document boundaries on the CUDA block paths (float32: the efficient kernel with a bias; float64:
    the plain-torch block) against the CPU result."""
    g = gen(9)
    q, k, v = (torch.randn(2, 4, 70, 16, generator=g, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, 9, 10, 50, 70, 100, 140])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    outs = []
    for device in (DEV, "cpu"):
        qs, ks, vs = (t.to(device).requires_grad_() for t in (q, k, v))
        out = chunked_attention(qs, ks, vs, chunk_size=16, window=13, cu_seqlens=cu)
        outs.append([out.detach().cpu()] + [t.cpu() for t in torch.autograd.grad(out.square().sum(), (qs, ks, vs))])
    for name, a, c in zip(("out", "dq", "dk", "dv"), *outs):
        assert rel(a, c) <= tol, f"{name}: CUDA vs CPU {rel(a, c):.3g} > {tol}"


# -- chunk sampler ----------------------------------------------------------------------------------

@requires_cuda
def test_sampler():
    for k in (1, 7, 129, 1000):
        q = torch.rand(k, dtype=torch.float64, generator=gen(k)) * 0.9 + 0.05
        for seed, step in ((0, 0), (5, 9), (2**63 + 3, 2**40)):
            w = seqwrap.sample_chunks(k, probs=q, seed=seed, step=step, device=DEV).cpu()
            assert torch.equal(w, seqwrap.sample_chunks(k, probs=q, seed=seed, step=step))
            assert torch.equal(w, reference.sample_chunks_ref(k, probs=q, seed=seed, step=step))
            t = max(1, k // 3)
            a = seqwrap.sample_chunks(k, sampling="fixed", budget=t, max_compensation=2.0, seed=seed, step=step)
            b = seqwrap.sample_chunks(k, sampling="fixed", budget=t, max_compensation=2.0, seed=seed, step=step,
                                      device=DEV)
            assert torch.equal(a, b.cpu()) and int((a != 0).sum()) == t
