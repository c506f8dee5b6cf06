"""Bad arguments to the SSD scan raise TypeError / ValueError naming the argument; outputs that alias
inputs or each other are refused."""
import pytest
import torch

import seqwrap
from seqwrap.ops import ssd_scan

from .ssd_reference import random_ssd_inputs

pytestmark = pytest.mark.ccore

# batch 2, len 5, heads 4, headdim 3, groups 2, dstate 6
SIZES = dict(batch=2, length=5, heads=4, headdim=3, groups=2, dstate=6)


def args(**over):
    x, dt, A, B, C, D, z, h0 = random_ssd_inputs(**SIZES, dtype=torch.float32, requires_grad=False)
    a = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, h0=h0)
    a.update(over)
    return a


def test_bad_shapes(bridge):
    with pytest.raises(ValueError, match=r"'x' must have 4 dimensions \(batch, len, heads, headdim\); got 3"):
        ssd_scan(**args(x=torch.zeros(2, 5, 4)))
    with pytest.raises(ValueError, match=r"'dt' must have shape \(2, 5, 4\) \(shape \(batch,len,heads\).*'dt' has shape \(2, 5, 3\)"):
        ssd_scan(**args(dt=torch.ones(2, 5, 3)))
    with pytest.raises(ValueError, match=r"'A' must have shape \(4,\) \(shape \(heads\).*'A' has shape \(3,\)"):
        ssd_scan(**args(A=-torch.ones(3)))
    with pytest.raises(ValueError, match=r"'B' must have shape \(2, 5, 2, 6\) \(shape \(batch,len,groups,dstate\)"):
        ssd_scan(**args(B=torch.ones(2, 4, 2, 6)))
    with pytest.raises(ValueError, match=r"groups \(B.shape\[2\] = 3\) must divide heads \(x.shape\[2\] = 4\)"):
        ssd_scan(**args(B=torch.ones(2, 5, 3, 6), C=torch.ones(2, 5, 3, 6)))
    with pytest.raises(ValueError, match=r"'C' must have shape \(2, 5, 2, 6\) \(shape \(batch,len,groups,dstate\).*'C' has shape \(2, 5, 2, 5\)"):
        ssd_scan(**args(C=torch.ones(2, 5, 2, 5)))
    with pytest.raises(ValueError, match=r"'D' must have shape \(4,\) \(shape \(heads\).*'D' has shape \(3,\)"):
        ssd_scan(**args(D=torch.ones(3)))
    with pytest.raises(ValueError, match=r"'z' has shape"):
        ssd_scan(**args(z=torch.ones(2, 5, 4, 2)))
    with pytest.raises(ValueError, match=r"'h0' must have shape \(2, 4, 3, 6\) \(shape \(batch,heads,headdim,dstate\).*'h0' has shape \(2, 4, 3, 5\)"):
        ssd_scan(**args(h0=torch.ones(2, 4, 3, 5)))
    with pytest.raises(ValueError, match=r"dstate \(B.shape\[3\]\) must be between 1 and 256, got 300"):
        ssd_scan(**args(B=torch.ones(2, 5, 2, 300), C=torch.ones(2, 5, 2, 300), h0=None))
    with pytest.raises(ValueError, match=r"'x' is empty"):
        ssd_scan(**args(x=torch.ones(2, 0, 4, 3), dt=torch.ones(2, 0, 4), B=torch.ones(2, 0, 2, 6),
                        C=torch.ones(2, 0, 2, 6), z=None))


def test_bad_dtypes(bridge):
    with pytest.raises(TypeError, match=r"'x' has dtype torch.int64"):
        ssd_scan(**args(x=torch.ones(2, 5, 4, 3, dtype=torch.int64)))
    with pytest.raises(TypeError, match=r"'dt' has dtype float64; expected float32"):
        ssd_scan(**args(dt=torch.ones(2, 5, 4, dtype=torch.float64)))
    with pytest.raises(TypeError, match=r"'B' has dtype bfloat16; expected float32"):
        ssd_scan(**args(B=torch.ones(2, 5, 2, 6, dtype=torch.bfloat16)))
    with pytest.raises(TypeError, match=r"'A' has dtype torch.int32; expected a floating dtype"):
        ssd_scan(**args(A=torch.ones(4, dtype=torch.int32)))
    with pytest.raises(TypeError, match=r"'A' must be a tensor, not None"):
        ssd_scan(**args(A=None))
    with pytest.raises(TypeError, match=r"'C' must be a torch.Tensor, not list"):
        ssd_scan(**args(C=[1.0]))
    with pytest.raises(TypeError, match=r"'B' must be a tensor, not None"):
        ssd_scan(**args(B=None))


def test_bad_block(bridge):
    with pytest.raises(ValueError, match=r"'block' must be an int in \[1, 1073741824\], got 0"):
        ssd_scan(**args(), block=0)
    with pytest.raises(TypeError, match=r"'block' must be an int"):
        ssd_scan(**args(), block=2.0)


