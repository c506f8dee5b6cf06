"""Hypothesis fuzzing of the SSD scan: random sizes, groups, block lengths, optional inputs and
non-contiguous views (the wrapper makes them contiguous). Oracle: the float64 sequential reference.
`make asan` reruns this file under AddressSanitizer + UBSan."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqwrap.ops import ssd_scan

from .ssd_reference import random_ssd_inputs, ssd_ref

pytestmark = pytest.mark.ccore


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), length=st.integers(1, 20), groups=st.integers(1, 3), per_group=st.integers(1, 3),
       headdim=st.integers(1, 4), dstate=st.integers(1, 9), block=st.integers(1, 25),
       use=st.lists(st.booleans(), min_size=3, max_size=3), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_ssd_random_sizes(batch, length, groups, per_group, headdim, dstate, block, use, transposed, seed):
    x, dt, A, B, C, D, z, h0 = random_ssd_inputs(batch, length, groups * per_group, headdim, groups, dstate, seed=seed)
    D, z, h0 = (t if keep else None for t, keep in zip((D, z, h0), use))
    if transposed:   # a non-contiguous x with the same values
        x = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    inputs = [t for t in (x, dt, A, B, C, D, z, h0) if t is not None]
    y, h = ssd_scan(x, dt, A, B, C, D, z, h0, return_final_state=True, block=block)
    yr, hr = ssd_ref(x, dt, A, B, C, D, z, h0)
    assert torch.allclose(y, yr, rtol=1e-11, atol=1e-11) and torch.allclose(h, hr, rtol=1e-11, atol=1e-11)
    g = torch.Generator().manual_seed(seed)
    gy, gh = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)
    got = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs)
    ref = torch.autograd.grad((yr * gy).sum() + (hr * gh).sum(), inputs)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
