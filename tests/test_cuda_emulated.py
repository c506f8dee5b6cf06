"""Every CUDA kernel of csrc/ run on the host under the emulation of the CUDA execution model
(tests/cuda_emu/), in every CI run: against the CPU kernel and the float64 reference with
test_cuda_kernels.py's tolerance table, under three schedules (in order, reversed, seeded random
interleaving at every barrier and shuffle), with the shared-memory race check on (any report fails
the test). Deterministic kernels must agree bitwise across schedules; the scan backward (atomicAdd
sums) within its CUDA-vs-CPU tolerance. tests/test_cuda_emulated_asan.py runs a subset under ASan/UBSan,
tests/test_cuda_emulated_bugs.py feeds it broken kernel copies.
"""
import os

import pytest
import torch

import seqwrap
from seqwrap.ops import chunked_attention, reference
from seqwrap.ops.selective_scan import _scan

from .cuda_emu import build
from .cuda_emu.device import SCHEDULE_NAMES, SCHEDULES, EmulatedDevice
from .scan_reference import random_inputs
from .test_cuda_kernels import CE_TOL, SCAN_TOL, TOLERANCES, gen, rel, rel_max

KERNELS = {"kahan": "csrc/kahan/kahan.cu", "cross_entropy": "csrc/xent/xent.cu",
           "lse_merge (chunked_attention)": "csrc/lse_merge/lse_merge.cu", "selective_scan": "csrc/scan/scan.cu",
           "sampler": "csrc/sampler/sampler.cu"}


@pytest.fixture(scope="session")
def emu():
    # SEQWRAP_EMU_MODE=asan: the sanitized build (tests/test_cuda_emulated_asan.py runs this file so)
    return EmulatedDevice(build.build(os.environ.get("SEQWRAP_EMU_MODE", "plain")))


def under_each_schedule(emu, fn, kernels):
    """[(schedule name, fn() under it)] for the three schedules; asserts that exactly `kernels`
    (launch names) ran, so that a test cannot pass on a path that never reached the emulator."""
    out = []
    for schedule, seed in SCHEDULES:
        with emu.active(schedule, seed) as run:
            out.append((SCHEDULE_NAMES[schedule], fn()))
        launched = sorted({k.split("<")[0] for k in run.launched})
        assert launched == sorted(kernels), f"kernels launched: {run.launched}"
    return out


def assert_same_bits(results, what):
    (n0, first), *rest = results
    for name, res in rest:
        for a, b in zip(first, res):
            assert torch.equal(a, b), f"{what}: {name} schedule differs from {n0} (the kernel claims determinism)"


def test_every_cuda_source_is_covered():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    kernels = {p.relative_to(root).as_posix() for p in (root / "csrc").rglob("*.cu") if "__global__" in p.read_text()}
    assert kernels == set(KERNELS.values())
    assert set(KERNELS) == set(TOLERANCES)


# -- cross-entropy: one block per row, block reductions (shuffles + shared scratch), label broadcast ----------

