"""Hypothesis fuzzing of the C glue: random shapes, dtypes and strides.

Oracle: the call must either succeed and match the float32 reference bit for
bit, or raise TypeError/ValueError without writing anything. Any crash,
abort or out-of-bounds access fails the run (and `make asan` reruns this file
under AddressSanitizer + UBSan).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqwrap

from .test_kahan import kahan_reference

pytestmark = pytest.mark.ccore

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.bool]


@st.composite
def tensors(draw, shape):
    """A tensor of `shape` with a random dtype and a random memory layout."""
    dtype = draw(st.sampled_from(ALL_DTYPES))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded", "offset"]))
    if layout == "transposed" and len(shape) >= 2:
        t = torch.randn(tuple(reversed(shape))).t() if len(shape) == 2 else torch.randn(shape[::-1]).permute(*reversed(range(len(shape))))
    elif layout == "strided" and len(shape) >= 1:
        big = list(shape)
        big[-1] = shape[-1] * 2
        t = torch.randn(big)[..., ::2]
    elif layout == "expanded" and len(shape) >= 1:
        t = torch.randn(shape[:-1] + (1,)).expand(shape)
    elif layout == "offset":
        n = 1
        for s in shape:
            n *= s
        t = torch.randn(n + 3)[3:].view(shape)
    else:
        t = torch.randn(shape)
    if dtype == torch.bool:
        return t > 0
    return t.to(dtype)


def is_valid(acc, comp, g):
    return (acc.dtype == torch.float32 and comp.dtype == torch.float32
            and g.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and acc.shape == comp.shape == g.shape and acc.numel() > 0
            and acc.is_contiguous() and comp.is_contiguous() and g.is_contiguous())


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 3), mode=st.sampled_from(["auto", "capsule"]))
def test_fuzz_kahan(data, n, mode):
    seqwrap._C._set_bridge_mode(mode)
    try:
        accs, comps, grads = [], [], []
        for _ in range(n):
            shape = data.draw(shapes)
            shape_g = data.draw(st.sampled_from([shape, shape, shape + (1,), (2,) + shape]))
            accs.append(data.draw(tensors(shape)))
            comps.append(data.draw(tensors(shape)))
            grads.append(data.draw(tensors(shape_g)))
        scale = data.draw(st.floats(-4, 4, allow_nan=False))
        valid = all(is_valid(a, c, g) for a, c, g in zip(accs, comps, grads))
        before = [(a.clone(), c.clone()) for a, c in zip(accs, comps)]
        if valid:
            ref = [(a.clone(), c.clone()) for a, c in zip(accs, comps)]
            seqwrap.kahan_accumulate_(accs, comps, grads, scale)
            for (ra, rc), a, c, g in zip(ref, accs, comps, grads):
                kahan_reference(ra, rc, g, scale)
                assert torch.equal(ra, a) and torch.equal(rc, c)
        else:
            with pytest.raises((TypeError, ValueError)):
                seqwrap.kahan_accumulate_(accs, comps, grads, scale)
            for (ba, bc), a, c in zip(before, accs, comps):
                assert torch.equal(ba, a) and torch.equal(bc, c)
    finally:
        seqwrap._C._set_bridge_mode("auto")
