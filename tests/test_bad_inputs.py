"""Every bad argument raises TypeError/ValueError naming the argument; nothing is written."""
import pytest
import torch

import seqwrap

from .conftest import requires_cuda

pytestmark = pytest.mark.ccore


def good(n=4, k=3):
    return ([torch.zeros(k) for _ in range(n)], [torch.zeros(k) for _ in range(n)],
            [torch.ones(k) for _ in range(n)])


def call(accs, comps, grads, scale=1.0):
    seqwrap.kahan_accumulate_(accs, comps, grads, scale)


def expect(exc, pattern, accs, comps, grads, scale=1.0):
    before = [a.clone() for a in accs if isinstance(a, torch.Tensor) and not a.is_meta]
    with pytest.raises(exc, match=pattern):
        call(accs, comps, grads, scale)
    after = [a for a in accs if isinstance(a, torch.Tensor) and not a.is_meta]
    for b, a in zip(before, after):
        assert torch.equal(b, a), "a rejected call must not write anything"


def test_wrong_dtypes(bridge):
    a, c, g = good()
    a[1] = torch.zeros(3, dtype=torch.float64)
    expect(TypeError, r"'accs\[1\]' has dtype float64; expected float32", a, c, g)
    a, c, g = good()
    c[2] = torch.zeros(3, dtype=torch.bfloat16)
    expect(TypeError, r"'comps\[2\]' has dtype bfloat16", a, c, g)
    a, c, g = good()
    g[3] = torch.ones(3, dtype=torch.int64)
    expect(TypeError, r"'grads\[3\]' has dtype int64; expected float32, float16, bfloat16", a, c, g)
    a, c, g = good()
    g[0] = torch.ones(3, dtype=torch.complex64)
    expect(TypeError, r"'grads\[0\]' has an unsupported dtype", a, c, g)
    a, c, g = good()
    g[0] = torch.ones(3, dtype=torch.bool)
    expect(TypeError, r"'grads\[0\]' has an unsupported dtype", a, c, g)


def test_shape_mismatch(bridge):
    a, c, g = good()
    g[1] = torch.ones(4)
    expect(ValueError, r"'grads\[1\]' has shape \(4,\) but 'accs\[1\]' has shape \(3,\)", a, c, g)
    a, c, g = good()
    c[0] = torch.zeros(1, 3)
    expect(ValueError, r"'comps\[0\]' has shape \(1, 3\)", a, c, g)


def test_non_contiguous(bridge):
    a, c, g = good()
    a[2] = torch.zeros(3, 2).t()
    c[2], g[2] = torch.zeros(2, 3), torch.ones(2, 3)
    expect(ValueError, r"'accs\[2\]' is not contiguous", a, c, g)
    a, c, g = good()
    g[0] = torch.ones(6)[::2]
    expect(ValueError, r"'grads\[0\]' is not contiguous", a, c, g)
    a, c, g = good()
    g[0] = torch.ones(1).expand(3)
    expect(ValueError, r"'grads\[0\]' is not contiguous", a, c, g)


def test_requires_grad(bridge):
    a, c, g = good()
    a[0] = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"'accs\[0\]' requires grad"):
        call(a, c, g)
    a, c, g = good()
    g[1] = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"'grads\[1\]' requires grad"):
        seqwrap._C.kahan_accumulate(a, c, g, 1.0, 0)


def test_not_tensors(bridge):
    a, c, g = good()
    g[2] = [1.0, 2.0, 3.0]
    expect(TypeError, r"'grads\[2\]' must be a torch.Tensor, not list", a, c, g)
    a, c, g = good()
    c[0] = None
    expect(TypeError, r"'comps\[0\]' must be a torch.Tensor, not NoneType", a, c, g)
    a, c, g = good()
    with pytest.raises(TypeError, match="'grads' must be a list or tuple of tensors, not Tensor"):
        seqwrap._C.kahan_accumulate(a, c, torch.ones(4, 3), 1.0, 0)
    with pytest.raises(TypeError, match="'scale' must be a float"):
        call(a, c, g, scale="2")
    with pytest.raises(TypeError):
        seqwrap._C.kahan_accumulate(a, c, g, 1.0)  # missing stream


def test_empty(bridge):
    a, c, g = good()
    a[1], c[1], g[1] = torch.zeros(0), torch.zeros(0), torch.ones(0)
    expect(ValueError, r"'accs\[1\]' is empty", a, c, g)
    with pytest.raises(ValueError, match="'accs' is empty"):
        seqwrap._C.kahan_accumulate([], [], [], 1.0, 0)


def test_length_mismatch(bridge):
    a, c, g = good()
    expect(ValueError, "must have the same length", a, c[:3], g)


def test_overlapping_outputs(bridge):
    a, c, g = good()
    c[1] = a[1]
    expect(ValueError, r"overlap in memory", a, c, g)
    a, c, g = good()
    a[3] = a[0]
    expect(ValueError, r"overlap in memory", a, c, g)
    big = torch.zeros(10)
    a, c, g = good(2, 5)
    a[0], a[1] = big[0:5], big[4:9]
    expect(ValueError, r"overlap in memory", a, c, g)


def test_unsupported_tensors(bridge):
    a, c, g = good()
    g[0] = torch.ones(3, device="meta")
    expect(ValueError, r"'grads\[0\]' cannot be exported through DLPack", a, c, g)
    a, c, g = good()
    g[0] = torch.ones(3).to_sparse()
    expect(ValueError, r"'grads\[0\]' cannot be exported through DLPack", a, c, g)
    a, c, g = good()
    g[0] = torch.ones(3)._neg_view()
    expect(ValueError, r"'grads\[0\]' is a lazily negated view", a, c, g)
    a, c, g = good(1, 1)
    a[0], c[0], g[0] = (torch.zeros((1,) * 9) for _ in range(3))
    expect(ValueError, r"'accs\[0\]' has 9 dimensions; at most 8", a, c, g)


def test_bridge_mode_validation():
    with pytest.raises(ValueError, match="'auto' or 'capsule'"):
        seqwrap._C._set_bridge_mode("turbo")
    with pytest.raises(TypeError):
        seqwrap._C._set_bridge_mode(3)


@requires_cuda
def test_device_mismatch():
    a, c, g = good()
    g[1] = g[1].cuda()
    expect(ValueError, r"'grads\[1\]' is on cuda:0 but 'accs\[1\]' is on cpu", a, c, g)
    a, c, g = good()
    a = [x.cuda() for x in a]
    c = [x.cuda() for x in c]
    g = [x.cuda() for x in g]
    a[2] = a[2].cpu()
    with pytest.raises(ValueError, match=r"'accs\[2\]' is on cpu:0 but 'accs\[0\]' is on cuda:0"):
        call(a, c, g)
