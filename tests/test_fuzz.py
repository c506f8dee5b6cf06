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


@st.composite
def xent_case(draw):
    rows = draw(st.integers(0, 6))
    vocab = draw(st.integers(0, 70))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]))
    logits = data_layout(draw, (rows, vocab), dtype)
    labels = torch.tensor(draw(st.lists(st.integers(-101, vocab + 1), min_size=rows, max_size=rows)), dtype=torch.int64)
    if draw(st.booleans()):
        labels = labels.to(draw(st.sampled_from([torch.int32, torch.float32])))
    real = torch.float64 if dtype == torch.float64 else torch.float32
    out_rows = draw(st.sampled_from([rows, rows, rows + 1]))
    loss = torch.empty(out_rows, dtype=draw(st.sampled_from([real, real, torch.float16])))
    lse = torch.empty(rows, dtype=real)
    opts = dict(ignore_index=-100, label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0, 1.5])),
                z_loss=draw(st.sampled_from([0.0, 1e-3])), softcap=draw(st.sampled_from([0.0, 2.0, -1.0])))
    return logits, labels, loss, lse, opts


def data_layout(draw, shape, dtype):
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided"]))
    if layout == "transposed":
        t = torch.randn(shape[::-1]).t()
    elif layout == "strided":
        t = torch.randn(shape[0], shape[1] * 2)[:, ::2]
    else:
        t = torch.randn(shape)
    return t.to(dtype)


def xent_valid(logits, labels, loss, lse, opts):
    rows, vocab = logits.shape
    return (logits.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            and rows > 0 and vocab > 0 and logits.is_contiguous() and labels.dtype == torch.int64
            and loss.shape == (rows,) and loss.dtype == lse.dtype
            and bool(((labels == -100) | ((labels >= 0) & (labels < vocab))).all())
            and 0 <= opts["label_smoothing"] <= 1 and opts["softcap"] >= 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=xent_case(), mode=st.sampled_from(["auto", "capsule"]))
def test_fuzz_cross_entropy_chunk(case, mode):
    logits, labels, loss, lse, opts = case
    seqwrap._C._set_bridge_mode(mode)
    try:
        before = logits.clone()
        call = lambda: seqwrap._C.cross_entropy_chunk(logits, labels, loss, lse, None, compute_grad=True,  # noqa: E731
                                                      error_flag=None, stream=0, **opts)
        if not xent_valid(logits, labels, loss, lse, opts):
            with pytest.raises((TypeError, ValueError)):
                call()
            assert torch.equal(logits, before), "a rejected call must not write the logits"
            return
        call()
        x = before.double()
        if opts["softcap"] > 0:
            x = opts["softcap"] * torch.tanh(x / opts["softcap"])
        ref_lse = torch.logsumexp(x, -1)
        tol = 1e-12 if logits.dtype == torch.float64 else 1e-5 if logits.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
        assert torch.isfinite(logits.double()).all()
    finally:
        seqwrap._C._set_bridge_mode("auto")
