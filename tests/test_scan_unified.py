"""The one selective-scan op (csrc/scan/) behind both front ends: float64 against plain-torch
references with packed documents in each mode (forward and every gradient), the Mamba-2 entry's
version bumps and sealing, and bad shapes named by the registered SSD ops before any unpacking."""
import pytest
import torch
import torch.nn.functional as F

from seqwrap import _C
from seqwrap.ops import selective_scan, ssd_scan

from .scan_reference import random_inputs
from .ssd_reference import random_ssd_inputs

pytestmark = pytest.mark.ccore

RESET_AT = ((0, 4), (1, 0), (1, 7), (1, 8))   # (row, step) document starts; (1, 0) drops row 1's h0


def reset_mask(batch, length):
    r = torch.zeros(batch, length, dtype=torch.bool)
    for b, t in RESET_AT:
        r[b, t] = True
    return r


def ssd_ref_resets(x, dt, A, B, C, D, z, h0, reset):
    """Sequential float64 Mamba-2 reference with document resets: the state entering a reset is zero."""
    batch, length, heads, headdim = x.shape
    rep = heads // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)   # (b, L, H, N)
    s, ys = h0, []
    for t in range(length):
        keep = (~reset[:, t]).to(x.dtype)[:, None, None, None]
        a = torch.exp(dt[:, t] * A)[..., None, None]                        # (b, H, 1, 1)
        s = keep * a * s + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((s * Ch[:, t, :, None, :]).sum(-1))
    y = (torch.stack(ys, 1) + D[:, None] * x) * F.silu(z)
    return y, s


