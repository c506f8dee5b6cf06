"""Sequential PyTorch reference of the selective scan (float64-capable), for the tests."""
import torch
import torch.nn.functional as F


def scan_ref(u, dt, A, B, C, D=None, z=None, h0=None):
    """Returns (y, h_last); same maths and shapes as seqwrap.ops.selective_scan, in u's dtype
    (float32 state for half inputs)."""
    comp = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_, dt_, B_, C_ = u.to(comp), dt.to(comp), B.to(comp), C.to(comp)
    A_ = A.to(comp)
    batch, dim, length = u.shape
    h = h0.to(comp) if h0 is not None else u_.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        a = torch.exp(dt_[:, :, t, None] * A_)                              # (batch, dim, dstate)
        h = a * h + dt_[:, :, t, None] * B_[:, None, :, t] * u_[:, :, t, None]
        ys.append((h * C_[:, None, :, t]).sum(-1))                          # (batch, dim)
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.to(comp)[None, :, None] * u_
    if z is not None:
        y = y * F.silu(z.to(comp))
    return y.to(u.dtype), h


def random_inputs(batch=2, dim=3, dstate=4, length=11, dtype=torch.float64, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = r(batch, dim, length)
    dt = F.softplus(r(batch, dim, length) - 1.0)
    A = -torch.exp(r(dim, dstate) * 0.5)
    B = r(batch, dstate, length)
    C = r(batch, dstate, length)
    D = r(dim)
    z = r(batch, dim, length)
    h0 = r(batch, dim, dstate)
    out = [u, dt, A, B, C, D, z, h0]
    io = [0, 1, 3, 4, 6]
    out = [t.to(dtype) if (i in io or dtype == torch.float64) else t.float() for i, t in enumerate(out)]
    return [t.requires_grad_(requires_grad) for t in out]