def _xent_case(dtype, rows, vocab, chunk):
    g = gen(2)
    H = 8
    hidden = torch.randn(rows, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::7] = -100
    labels[-1] = vocab - 1
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, chunk_size=chunk)

    def run():
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss = seqwrap.linear_cross_entropy(h, w, labels, b, **opts)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w, b)))

    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    ref, _ = reference.linear_cross_entropy_ref(h64, w64, labels, b64, label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    want = (ref.detach(), *torch.autograd.grad(ref, (h64, w64, b64)))
    return run, want


# (rows, vocab, chunk): a partial last chunk; V below one thread per column; V not a multiple of the
# 512 threads; 1 row; a 256K vocabulary (past the 128K at which fused kernels have overflowed)
XENT_SHAPES = [(19, 1000, 8), (5, 33, 5), (1, 4099, 1), (2, 262147, 2)]


# every dtype at every small shape; the 256K vocabulary for float32 and bfloat16 only (CI time)
XENT_CASES = [(dt, *shape) for shape in XENT_SHAPES
              for dt in ((torch.float32, torch.bfloat16) if shape[1] > 100000 else
                         (torch.float64, torch.float32, torch.bfloat16, torch.float16))]


@pytest.mark.parametrize("dtype, rows, vocab, chunk", XENT_CASES)
def test_cross_entropy_emulated(emu, dtype, rows, vocab, chunk):
    run, want = _xent_case(dtype, rows, vocab, chunk)
    vs_cpu, loss_tol, grad_tol = CE_TOL[dtype]
    cpu = run()
    results = under_each_schedule(emu, run, ["sw_xent_kernel"])
    assert_same_bits(results, "cross-entropy")
    emulated = results[0][1]
    for name, a, c in zip(("loss", "d hidden", "d weight", "d bias"), emulated, cpu):
        assert rel(a, c) <= vs_cpu, f"{name}: emulated CUDA vs CPU {rel(a, c):.3g} > {vs_cpu}"
    assert rel(emulated[0], want[0]) <= loss_tol, f"loss vs float64: {rel(emulated[0], want[0]):.3g}"
    for name, a, r in zip(("d hidden", "d weight", "d bias"), emulated[1:], want[1:]):
        assert rel(a, r) <= grad_tol, f"{name} vs float64: {rel(a, r):.3g} > {grad_tol}"


def test_cross_entropy_emulated_bad_label_sets_the_device_flag(emu):
    h, w = torch.randn(3, 4), torch.randn(50, 4)
    with emu.active(), pytest.raises(ValueError, match="outside"):
        seqwrap.linear_cross_entropy(h, w, torch.tensor([1, 50, 2]))


# -- Kahan accumulation: multi-tensor launch, block-stride loop capped at 1024 blocks per job -------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kahan_emulated(emu, dtype):
    g = gen(1)
    # 300000 elements: more than 1024 blocks of 256 (the block-stride loop wraps); 40 tensors: two launches
    shapes = [(1000,), (3, 333), (1,), (300000,), (17, 19), (257,)] + [(i + 1,) for i in range(34)]
    accs0 = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(3)]
    scale = 0.37

    def run():
        accs, comps = [a.clone() for a in accs0], [torch.zeros_like(a) for a in accs0]
        for gr in grads:
            seqwrap.kahan_accumulate_(accs, comps, gr, scale)
        return accs + comps

    cpu = run()
    results = under_each_schedule(emu, run, ["sw_kahan_kernel"])
    assert_same_bits(results, "kahan")
    for a, c in zip(results[0][1], cpu):
        assert torch.equal(a, c), "emulated CUDA and CPU Kahan sums differ"
    exact = [a.double() for a in accs0]
    for gr in grads:
        exact = reference.kahan_accumulate_ref(exact, gr, scale)
    eps, biggest = torch.finfo(torch.float32).eps, max(x.double().abs().max().item() for gr in grads for x in gr)
    for a, e in zip(results[0][1][:len(shapes)], exact):
        assert ((a.double() - e).abs() <= 4 * eps * (e.abs() + biggest)).all()


LSE_KERNELS = ["sw_lse_merge_kernel", "sw_lse_update_kernel"]