def scan_ref_resets(u, dt, A, B, C, D, z, h0, reset):
    """Sequential float64 Mamba-1 reference with document resets."""
    h, ys = h0, []
    for t in range(u.shape[2]):
        keep = (~reset[:, t]).to(u.dtype)[:, None, None]
        a = torch.exp(dt[:, :, t, None] * A)
        h = keep * a * h + dt[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = (torch.stack(ys, -1) + D[None, :, None] * u) * F.silu(z)
    return y, h


def check_against(f, ref, inputs, reset, seed):
    """Forward (y, final state) and the gradient of every input, for random output cotangents."""
    g = torch.Generator().manual_seed(seed)
    y, h = f(*inputs, reset)
    yr, hr = ref(*inputs, reset)
    wy, wh = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)
    grads = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), inputs)
    grads_r = torch.autograd.grad((yr * wy).sum() + (hr * wh).sum(), inputs)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h, hr, rtol=1e-10, atol=1e-12)
    names = ("x", "dt", "A", "B", "C", "D", "z", "h0")
    for name, a, b in zip(names, grads, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("block, dstate", [(1, 5), (3, 5), (64, 5), (1024, 40)])
def test_mamba2_mode_groups_resets_float64(bridge, block, dstate):
    """(1024, 40): the block states of one row exceed the CPU's L2 tile, so the backward runs the head
    one row at a time, as each GPU thread does."""
    x = random_ssd_inputs(batch=2, length=12, heads=6, headdim=3, groups=3, dstate=dstate, seed=block)
    reset = reset_mask(2, 12)
    f = lambda *a: ssd_scan(*a[:8], return_final_state=True, block=block, reset=a[8])  # noqa: E731
    check_against(f, ssd_ref_resets, x, reset, seed=block)


def test_mamba2_mode_seq_idx_is_reset(bridge):
    x = random_ssd_inputs(batch=2, length=10, heads=4, headdim=2, groups=2, dstate=3, seed=4)
    seq_idx = torch.tensor([[0] * 4 + [1] * 6, [3] * 7 + [5] * 3])
    reset = torch.zeros(2, 10, dtype=torch.bool)
    reset[0, 4] = reset[1, 7] = True
    y1 = ssd_scan(*x, seq_idx=seq_idx, block=3)
    y2 = ssd_scan(*x, reset=reset, block=3)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert (y1 - ssd_scan(*x, block=3)).abs().max() > 1e-3   # the reset changes the result


@pytest.mark.parametrize("block", [1, 4, 64])
def test_mamba1_mode_resets_float64(bridge, block):
    x = random_inputs(batch=2, dim=4, dstate=5, length=12, seed=block)
    reset = reset_mask(2, 12)
    f = lambda *a: selective_scan(*a[:8], return_final_state=True, reset=a[8])  # noqa: E731
    check_against(f, scan_ref_resets, x, reset, seed=block)


@pytest.mark.parametrize("trunc", [0, 2, 5])
def test_two_modes_agree_with_truncation_and_grad_len(bridge, trunc):
    """Mamba-2 with headdim 1 and one group is Mamba-1 with A broadcast over the state: both modes of
    the kernel give the same truncated-adjoint gradients (raw entries, trunc and grad_len)."""
    b, L, H, N, K, glen = 2, 11, 3, 4, 4, 9
    x, dt, A, B, C, D, z, h0 = random_ssd_inputs(batch=b, length=L, heads=H, headdim=1, groups=1, dstate=N, seed=8,
                                                 requires_grad=False)
    reset = torch.zeros(b, L, dtype=torch.int32)
    reset[0, 5] = 1
    nblk = -(-L // K)
    e = lambda *s: torch.empty(*s, dtype=torch.float64)  # noqa: E731
    dy = torch.randn(b, L, H, 1, dtype=torch.float64)
    # Mamba-2 entry
    y2, hl2, ck2 = e(b, L, H, 1), e(b, H, 1, N), e(b, H, 1, nblk, N)
    _C.ssd_scan_fwd(x, dt, A, B, C, D, z, h0, y2, hl2, ck2, K, None, 0, reset=reset)
    g2 = [e(b, L, H, 1), e(b, L, H), e(b, L, H, 1), e(b, L, 1, N), e(b, L, 1, N), e(b, H, 1), e(b, H, 1), e(b, H, 1, N)]
    dx, ddt, dz, dB, dC, dA, dD, dh0 = g2
    _C.ssd_scan_bwd(x, dt, A, B, C, D, z, ck2, dy, None, dx, ddt, dz, dB, dC, dA, dD, dh0, K, None, 0, trunc=trunc,
                    grad_len=glen, reset=reset)
    # Mamba-1 entry: u (b, dim, L), A (dim, N) broadcast, B (b, N, L)
    m1 = lambda t: t[..., 0].transpose(1, 2).contiguous()  # noqa: E731  (b, L, H, 1) -> (b, H, L)
    u1, dt1, z1 = m1(x), dt.transpose(1, 2).contiguous(), m1(z)
    A1 = A[:, None].expand(H, N).contiguous()
    B1, C1 = B[:, :, 0].transpose(1, 2).contiguous(), C[:, :, 0].transpose(1, 2).contiguous()
    y1, hl1, ck1 = e(b, H, L), e(b, H, N), e(b, H, nblk, N)
    _C.selective_scan_fwd(u1, dt1, A1, B1, C1, D, z1, h0[:, :, 0], y1, hl1, ck1, K, None, 0, reset=reset)
    g1 = [e(b, H, L), e(b, H, L), e(b, H, L), e(b, N, L), e(b, N, L), e(b, H, N), e(b, H), e(b, H, N)]
    du, ddt1, dz1, dB1, dC1, dA1, dD1, dh01 = g1
    _C.selective_scan_bwd(u1, dt1, A1, B1, C1, D, z1, ck1, m1(dy), None, du, ddt1, dz1, dB1, dC1, dA1, dD1, dh01, K,
                          trunc, glen, None, 0, reset=reset)
    close = lambda a, c: torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-13)  # noqa: E731
    close(m1(y2), y1)
    close(hl2[:, :, 0], hl1)
    for two, one in ((m1(dx), du), (ddt.transpose(1, 2), ddt1), (m1(dz), dz1), (dB[:, :, 0].transpose(1, 2), dB1),
                     (dC[:, :, 0].transpose(1, 2), dC1), (dA[..., 0], dA1.sum(-1)), (dD[..., 0], dD1),
                     (dh0[:, :, 0], dh01)):
        close(two, one)
    assert (du[..., glen:] == 0).all() and (dB1[..., glen:] == 0).all()


def raw_ssd_args(seed=0):
    x, dt, A, B, C, D, z, h0 = random_ssd_inputs(batch=2, length=7, heads=4, headdim=3, groups=2, dstate=5,
                                                 dtype=torch.float32, seed=seed, requires_grad=False)
    return x, dt, A, B, C, D, z, h0


def test_mamba2_entry_bumps_the_version_of_every_written_tensor(bridge):
    x, dt, A, B, C, D, z, h0 = raw_ssd_args()
    ins = (x, dt, A, B, C, D, z, h0)
    y, hl, ck = torch.empty(2, 7, 4, 3), torch.empty(2, 4, 3, 5), torch.empty(2, 4, 3, 2, 5)
    before_i = [t._version for t in ins]
    _C.ssd_scan_fwd(x, dt, A, B, C, D, z, h0, y, hl, ck, 4, None, 0)
    assert [t._version for t in (y, hl, ck)] == [1, 1, 1]
    assert [t._version for t in ins] == before_i
    e = torch.empty
    outs = [e(2, 7, 4, 3), e(2, 7, 4), e(2, 7, 4, 3), e(2, 7, 2, 5), e(2, 7, 2, 5), e(2, 4, 3), e(2, 4, 3),
            e(2, 4, 3, 5)]
    dy, dhl = torch.randn(2, 7, 4, 3), torch.randn(2, 4, 3, 5)
    before_i = [t._version for t in (*ins, ck, dy, dhl)]
    _C.ssd_scan_bwd(x, dt, A, B, C, D, z, ck, dy, dhl, *outs, 4, None, 0)
    assert [t._version for t in outs] == [1] * 8
    assert [t._version for t in (*ins, ck, dy, dhl)] == before_i


def test_mamba2_entry_seals_against_overlaps(bridge):
    """The shared bridge check (sw_scope_seal), views at offsets into one storage included."""
    x, dt, A, B, C, D, z, h0 = raw_ssd_args()
    buf = torch.empty(2 * 7 * 4 * 3 + 10)
    with pytest.raises(ValueError, match=r"arguments 'y' and 'hlast' overlap in memory"):
        _C.ssd_scan_fwd(x, dt, A, B, C, D, z, h0, buf[:168].view(2, 7, 4, 3), buf[-120:].view(2, 4, 3, 5),
                        torch.empty(2, 4, 3, 2, 5), 4, None, 0)
    buf = torch.empty(2 * 7 * 4 * 3)
    buf[:56].view(2, 7, 4).copy_(dt)   # dt read from where y would be written
    with pytest.raises(ValueError, match=r"arguments 'dt' and 'y' overlap in memory"):
        _C.ssd_scan_fwd(x, buf[:56].view(2, 7, 4), A, B, C, D, z, h0, buf.view(2, 7, 4, 3), torch.empty(2, 4, 3, 5),
                        torch.empty(2, 4, 3, 2, 5), 4, None, 0)
    assert torch.equal(buf[:56].view(2, 7, 4), dt)   # refused before anything ran


@pytest.mark.parametrize("case, exc, msg", [
    (dict(x=torch.zeros(2, 7, 4)), ValueError, r"'x' must have 4 dimensions \(batch, len, heads, headdim\); got 3"),
    (dict(B=torch.zeros(2, 7, 5)), ValueError, r"'B' must have shape \(batch, len, groups, dstate\)"),
    (dict(C=torch.zeros(2, 7, 2)), ValueError, r"'C' must be 4-D of shape \(batch,len,groups,dstate\), got shape \(2, 7, 2\)"),
    (dict(dt=torch.zeros(2, 7)), ValueError, r"'dt' must be 3-D of shape \(batch,len,heads\), got shape \(2, 7\)"),
])
def test_registered_ssd_ops_name_bad_shapes(bridge, case, exc, msg):
    x, dt, A, B, C, D, z, h0 = raw_ssd_args()
    a = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, h0=h0)
    a.update(case)
    with pytest.raises(exc, match=msg):
        torch.ops.seqwrap.ssd_scan_fwd(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["h0"], 4)
    ck = torch.empty(2, 4, 3, 2, 5)
    with pytest.raises(exc, match=msg):
        torch.ops.seqwrap.ssd_scan_bwd(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], ck,
                                       torch.zeros(2, 7, 4, 3), None, 4)
    with pytest.raises(exc, match=msg):   # the public front end names them too
        ssd_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["h0"])


