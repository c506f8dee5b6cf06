"""seqwrap.ops.reference's scans (Mamba-1 selective scan, Mamba-2 SSD) against an independent closed form, and the
scan ops against them, float64 on fresh random inputs.

The closed form needs no recurrence: with cum_t = sum_{r <= t} dt_r A (the log of the decay from the start),
    h_t = exp(cum_t) h0 + sum_{s <= t, same document} exp(cum_t - cum_s) dt_s B_s u_s
(h0 only while the first document lasts), a (T x T) weighted sum, the "dual" form of the scan."""
import pytest
import torch
import torch.nn.functional as F

from seqwrap.ops import reference, selective_scan, ssd_scan

from .scan_reference import random_inputs
from .ssd_reference import random_ssd_inputs

F64 = torch.float64
LENGTH = 13
STARTS = torch.zeros(2, LENGTH, dtype=torch.bool)
STARTS[0, [4, 5, 10]] = True          # documents of 4, 1, 5 and 3 steps in row 0
STARTS[1, [0, 7]] = True              # row 1 drops h0 at step 0


def segments(starts, batch, length):
    """(same (batch, T, S): steps t and s in one document, first (batch, T): t in the document h0 belongs to)."""
    seg = torch.zeros(batch, length, dtype=torch.int64) if starts is None else starts.to(torch.int64).cumsum(1)
    return seg[:, :, None] == seg[:, None, :], seg == 0


def closed_form_selective(u, dt, A, B, C, D, z, h0, starts):
    batch, dim, length = u.shape
    cum = (dt[:, :, None, :] * A[None, :, :, None]).cumsum(-1)             # (b, d, n, T)
    same, first = segments(starts, batch, length)
    allowed = (same & torch.ones(length, length, dtype=torch.bool).tril())[:, None, None]   # (b, 1, 1, T, S)
    gap = torch.where(allowed, cum[..., :, None] - cum[..., None, :], torch.full((), float("-inf"), dtype=F64))
    drive = (dt * u)[:, :, None, :] * B[:, None, :, :]                    # (b, d, n, S)
    h = (torch.exp(gap) * drive[..., None, :]).sum(-1)                      # (b, d, n, T)
    h = h + torch.exp(cum) * h0[..., None] * first[:, None, None, :]
    y = (h * C[:, None]).sum(2) + D[None, :, None] * u
    return y * F.silu(z), h[..., -1]


def closed_form_ssd(x, dt, A, B, C, D, z, h0, starts):
    batch, length, heads, _ = x.shape
    rep = heads // B.shape[2]
    B, C = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)        # (b, T, H, N)
    cum = (dt * A).cumsum(1)                                                # (b, T, H)
    same, first = segments(starts, batch, length)
    allowed = (same & torch.ones(length, length, dtype=torch.bool).tril())[..., None]   # (b, T, S, 1)
    gap = torch.where(allowed, cum[:, :, None] - cum[:, None], torch.full((), float("-inf"), dtype=F64))  # (b,T,S,H)
    # s_t[p, n] = sum_s exp(gap) dt_s x_s[p] B_s[n] + exp(cum_t) h0[p, n] (first document)
    s = torch.einsum("btsh,bsh,bshp,bshn->bthpn", torch.exp(gap), dt, x, B)
    s = s + torch.exp(cum)[..., None, None] * h0[:, None] * first[:, :, None, None, None]
    y = torch.einsum("bthpn,bthn->bthp", s, C) + D[:, None] * x
    return y * F.silu(z), s[:, -1]


def grads(outputs, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def close(got, want, tol=1e-11):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, rtol=tol, atol=tol), f"output / gradient {i}: {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("starts", [None, STARTS], ids=["one-document", "resets"])
def test_selective_scan_reference_equals_closed_form(starts):
    x = random_inputs(batch=2, dim=3, dstate=4, length=LENGTH, seed=30)
    ref = reference.selective_scan_ref(*x, reset=starts)
    want = closed_form_selective(*x, starts)
    close(ref, want)
    close(grads(ref, x, 31), grads(want, x, 31), tol=1e-10)


@pytest.mark.parametrize("starts", [None, STARTS], ids=["one-document", "resets"])
def test_ssd_reference_equals_closed_form(starts):
    x = random_ssd_inputs(batch=2, length=LENGTH, heads=4, headdim=3, groups=2, dstate=5, seed=32)
    ref = reference.ssd_scan_ref(*x, reset=starts)
    want = closed_form_ssd(*x, starts)
    close(ref, want)
    close(grads(ref, x, 33), grads(want, x, 33), tol=1e-10)


def test_resets_matter_and_seq_idx_is_the_same_boundaries():
    x = random_inputs(batch=2, dim=3, dstate=4, length=LENGTH, seed=34)
    with_resets = reference.selective_scan_ref(*x, reset=STARTS)
    assert (with_resets[0] - reference.selective_scan_ref(*x)[0]).abs().max() > 1e-3
    # row 0 (no start at t = 0, which seq_idx cannot express): seq_idx changes exactly where a document starts
    seq_idx = STARTS[:1].to(torch.int64).cumsum(1)
    row0 = reference.selective_scan_ref(*[t[:1] if t.dim() == 3 else t for t in x], seq_idx=seq_idx)
    close(row0, (with_resets[0][:1], with_resets[1][:1]), tol=0)


def test_selective_scan_op_matches_reference():
    x = random_inputs(batch=2, dim=3, dstate=4, length=LENGTH, seed=35)
    seq_idx = torch.tensor([[0] * 4 + [1] + [2] * 5 + [3] * 3, [0] * 7 + [1] * 6])
    got = selective_scan(*x, return_final_state=True, seq_idx=seq_idx)
    want = reference.selective_scan_ref(*x, seq_idx=seq_idx)
    close(got, want)
    close(grads(got, x, 36), grads(want, x, 36), tol=1e-10)


def test_ssd_op_matches_reference():
    x = random_ssd_inputs(batch=2, length=LENGTH, heads=4, headdim=3, groups=2, dstate=5, seed=37)
    got = ssd_scan(*x, return_final_state=True, block=4)
    want = reference.ssd_scan_ref(*x)
    close(got, want)
    close(grads(got, x, 38), grads(want, x, 38), tol=1e-10)


def test_scan_references_compute_in_float64_from_any_dtype():
    x = random_inputs(batch=1, dim=2, dstate=3, length=6, dtype=torch.bfloat16, seed=39, requires_grad=False)
    y, h = reference.selective_scan_ref(*x)
    assert y.dtype == F64 and h.dtype == F64
    close((y, h), reference.selective_scan_ref(*[t.double() for t in x]), tol=0)
    xs = random_ssd_inputs(batch=1, length=6, dtype=torch.float16, seed=40, requires_grad=False)
    y, s = reference.ssd_scan_ref(*xs)
    assert y.dtype == F64 and s.dtype == F64
    close((y, s), reference.ssd_scan_ref(*[t.double() for t in xs]), tol=0)
