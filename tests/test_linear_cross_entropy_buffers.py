"""The forward-formed gradient buffers of linear_cross_entropy ("mean"/"sum"): scaled in place and handed
on when the backward is their last reader (no second gradient-sized copy), left intact when a later
backward reads them again (retain_graph, create_graph, gradcheck)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import seqwrap
from seqwrap.ops.reference import linear_cross_entropy_ref

pytestmark = pytest.mark.ccore


def _inputs(n=13, H=6, V=11):
    hidden = torch.randn(n, H, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, dtype=torch.float64) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (n,))
    labels[::3] = -100
    return hidden, weight, labels


def _ref_grads(hidden, weight, labels, reduction, scale=1.0):
    ref, _ = linear_cross_entropy_ref(hidden, weight, labels, reduction=reduction)
    return torch.autograd.grad(ref * scale, (hidden, weight))


class _OutOfPlaceMuls(TorchDispatchMode):
    """Records the shapes of out-of-place multiplications (a gradient-sized copy when scaling)."""
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_backward_makes_no_gradient_copy(reduction):
    hidden, weight, labels = _inputs()
    loss = seqwrap.linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=4)
    mode = _OutOfPlaceMuls()
    with mode:
        (loss * 2.5).backward()
    assert tuple(weight.shape) not in mode.shapes and tuple(hidden.shape) not in mode.shapes, mode.shapes
    want = _ref_grads(hidden, weight, labels, reduction, 2.5)
    torch.testing.assert_close(hidden.grad, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, want[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_retain_graph_second_backward_sees_intact_buffers(reduction):
    hidden, weight, labels = _inputs()
    loss = seqwrap.linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=4)
    want = _ref_grads(hidden, weight, labels, reduction, 3.0)
    (loss * 3.0).backward(retain_graph=True)
    torch.testing.assert_close(weight.grad, want[1], rtol=1e-12, atol=1e-12)
    # in-place work on .grad (zero_grad without set_to_none, an accumulation) must not reach the buffers
    weight.grad.zero_()
    hidden.grad.zero_()
    (loss * 3.0).backward(retain_graph=True)
    torch.testing.assert_close(weight.grad, want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, want[0], rtol=1e-12, atol=1e-12)
    (loss * 3.0).backward()  # the last one may consume them; accumulates into .grad
    torch.testing.assert_close(weight.grad, 2 * want[1], rtol=1e-12, atol=1e-12)


def test_autograd_grad_twice_and_create_graph():
    hidden, weight, labels = _inputs()
    loss = seqwrap.linear_cross_entropy(hidden, weight, labels, chunk_size=5)
    want = _ref_grads(hidden, weight, labels, "mean", 0.5)
    for _ in range(2):
        got = torch.autograd.grad(loss * 0.5, (hidden, weight), retain_graph=True)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss * 0.5, (hidden, weight), create_graph=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss * 0.5, (hidden, weight))
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)


def test_gradcheck_sum_and_mean_unmutated():
    hidden, weight, labels = _inputs(5, 3, 4)
    for red in ("mean", "sum"):
        f = lambda h, w: seqwrap.linear_cross_entropy(h, w, labels, reduction=red, chunk_size=2)  # noqa: E731
        assert torch.autograd.gradcheck(f, (hidden, weight))
