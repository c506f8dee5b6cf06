"""The small kernel workload compute-sanitizer runs: every seqwrap CUDA kernel once or twice on small,
ragged shapes (sizes that are not multiples of the block sizes), each result checked against the CPU.

    python -m benchmarks.gpu_check.sanitize_target [--device cuda|cpu]

Exits 0 when every kernel ran and matched; prints one line per kernel.
"""
from __future__ import annotations

import argparse
import sys

import torch

import seqwrap
from seqwrap.ops import chunked_attention, ssd_scan
from seqwrap.ops.selective_scan import _scan


def close(a, b, tol):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return bool(((a - b).norm() <= tol * b.norm() + 1e-12).item())


def kahan(dev):
    g = torch.Generator().manual_seed(0)
    shapes = [(1,), (33,), (1025,), (3, 257)]
    for dtype in (torch.float32, torch.bfloat16):
        accs = [torch.randn(s, generator=g) for s in shapes]
        comps = [torch.zeros(s) for s in shapes]
        grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        d_accs, d_comps = [a.to(dev, copy=True) for a in accs], [c.to(dev, copy=True) for c in comps]
        seqwrap.kahan_accumulate_(accs, comps, grads, 0.5)
        seqwrap.kahan_accumulate_(d_accs, d_comps, [x.to(dev) for x in grads], 0.5)
        assert all(torch.equal(a, d.cpu()) for a, d in zip(accs, d_accs)), dtype


def cross_entropy(dev):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(37, 24, generator=g).to(dtype)
        w = (torch.randn(1001, 24, generator=g) / 5).to(dtype)
        y = torch.randint(0, 1001, (37,), generator=g)
        y[::5] = -100
        outs = []
        for d in ("cpu", dev):
            hd, wd = h.to(d).requires_grad_(), w.to(d).requires_grad_()
            loss = seqwrap.linear_cross_entropy(hd, wd, y.to(d), label_smoothing=0.1, z_loss=1e-3, softcap=15.0,
                                                chunk_size=16)
            outs.append((loss, *torch.autograd.grad(loss, (hd, wd))))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert all(close(a, b, tol) for a, b in zip(outs[1], outs[0])), dtype
    if dev != "cpu":  # a label out of range: the device-side flag path
        bad = torch.full((5,), 1001, device=dev)
        try:
            seqwrap.linear_cross_entropy(torch.randn(5, 24, device=dev), torch.randn(1001, 24, device=dev), bad)
        except ValueError:
            pass
        else:
            raise AssertionError("an out-of-range label was not reported")


def lse_merge(dev):
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float64, torch.float32):
        q = torch.randn(1, 4, 45, 16, generator=g).to(dtype)
        k, v = (torch.randn(1, 2, 45, 16, generator=g).to(dtype) for _ in range(2))
        outs = []
        for d in ("cpu", dev):
            x = [t.to(d).requires_grad_() for t in (q, k, v)]
            out = chunked_attention(*x, chunk_size=8, window=30)
            outs.append((out, *torch.autograd.grad(out.sum(), x)))
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert all(close(a, b, tol) for a, b in zip(outs[1], outs[0])), dtype


def scan(dev):
    """The one selective-scan kernel (csrc/scan/) in both modes: Mamba-1 (A per state, with resets)
    and Mamba-2 (scalar A per head, 2 groups, packed documents)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sp = torch.nn.functional.softplus
    b, d_, n, length = 2, 3, 5, 37
    reset = torch.zeros(b, length, dtype=torch.int32)
    reset[0, 11] = reset[1, 0] = reset[1, 30] = 1
    mamba1 = [r(b, d_, length), sp(r(b, d_, length)), -torch.exp(r(d_, n) * 0.5), r(b, n, length),
              r(b, n, length), r(d_), r(b, d_, length), r(b, d_, n)]
    heads, hd, groups = 4, 3, 2
    mamba2 = [r(b, length, heads, hd), sp(r(b, length, heads)), -torch.exp(r(heads) * 0.5),
              r(b, length, groups, n), r(b, length, groups, n), r(heads), r(b, length, heads, hd),
              r(b, heads, hd, n)]
    runs = ((mamba1, lambda *x: _scan(*x, block=8, reset=reset.to(x[0].device))),
            (mamba2, lambda *x: ssd_scan(*x, return_final_state=True, block=8, reset=reset.to(x[0].device))))
    for inputs, f in runs:
        outs = []
        for d in ("cpu", dev):
            x = [t.to(d).requires_grad_() for t in inputs]
            y, h = f(*x)
            outs.append((y, h, *torch.autograd.grad(y.sum() + h.sum(), x)))
        assert all(close(a, c, 1e-4) for a, c in zip(outs[1], outs[0]))


def sampler(dev):
    for k in (1, 31, 257):
        q = torch.linspace(0.05, 1.0, k, dtype=torch.float64)
        a = seqwrap.sample_chunks(k, probs=q, seed=7, step=3)
        b = seqwrap.sample_chunks(k, probs=q, seed=7, step=3, device=dev)
        assert torch.equal(a, b.cpu())
        t = max(1, k // 4)
        a = seqwrap.sample_chunks(k, sampling="fixed", budget=t, seed=7, step=3)
        b = seqwrap.sample_chunks(k, sampling="fixed", budget=t, seed=7, step=3, device=dev)
        assert torch.equal(a, b.cpu())


KERNELS = {"kahan": kahan, "cross_entropy": cross_entropy, "lse_merge": lse_merge, "selective_scan": scan,
           "sampler": sampler}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    failed = 0
    for name, fn in KERNELS.items():
        try:
            fn(a.device)
            if a.device != "cpu":
                torch.cuda.synchronize()
            print(f"sanitize_target: {name} ok", flush=True)
        except Exception as exc:  # reported per kernel; the exit status says whether all ran
            failed += 1
            print(f"sanitize_target: {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
