"""KahanAccumulator refuses what it cannot accumulate up front, with errors that say what is
wrong, and takes numpy scalars as scales (issue 16, unclear errors)."""
import numpy as np
import pytest
import torch

import seqwrap

pytestmark = pytest.mark.ccore


def test_zero_size_tensor_is_refused_when_the_accumulator_is_built():
    with pytest.raises(ValueError, match=r"tensor 1 has no elements \(shape \(0, 4\)\)"):
        seqwrap.KahanAccumulator([torch.zeros(3), torch.zeros(0, 4)])
    with pytest.raises(TypeError, match=r"item 0 must be a torch.Tensor, not list"):
        seqwrap.KahanAccumulator([[1.0, 2.0]])


def test_none_gradient_is_named():
    acc = seqwrap.KahanAccumulator([torch.zeros(3), torch.zeros(2)])
    with pytest.raises(TypeError, match=r"grads\[1\] is None"):
        acc.add_([torch.ones(3), None])
    torch.testing.assert_close(acc.values()[0], torch.zeros(3))  # nothing was added
    with pytest.raises(ValueError, match="got 1 gradients for 2 accumulators"):
        acc.add_([torch.ones(3)])


@pytest.mark.parametrize("scale", [np.float32(0.5), np.float64(0.5), np.int64(2), 0.5, 2])
def test_numpy_and_python_scales(scale):
    acc = seqwrap.KahanAccumulator([torch.zeros(3)])
    acc.add_([torch.ones(3)], scale=scale)
    torch.testing.assert_close(acc.values()[0], torch.full((3,), float(scale)))
    out = [torch.zeros(3)]
    seqwrap.kahan_accumulate_(out, [torch.zeros(3)], [torch.ones(3)], scale)
    torch.testing.assert_close(out[0], torch.full((3,), float(scale)))


@pytest.mark.parametrize("scale", [True, "2", None, torch.ones(2)])
def test_bad_scales(scale):
    acc = seqwrap.KahanAccumulator([torch.zeros(3)])
    with pytest.raises(TypeError, match="'scale' must be a float"):
        acc.add_([torch.ones(3)], scale=scale)