def raw_fwd(a, y=None, hlast=None, ckpt=None, block=64, work=None, h0="keep"):
    y = torch.empty(2, 5, 4, 3) if y is None else y
    hlast = torch.empty(2, 4, 3, 6) if hlast is None else hlast
    ckpt = torch.empty(2, 4, 3, 1, 6) if ckpt is None else ckpt
    h0 = a["h0"] if isinstance(h0, str) else h0
    seqwrap._C.ssd_scan_fwd(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], h0, y, hlast, ckpt, block,
                            work, 0)
    return y, hlast


def test_raw_entry_checks(bridge):
    a = args()
    raw_fwd(a)  # well-formed: runs
    b = args()
    b["x"].requires_grad_()
    with pytest.raises(ValueError, match=r"'x' requires grad"):
        raw_fwd(b)
    with pytest.raises(ValueError, match=r"'ckpt' has shape \(2, 4, 3, 2, 6\); expected"):
        raw_fwd(a, ckpt=torch.empty(2, 4, 3, 2, 6))
    with pytest.raises(TypeError, match=r"'y' has dtype float64; expected float32"):
        raw_fwd(a, y=torch.empty(2, 5, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'work' must be None for CPU tensors"):
        raw_fwd(a, work=torch.empty(10))
    with pytest.raises(ValueError, match=r"'hlast' is not contiguous|'hlast' must be contiguous"):
        raw_fwd(a, hlast=torch.empty(2, 4, 6, 3).transpose(2, 3))
    with pytest.raises(TypeError, match=r"'y' must be a tensor, not None|'y'"):
        seqwrap._C.ssd_scan_fwd(a["x"], a["dt"], a["A"], a["B"], a["C"], None, None, None, None,
                                torch.empty(2, 4, 3, 6), torch.empty(2, 4, 3, 1, 6), 64, None, 0)


def test_outputs_aliasing_inputs_are_refused(bridge):
    a = args()
    with pytest.raises(ValueError, match=r"'y' shares memory with argument 'x'|'x' and 'y' overlap in memory"):
        raw_fwd(a, y=a["x"])
    with pytest.raises(ValueError, match=r"'hlast' shares memory with argument 'h0'|'h0' and 'hlast' overlap in memory"):
        raw_fwd(a, hlast=a["h0"])
    buf = torch.empty(2 * 4 * 3 * 6 * 2)
    with pytest.raises(ValueError, match=r"'ckpt' shares memory with argument 'hlast'|'hlast' and 'ckpt' overlap in memory"):
        raw_fwd(a, hlast=buf[:144].view(2, 4, 3, 6), ckpt=buf[100:244].view(2, 4, 3, 1, 6))
    # inputs may share memory with each other (B and C as views of one projection, as in HF)
    proj = torch.randn(2, 5, 2, 12)
    b = args(B=proj[..., :6].contiguous(), C=proj[..., 6:].contiguous())
    raw_fwd(b)


def test_backward_outputs_checked(bridge):
    a = args()
    ckpt = torch.empty(2, 4, 3, 3, 6)
    y, _ = raw_fwd(a, ckpt=ckpt, block=2)
    new = lambda *s: torch.zeros(*s)  # noqa: E731
    outs = dict(dx=new(2, 5, 4, 3), ddt=new(2, 5, 4), dz=new(2, 5, 4, 3), dB=new(2, 5, 2, 6), dC=new(2, 5, 2, 6),
                dA=new(2, 4, 3), dD=new(2, 4, 3), dh0=new(2, 4, 3, 6))

    def call(**over):
        o = dict(outs, **over)
        seqwrap._C.ssd_scan_bwd(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], ckpt, torch.ones_like(y),
                                None, o["dx"], o["ddt"], o["dz"], o["dB"], o["dC"], o["dA"], o["dD"], o["dh0"], 2, None,
                                0)

    call()
    with pytest.raises(ValueError, match=r"'dz' must be given exactly when 'z' is"):
        call(dz=None)
    with pytest.raises(ValueError, match=r"'dB' shares memory with argument 'dx'|'dx' and 'dB' overlap in memory"):
        call(dB=outs["dx"].view(-1)[:120].view(2, 5, 2, 6))
    with pytest.raises(ValueError, match=r"'dC' must have shape \(2, 5, 2, 6\) .*'dC' has shape \(2, 5, 1, 6\)"):
        call(dC=new(2, 5, 1, 6))
    with pytest.raises(ValueError, match=r"'dh0' shares memory with argument 'ckpt'|'ckpt' and 'dh0' overlap in memory"):
        call(dh0=ckpt.view(-1)[:144].view(2, 4, 3, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a mixed-device call")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"'B' is on cuda:0 but 'x' is on cpu"):
        ssd_scan(**args(B=torch.ones(2, 5, 2, 6, device="cuda")))

