"""The selective scan with document resets (packed rows) against scanning every document on its own
(float64): forward, final state, every gradient, truncation, and the reset argument's checks."""
import pytest
import torch
import torch.nn.functional as F

from seqwrap import _C
from seqwrap.ops import selective_scan
from seqwrap.ops.selective_scan import _scan, resets

from .scan_reference import random_inputs, scan_ref

pytestmark = pytest.mark.ccore

LENGTHS = [[4, 1, 7, 5], [9, 8]]   # 2 rows of 17 steps; a 1-step document
L = 17


def seq_idx_of(lengths):
    return torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])


def per_document(x, lengths, drop_h0=False):
    """Every document scanned alone from zero (the first of each row from h0, unless drop_h0).
    Returns y (batch, dim, len) and the final state of each row's last document."""
    u, dt, A, B, C, D, z, h0 = x
    ys, hs = [], []
    for b, row in enumerate(lengths):
        s, parts = 0, []
        for d, n in enumerate(row):
            sl = slice(s, s + n)
            init = h0[b:b + 1] if d == 0 and not drop_h0 else None
            y, h = scan_ref(u[b:b + 1, :, sl], dt[b:b + 1, :, sl], A, B[b:b + 1, :, sl], C[b:b + 1, :, sl], D,
                            z[b:b + 1, :, sl], init)
            parts.append(y)
            s += n
        ys.append(torch.cat(parts, -1))
        hs.append(h)
    return torch.cat(ys), torch.cat(hs)


def grads(y, h, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64)
    return torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs, allow_unused=True)


def close(got, ref, what, tol=1e-10):
    for name, a, b in zip("u dt A B C D z h0".split(), got, ref):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=tol, atol=tol * 0.1), f"{what}: grad of {name}"


@pytest.mark.parametrize("block", [1, 3, 64])
def test_seq_idx_equals_per_document_scans(block):
    x = random_inputs(batch=2, dim=3, dstate=4, length=L, seed=2)
    y, h = _scan(*x, block=block, reset=resets(x[0], seq_idx=seq_idx_of(LENGTHS)))
    yr, hr = per_document(x, LENGTHS)
    assert torch.allclose(y, yr, rtol=1e-12, atol=1e-13) and torch.allclose(h, hr, rtol=1e-12, atol=1e-13)
    close(grads(y, h, x), grads(yr, hr, x), f"block {block}")
    # without the resets the rows are single sequences: a different result (the check can fail)
    assert (selective_scan(*x) - yr).abs().max() > 1e-3


def test_reset_at_step_zero_drops_h0():
    """reset[b, 0] = 1: the row's first document does not continue the state h0 (a chunk that starts a
    document); dh0 is zero for that row, and the other row keeps h0."""
    x = random_inputs(batch=2, dim=2, dstate=3, length=L, seed=4)
    reset = torch.zeros(2, L, dtype=torch.bool)
    reset[:, 0] = True
    y, h = selective_scan(*x, return_final_state=True, reset=reset)
    yr, hr = per_document(x, [[L], [L]], drop_h0=True)
    assert torch.allclose(y, yr, rtol=1e-12, atol=1e-13) and torch.allclose(h, hr, rtol=1e-12, atol=1e-13)
    dh0 = grads(y, h, x)[7]
    assert torch.count_nonzero(dh0) == 0
    reset[1, 0] = False
    y, h = selective_scan(*x, return_final_state=True, reset=reset)
    dh0 = grads(y, h, x)[7]
    assert torch.count_nonzero(dh0[0]) == 0 and torch.count_nonzero(dh0[1]) == dh0[1].numel()


def test_gradcheck_with_resets():
    x = random_inputs(batch=2, dim=2, dstate=2, length=9, seed=6)
    reset = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1, 0]], dtype=torch.int32)
    f = lambda *a: _scan(*a, block=2, reset=reset)  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(x), atol=1e-8, rtol=1e-6)


