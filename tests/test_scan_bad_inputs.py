"""Bad arguments to the selective scan raise TypeError / ValueError naming the argument."""
import pytest
import torch

import seqwrap
from seqwrap.ops import selective_scan
from seqwrap.ops.selective_scan import _scan

from .conftest import requires_cuda
from .scan_reference import random_inputs

pytestmark = pytest.mark.ccore


def args(**over):
    u, dt, A, B, C, D, z, h0 = random_inputs(batch=2, dim=3, dstate=4, length=5, dtype=torch.float32,
                                             requires_grad=False)
    a = dict(u=u, dt=dt, A=A, B=B, C=C, D=D, z=z, h0=h0)
    a.update(over)
    return a


def test_bad_shapes(bridge):
    with pytest.raises(ValueError, match=r"'u' must have 3 dimensions"):
        selective_scan(**args(u=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match=r"'dt' must have shape \(2, 3, 5\) \(shape \(batch,dim,len\).*'dt' has shape \(2, 3, 4\)"):
        selective_scan(**args(dt=torch.ones(2, 3, 4)))
    with pytest.raises(ValueError, match=r"'A' must have shape \(dim, dstate\)"):
        selective_scan(**args(A=-torch.ones(4, 4)))
    with pytest.raises(ValueError, match=r"'B' must have shape \(2, 4, 5\) \(shape \(batch,dstate,len\).*'B' has shape \(2, 5, 5\)"):
        selective_scan(**args(B=torch.ones(2, 5, 5)))
    with pytest.raises(ValueError, match=r"'C' has shape"):
        selective_scan(**args(C=torch.ones(1, 4, 5)))
    with pytest.raises(ValueError, match=r"'D' must have shape \(3,\) \(shape \(dim\).*'D' has shape \(4,\)"):
        selective_scan(**args(D=torch.ones(4)))
    with pytest.raises(ValueError, match=r"'z' has shape"):
        selective_scan(**args(z=torch.ones(2, 3, 6)))
    with pytest.raises(ValueError, match=r"'h0' must have shape \(2, 3, 4\) \(shape \(batch,dim,dstate\).*'h0' has shape \(2, 3, 5\)"):
        selective_scan(**args(h0=torch.ones(2, 3, 5)))
    with pytest.raises(ValueError, match=r"dstate \(A.shape\[1\]\) must be between 1 and 256"):
        selective_scan(**args(A=-torch.ones(3, 300), B=torch.ones(2, 300, 5), C=torch.ones(2, 300, 5), h0=None))
    with pytest.raises(ValueError, match=r"'u' is empty"):
        selective_scan(**args(u=torch.ones(2, 3, 0), dt=torch.ones(2, 3, 0), B=torch.ones(2, 4, 0),
                              C=torch.ones(2, 4, 0), z=None))


def test_bad_dtypes(bridge):
    with pytest.raises(TypeError, match=r"'u' has dtype torch.int64"):
        selective_scan(**args(u=torch.ones(2, 3, 5, dtype=torch.int64)))
    with pytest.raises(TypeError, match=r"'dt' has dtype float64; expected float32"):
        selective_scan(**args(dt=torch.ones(2, 3, 5, dtype=torch.float64)))
    with pytest.raises(TypeError, match=r"'B' has dtype bfloat16; expected float32"):
        selective_scan(**args(B=torch.ones(2, 4, 5, dtype=torch.bfloat16)))
    with pytest.raises(TypeError, match=r"'A' has dtype torch.int32; expected a floating dtype"):
        selective_scan(**args(A=torch.ones(3, 4, dtype=torch.int32)))
    with pytest.raises(TypeError, match=r"'A' must be a tensor, not None"):
        selective_scan(**args(A=None))
    with pytest.raises(TypeError, match=r"'C' must be a torch.Tensor, not list"):
        selective_scan(**args(C=[1.0]))


def test_bad_kernel_options(bridge):
    with pytest.raises(ValueError, match=r"'block' must be an int in \[1, 1073741824\]"):
        _scan(**args(), block=0)
    y, _ = _scan(**{k: v.requires_grad_() for k, v in args().items()}, truncation=-1)
    with pytest.raises(ValueError, match=r"'trunc' must be an int in \[0, "):
        y.sum().backward()
    y, _ = _scan(**{k: v.requires_grad_() for k, v in args().items()}, grad_len=9)
    with pytest.raises(ValueError, match=r"'grad_len' must be in \[0, len=5\]"):
        y.sum().backward()


def test_raw_entry_refuses_tensors_requiring_grad(bridge):
    a = args()
    a["u"].requires_grad_()
    y = torch.empty(2, 3, 5)
    with pytest.raises(ValueError, match=r"'u' requires grad"):
        seqwrap._C.selective_scan_fwd(a["u"], a["dt"], a["A"], a["B"], a["C"], None, None, None, y,
                                      torch.empty(2, 3, 4), torch.empty(2, 3, 1, 4), 64, None, 0)
    with pytest.raises(ValueError, match=r"'ckpt' has shape \(2, 3, 2, 4\); expected"):
        seqwrap._C.selective_scan_fwd(a["u"].detach(), a["dt"], a["A"], a["B"], a["C"], None, None, None, y,
                                      torch.empty(2, 3, 4), torch.empty(2, 3, 2, 4), 64, None, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a mixed-device call")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"'B' is on cuda:0 but 'u' is on cpu"):
        selective_scan(**args(B=torch.ones(2, 4, 5, device="cuda")))


@requires_cuda
def test_cuda_matches_cpu():
    x = random_inputs(batch=2, dim=5, dstate=4, length=70, seed=2)
    xc = [t.detach().cuda().requires_grad_() for t in x]
    y, h = _scan(*x, block=16)
    yc, hc = _scan(*xc, block=16)
    assert torch.allclose(yc.cpu(), y) and torch.allclose(hc.cpu(), h)
    g = torch.autograd.grad((y.sum() + h.sum()), x)
    gc = torch.autograd.grad((yc.sum() + hc.sum()), xc)
    for a, b in zip(g, gc):
        assert torch.allclose(a, b.cpu(), rtol=1e-10, atol=1e-12)