def test_fake_ssd_op_names_bad_shapes(bridge):
    """The shape functions torch.compile traces through raise the same named errors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        x, dt, B = torch.empty(2, 7, 4), torch.empty(2, 7, 4), torch.empty(2, 7, 2, 5)
        with pytest.raises(ValueError, match=r"'x' must have 4 dimensions"):
            torch.ops.seqwrap.ssd_scan_fwd(x, dt, torch.empty(4), B, B, None, None, None, 4)
        x = torch.empty(2, 7, 4, 3)
        with pytest.raises(ValueError, match=r"'B' must have shape \(batch, len, groups, dstate\)"):
            torch.ops.seqwrap.ssd_scan_bwd(x, dt, torch.empty(4), B[..., 0], B, None, None, torch.empty(1),
                                           torch.empty(2, 7, 4, 3), None, 4)
    assert mode is not None


def test_mamba2_entry_refuses_objects_claiming_to_be_tensors():
    """The SSD entry imports through the shared bridge: __class__ spoofing is refused at every position
    (child interpreter, both DLPack paths: a crash fails the test, not the runner)."""
    from .isolated import run_isolated
    out = run_isolated("""
import torch
class Liar:
    __class__ = torch.Tensor
def args():
    b, L, H, P, G, N = 1, 9, 4, 3, 2, 5
    return dict(x=torch.randn(b, L, H, P), dt=torch.rand(b, L, H), A=-torch.rand(H), B=torch.randn(b, L, G, N),
                C=torch.randn(b, L, G, N), D=torch.randn(H), z=None, h0=torch.randn(b, H, P, N),
                y=torch.empty(b, L, H, P), hlast=torch.empty(b, H, P, N), ckpt=torch.empty(b, H, P, 3, N), block=4,
                work=None, stream=0, reset=torch.zeros(b, L, dtype=torch.int32))
