"""Random test inputs for the selective scan. Its float64 reference is seqwrap.ops.reference.selective_scan_ref,
called here under its old name, with the op's output dtypes, for the tests that import it from here."""
import torch
import torch.nn.functional as F

from seqwrap.ops.dtypes import real_dtype
from seqwrap.ops.reference import selective_scan_ref


def scan_ref(u, *args, **kwargs):
    """seqwrap.ops.reference.selective_scan_ref (float64), its outputs cast to the dtypes the op returns: y in u's
    dtype, the state in the compute dtype (float32 for half inputs)."""
    y, state = selective_scan_ref(u, *args, **kwargs)
    return y.to(u.dtype), state.to(real_dtype(u.dtype))


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
