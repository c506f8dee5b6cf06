"""Sequential PyTorch reference of the Mamba-2 (SSD) scan (float64-capable), for the tests."""
import torch
import torch.nn.functional as F


def ssd_ref(x, dt, A, B, C, D=None, z=None, h0=None):
    """(y, final state); same maths and shapes as seqwrap.ops.ssd_scan, y in x's dtype (float32
    state for half inputs). x (b, L, H, P), dt (b, L, H), A (H,), B/C (b, L, G, N)."""
    comp = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_, dt_, A_ = x.to(comp), dt.to(comp), A.to(comp)
    batch, length, heads, headdim = x.shape
    rep = heads // B.shape[2]
    B_ = B.to(comp).repeat_interleave(rep, dim=2)                          # (b, L, H, N)
    C_ = C.to(comp).repeat_interleave(rep, dim=2)
    s = h0.to(comp) if h0 is not None else x_.new_zeros(batch, heads, headdim, B.shape[3])
    ys = []
    for t in range(length):
        a = torch.exp(dt_[:, t] * A_)                                       # (b, H)
        s = a[..., None, None] * s + (dt_[:, t, :, None] * x_[:, t])[..., None] * B_[:, t, :, None, :]
        ys.append((s * C_[:, t, :, None, :]).sum(-1))                       # (b, H, P)
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D.to(comp)[:, None] * x_
    if z is not None:
        y = y * F.silu(z.to(comp))
    return y.to(x.dtype), s


def random_ssd_inputs(batch=2, length=11, heads=4, headdim=3, groups=2, dstate=5, dtype=torch.float64, seed=0,
                      requires_grad=True):
    """[x, dt, A, B, C, D, z, h0]: x, dt, B, C, z in `dtype`, A, D, h0 in the compute dtype."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(batch, length, heads, headdim)
    dt = F.softplus(r(batch, length, heads) - 1.0)
    A = -torch.exp(r(heads) * 0.5)
    B = r(batch, length, groups, dstate)
    C = r(batch, length, groups, dstate)
    D = r(heads)
    z = r(batch, length, heads, headdim)
    h0 = r(batch, heads, headdim, dstate)
    out = [x, dt, A, B, C, D, z, h0]
    io = [0, 1, 3, 4, 6]
    out = [t.to(dtype) if (i in io or dtype == torch.float64) else t.float() for i, t in enumerate(out)]
    return [t.requires_grad_(requires_grad) for t in out]