for mode in ("auto", "capsule"):
    seqwrap._C._set_bridge_mode(mode)
    seqwrap._C.ssd_scan_fwd(**args())
    for name in ("x", "dt", "A", "B", "C", "D", "h0", "y", "hlast", "ckpt", "reset"):
        a = args()
        a[name] = Liar()
        print("case", mode, name, flush=True)
        try:
            seqwrap._C.ssd_scan_fwd(**a)
        except TypeError as e:
            assert "'" + name + "' must be a torch.Tensor, not Liar" in str(e), e
            print("refused")
        else:
            raise SystemExit("a fake tensor was accepted")
""")
    assert out.count("refused") == 22, out


def test_ssd_backward_grad_len_defaults_to_len_from_the_tensors():
    """ssd_scan_bwd's omitted trunc and grad_len are 0 and len (call.h `.default_dim`): the same
    gradients as passing them, and a grad_len past len is refused by name."""
    from . import op_examples as X

    spec = {a["name"]: a for a in next(o for o in _C._op_registry() if o["name"] == "ssd_scan_bwd")["args"]}
    assert spec["grad_len"]["default_dim"] == "len" and spec["trunc"]["default"] == 0
    full = X._ssd_bwd(torch.Generator().manual_seed(3))
    omitted = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in full.items()
               if k not in ("trunc", "grad_len")}
    _C.ssd_scan_bwd(**full)
    _C.ssd_scan_bwd(**omitted)
    for k in ("dx", "ddt", "dz", "dB", "dC", "dA", "dD", "dh0"):
        assert torch.equal(full[k], omitted[k]), k
    short = dict(omitted, grad_len=2)
    _C.ssd_scan_bwd(**short)
    assert not torch.equal(short["dx"], full["dx"])   # the default really is len, not 0 or 2
    with pytest.raises(ValueError, match=r"'grad_len' must be in \[0, len=5\], got 6"):
        _C.ssd_scan_bwd(**dict(omitted, grad_len=6))