# -- LSE merge (through chunked attention): one thread per element, a second per-row launch --------------

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_lse_merge_emulated(emu, dtype, tol):
    g = gen(3)
    q = torch.randn(1, 2, 45, 24, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(1, 1, 45, 24, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    up = torch.randn(1, 2, 45, 24, generator=g, dtype=torch.float64)

    def run():
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = chunked_attention(*x, chunk_size=16, window=30)
        return (out.detach(), *torch.autograd.grad(out, x, up.to(dtype)))

    cpu = run()
    results = under_each_schedule(emu, run, LSE_KERNELS)
    assert_same_bits(results, "lse_merge")
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention_ref(*x64, window=30)
    want = (ref.detach(), *torch.autograd.grad(ref, x64, up.to(dtype).double()))
    for name, a, c, r in zip(("out", "dq", "dk", "dv"), results[0][1], cpu, want):
        assert rel(a, c) <= tol, f"{name}: emulated CUDA vs CPU {rel(a, c):.3g} > {tol}"
        assert rel(a, r) <= tol, f"{name}: emulated CUDA vs float64 {rel(a, r):.3g} > {tol}"


def test_lse_merge_emulated_empty_rows(emu):
    """Rows whose lse is -inf on one side (nothing attended yet / an empty block), direct op call;
    513 elements: a partial last block of 256 threads."""
    from seqwrap.ops import library
    g = gen(12)
    rows, dim = 27, 19
    acc0 = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    lse0 = torch.randn(rows, generator=g, dtype=torch.float64)
    blk = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    blse = torch.randn(rows, generator=g, dtype=torch.float64)
    lse0[3] = -float("inf")
    blse[5] = -float("inf")
    lse0[7] = blse[7] = -float("inf")

    def run():
        acc, lse = acc0.clone(), lse0.clone()
        library.lse_merge(acc, lse, blk, blse)
        return acc, lse

    cpu = run()
    for _, res in under_each_schedule(emu, run, LSE_KERNELS):
        assert torch.allclose(res[0], cpu[0], rtol=1e-12, atol=0) and torch.equal(res[1].isinf(), cpu[1].isinf())
    l = torch.logaddexp(lse0, blse)
    want = torch.where(l.isinf()[:, None], acc0,
                       torch.nan_to_num(torch.exp(lse0 - l))[:, None] * acc0 + torch.nan_to_num(torch.exp(blse - l))[:, None] * blk)
    assert rel(res[0], want) <= 1e-12


# -- selective scan: one thread per row, atomicAdd sums of ddt / dB / dC ---------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_selective_scan_emulated(emu, dtype):
    # 2 x 5 = 10 rows in one partial block of 128 threads; 3 x 50 = 150 rows in two blocks (second partial)
    for batch, dim in ((2, 5), (3, 50)) if dtype == torch.float32 else ((2, 5),):
        x = random_inputs(batch=batch, dim=dim, dstate=4, length=37, dtype=dtype, seed=4, requires_grad=False)
        g = gen(5)
        gy = torch.randn(batch, dim, 37, generator=g, dtype=torch.float64)
        gh = torch.randn(batch, dim, 4, generator=g, dtype=torch.float64)
        vs_cpu, vs_ref = SCAN_TOL[dtype]

        def run(inputs=x, scan=lambda *a: _scan(*a, block=8)):
            xs = [t.clone().requires_grad_() for t in inputs]
            y, h = scan(*xs)
            loss = (y.double() * gy).sum() + (h.double() * gh).sum()
            return (y.detach(), h.detach(), *torch.autograd.grad(loss, xs))

        cpu = run()
        ref = run([t.double() for t in x], reference.selective_scan_ref)
        results = under_each_schedule(emu, run, ["sw_scan_bwd_kernel", "sw_scan_fwd_kernel"])
        names = ("y", "h_last", "du", "ddt", "dA", "dB", "dC", "dD", "dz", "dh0")
        assert_same_bits([(n, r[:2]) for n, r in results], "scan forward")
        for sched, res in results:
            for name, a, c, r in zip(names, res, cpu, ref):
                assert rel_max(a, c) <= vs_cpu, f"{name} ({sched}): emulated CUDA vs CPU {rel_max(a, c):.3g} > {vs_cpu}"
                assert rel_max(a, r) <= vs_ref, f"{name} ({sched}): emulated CUDA vs float64 {rel_max(a, r):.3g}"


# -- chunk sampler: one thread per chunk ------------------------------------------------------------------

def test_sampler_emulated(emu):
    for k in (1, 7, 129, 300):
        q = torch.rand(k, dtype=torch.float64, generator=gen(k)) * 0.9 + 0.05
        t = max(1, k // 3)
        for seed, step in ((0, 0), (2**63 + 3, 2**40)):
            def run():
                return (seqwrap.sample_chunks(k, probs=q, seed=seed, step=step),
                        seqwrap.sample_chunks(k, sampling="fixed", budget=t, max_compensation=2.0, seed=seed, step=step))

            cpu = run()
            results = under_each_schedule(emu, run, ["sw_sampler_kernel"])
            assert_same_bits(results, "sampler")
            b, f = results[0][1]
            assert torch.equal(b, cpu[0]) and torch.equal(b, reference.sample_chunks_ref(k, probs=q, seed=seed, step=step))
            assert torch.equal(f, cpu[1]) and int((f != 0).sum()) == t
