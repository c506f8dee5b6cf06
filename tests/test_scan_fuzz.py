"""Hypothesis fuzzing of the selective scan: random sizes, block lengths, truncation, optional inputs,
and non-contiguous views (the wrapper makes them contiguous). Oracle: the float64 sequential reference.
`make asan` reruns this file under AddressSanitizer + UBSan."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqwrap.ops.selective_scan import _scan

from .scan_reference import random_inputs, scan_ref

pytestmark = pytest.mark.ccore


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), dim=st.integers(1, 5), dstate=st.integers(1, 9), length=st.integers(1, 20),
       block=st.integers(1, 25), use=st.lists(st.booleans(), min_size=3, max_size=3),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_scan_random_sizes(batch, dim, dstate, length, block, use, transposed, seed):
    u, dt, A, B, C, D, z, h0 = random_inputs(batch, dim, dstate, length, seed=seed)
    D, z, h0 = (t if keep else None for t, keep in zip((D, z, h0), use))
    if transposed:   # a non-contiguous u with the same values
        u = u.detach().transpose(0, 2).contiguous().transpose(0, 2).requires_grad_()
    x = [t for t in (u, dt, A, B, C, D, z, h0) if t is not None]
    y, h = _scan(u, dt, A, B, C, D, z, h0, block=block)
    yr, hr = scan_ref(u, dt, A, B, C, D, z, h0)
    assert torch.allclose(y, yr, rtol=1e-11, atol=1e-11) and torch.allclose(h, hr, rtol=1e-11, atol=1e-11)
    g = torch.Generator().manual_seed(seed)
    gy, gh = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)
    got = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), x)
    ref = torch.autograd.grad((yr * gy).sum() + (hr * gh).sum(), x)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
