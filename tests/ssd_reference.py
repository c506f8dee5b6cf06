"""Random test inputs for the Mamba-2 (SSD) scan. Its float64 reference is seqwrap.ops.reference.ssd_scan_ref,
called here under its old name, with the op's output dtypes, for the tests that import it from here."""
import torch
import torch.nn.functional as F

from seqwrap.ops.dtypes import real_dtype
from seqwrap.ops.reference import ssd_scan_ref


def ssd_ref(x, *args, **kwargs):
    """seqwrap.ops.reference.ssd_scan_ref (float64), its outputs cast to the dtypes the op returns: y in x's
    dtype, the state in the compute dtype (float32 for half inputs)."""
    y, state = ssd_scan_ref(x, *args, **kwargs)
    return y.to(x.dtype), state.to(real_dtype(x.dtype))


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
