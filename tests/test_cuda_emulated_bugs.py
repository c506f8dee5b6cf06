"""The emulator can fail: deliberately broken copies of the real kernels (text substitutions on
csrc/**/*.cu at build time, tests/cuda_emu/build.py `rewrites`) must each be caught."""
import subprocess
import sys
from pathlib import Path

import torch

import seqwrap

from .cuda_emu import build
from .cuda_emu.device import RANDOM, SCHEDULES, EmulatedDevice

ROOT = Path(__file__).resolve().parent.parent

XENT = "xent/xent.cu"


def _xent(dev, schedule=RANDOM):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 8, generator=g), torch.randn(1000, 8, generator=g)
    y = torch.tensor([1, 5, 999])
    with dev.active(schedule, 7, expect_reports=True) as run:
        loss = seqwrap.linear_cross_entropy(h, w, y)
    return loss, run.reports


def test_removed_label_barrier_is_reported_as_a_race():
    """Without the __syncthreads after thread 0 writes label_once, other threads read it unsynchronised."""
    bad = [("label_once = *(const volatile int64_t *)&job.labels[r * job.labels_stride];\n    __syncthreads();",
            "label_once = *(const volatile int64_t *)&job.labels[r * job.labels_stride];\n")]
    dev = EmulatedDevice(build.build("plain", rewrites={XENT: bad}, tag="bug-barrier"))
    _, reports = _xent(dev)
    assert any("race on shared memory" in r and "label_once" in r and "sw_xent_kernel" in r for r in reports), reports


def test_wrong_shuffle_mask_is_reported():
    """A half-warp mask in the block reduction of the real kernel (block_reduce.cuh is included by
    xent.cu: the bug is seeded through a macro that renames the call)."""
    bad = [('#include "block_reduce.cuh"',
            '#define __shfl_xor_sync(m, v, o) __shfl_xor_sync(0x0000ffffu, v, o)\n#include "block_reduce.cuh"')]
    dev = EmulatedDevice(build.build("plain", rewrites={XENT: bad}, tag="bug-mask"))
    _, reports = _xent(dev)
    assert any("mask 0x0000ffff" in r for r in reports), reports


def test_healthy_kernel_reports_nothing():
    dev = EmulatedDevice(build.build("plain"))
    loss, reports = _xent(dev)
    assert reports == [] and torch.isfinite(loss)


# -- a non-atomic accumulation: the global-memory race check (build mode "race") ---------------------------

SCAN = "scan/scan.cu"
# scan.h sums ddt, dB and dC with atomicAdd (SW_SCAN_ATOMIC_ADD); the macro turns it into a plain `+=`
NON_ATOMIC = [('#include "scan.h"', '#define atomicAdd(p, v) (*(p) += (v))  /* seeded bug: a non-atomic sum */\n'
                                    '#include "scan.h"')]


def _scan_backward(dev, schedule, seed):
    """3 x 50 = 150 rows: two blocks of 128 threads whose rows add into the same dB / dC / ddt sums."""
    from seqwrap.ops.selective_scan import _scan

    from .scan_reference import random_inputs
    x = random_inputs(batch=3, dim=50, dstate=4, length=9, dtype=torch.float32, seed=4, requires_grad=False)
    with dev.active(schedule, seed, expect_reports=True) as run:
        xs = [t.clone().requires_grad_() for t in x]
        y, h = _scan(*xs, block=4)
        grads = torch.autograd.grad(y.sum() + h.sum(), xs)
    assert any(k.startswith("sw_scan_bwd_kernel") for k in run.launched), run.launched
    return grads, run.reports


def test_non_atomic_accumulation_is_reported_as_a_global_memory_race():
    """The emulator runs one fiber at a time, so a plain `+=` loses no update here: the results are
    the same as the real kernel's. What catches it is the race check on global memory: two threads
    of a launch access one address, one writes, not both atomically, no __syncthreads between them,
    under every schedule; the real kernel (atomicAdd) reports nothing under the same schedules."""
    bad = EmulatedDevice(build.build("race", rewrites={SCAN: NON_ATOMIC}, tag="bug-atomic"))
    good = EmulatedDevice(build.build("race"))
    for schedule, seed in SCHEDULES:
        _, reports = _scan_backward(bad, schedule, seed)
        races = [r for r in reports if "race on global memory" in r and r.startswith("sw_scan_bwd_kernel")]
        assert races, reports
        # the seeded plain `+=`: a write over a plain (non-atomic) write of another thread, or a read of one
        assert any("written plainly (non-atomic)" in r for r in races), races
        _, clean = _scan_backward(good, schedule, seed)
        assert clean == [], clean


# -- an off-by-one in a grid-stride loop ---------------------------------------------------------------------

KAHAN = "kahan/kahan.cu"
STRIDE_LOOP = "i < n; i += step) {"


def test_grid_stride_loop_one_past_the_end_is_caught_by_asan():
    """`i <= n` in the Kahan kernel's block-stride loop: thread n reads acc[n], one past the tensor.
    The sanitized emulated build (in a child with the ASan runtime preloaded) reports a
    heap-buffer-overflow in sw_kahan_kernel; the real kernel passes the same run."""
    from .test_cuda_emulated_asan import asan_env
    bad = build.build("asan", rewrites={KAHAN: [(STRIDE_LOOP, "i <= n; i += step) {")]}, tag="bug-stride")
    good = build.build("asan")
    code = ("import sys, torch, seqwrap\n"
            "from pathlib import Path\n"
            "from tests.cuda_emu.device import EmulatedDevice\n"
            "dev = EmulatedDevice(Path(sys.argv[1]))\n"
            "acc, comp, g = torch.zeros(1000), torch.zeros(1000), torch.ones(1000)\n"
            "with dev.active():\n"
            "    seqwrap.kahan_accumulate_([acc], [comp], [g], 0.5)\n"
            "assert torch.equal(acc, torch.full((1000,), 0.5))\n"
            "print('kahan ok')\n")
    runs = {}
    for name, so in (("bad", bad), ("good", good)):
        runs[name] = subprocess.run([sys.executable, "-c", code, str(so)], env=asan_env(), capture_output=True,
                                    text=True, timeout=300, cwd=ROOT)
    assert runs["good"].returncode == 0 and "kahan ok" in runs["good"].stdout, runs["good"].stderr[-3000:]
    err = runs["bad"].stderr
    assert runs["bad"].returncode != 0 and "kahan ok" not in runs["bad"].stdout
    assert "AddressSanitizer: heap-buffer-overflow" in err, err[-3000:]
    assert "sw_kahan_kernel" in err, err[-3000:]


def test_grid_stride_loop_starting_one_late_gives_a_wrong_result():
    """The loop started at +1: thread t of block b takes element b * 256 + t + 1, so element 0 is
    never accumulated (and the loop's bound keeps the rest in range). Caught as a wrong result
    against the exact sum: exactly element 0, every other element right."""
    dev = EmulatedDevice(build.build("plain", rewrites={KAHAN: [
        ("(long long)(b - first) * blockDim.x + threadIdx.x; i < n", "(long long)(b - first) * blockDim.x + threadIdx.x + 1; i < n")]},
        tag="bug-stride-start"))
    n = 3 * 256 + 5   # 4 blocks of 256, the last partial
    acc, comp, g = torch.zeros(n), torch.zeros(n), torch.ones(n)
    with dev.active(RANDOM, 3):
        seqwrap.kahan_accumulate_([acc], [comp], [g], 0.5)
    want = torch.full((n,), 0.5)
    wrong = (acc != want).nonzero().flatten().tolist()
    assert wrong == [0], wrong
