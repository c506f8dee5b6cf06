"""The emulator can fail: deliberately broken copies of the real kernels (text substitutions on
csrc/**/*.cu at build time, tests/cuda_emu/build.py `rewrites`) must each be caught."""
import pytest
import torch

import seqwrap

from .cuda_emu import build
from .cuda_emu.device import RANDOM, EmulatedDevice

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