def truncated_per_document(x, lengths, T):
    """Truncated adjoint (window T) of per-document scans, by brute force: the loss of step t reaches
    steps t-T+1..t of its own document only."""
    u, dt, A, B, C, D, z, h0 = x
    g = torch.Generator().manual_seed(11)
    gy = torch.randn(u.shape, generator=g, dtype=torch.float64)
    total = 0
    for b, row in enumerate(lengths):
        s = 0
        for d, n in enumerate(row):
            for t in range(s, s + n):
                h = h0[b] if d == 0 else torch.zeros_like(h0[b])   # the state entering the document
                for i in range(s, t + 1):
                    if i == t - T + 1 and i > s:   # the window starts inside the document: cut h_{t-T}
                        h = h.detach()
                    a = torch.exp(dt[b, :, i, None] * A)
                    h = a * h + dt[b, :, i, None] * B[b, None, :, i] * u[b, :, i, None]
                yt = ((h * C[b, None, :, t]).sum(-1) + D * u[b, :, t]) * F.silu(z[b, :, t])
                total = total + (yt * gy[b, :, t]).sum()
            s += n
    return torch.autograd.grad(total, x, allow_unused=True), gy


@pytest.mark.parametrize("T", [1, 3, 6])
def test_truncated_adjoint_with_resets(T):
    x = random_inputs(batch=2, dim=2, dstate=3, length=L, seed=9)
    ref, gy = truncated_per_document(x, LENGTHS, T)
    y, _ = _scan(*x, block=4, truncation=T, reset=resets(x[0], seq_idx=seq_idx_of(LENGTHS)))
    close(torch.autograd.grad((y * gy).sum(), x, allow_unused=True), ref, f"truncation {T}")


def test_parallel_path_with_resets():
    """Large enough for the OpenMP team (batch*dim*len*dstate >= 2^18)."""
    lengths = [[30, 1, 60, 37], [128]]
    x = random_inputs(batch=2, dim=64, dstate=16, length=128, seed=13)
    y, h = _scan(*x, block=32, reset=resets(x[0], seq_idx=seq_idx_of(lengths)))
    yr, hr = per_document(x, lengths)
    assert torch.allclose(y, yr, rtol=1e-11, atol=1e-11) and torch.allclose(h, hr, rtol=1e-11, atol=1e-11)
    close(grads(y, h, x), grads(yr, hr, x), "parallel", tol=1e-9)


def test_reset_argument_checks():
    x = [t.detach() for t in random_inputs(batch=2, dim=2, dstate=3, length=L)]
    with pytest.raises(ValueError, match=r"'seq_idx' must be an integer or bool tensor of shape \(batch, len\)"):
        selective_scan(*x, seq_idx=torch.zeros(2, L - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="'reset' must be an integer or bool tensor"):
        selective_scan(*x, reset=torch.zeros(2, L))
    with pytest.raises(TypeError, match="seq_idx or reset, not both"):
        selective_scan(*x, seq_idx=torch.zeros(2, L, dtype=torch.long), reset=torch.zeros(2, L, dtype=torch.bool))
    # the C glue itself: dtype, shape, device are checked before any kernel runs
    u, dt, A, B, C, D, z, h0 = x
    y, hl, ck = torch.empty(2, 2, L, dtype=torch.float64), torch.empty(2, 2, 3, dtype=torch.float64), \
        torch.empty(2, 2, 1, 3, dtype=torch.float64)
    args = (u, dt, A, B, C, D, z, h0, y, hl, ck, 64, None, 0)
    with pytest.raises(TypeError, match="'reset' has dtype int64"):
        _C.selective_scan_fwd(*args, reset=torch.zeros(2, L, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"'reset' must have shape \(2, 17\) \(shape \(batch,len\).*'reset' has shape \(2, 16\)"):
        _C.selective_scan_fwd(*args, reset=torch.zeros(2, L - 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="'reset'"):
        _C.selective_scan_fwd(*args, reset=torch.zeros(2, 2 * L, dtype=torch.int32)[:, ::2])
    _C.selective_scan_fwd(*args, reset=None)  # None: no reset, as without the argument
