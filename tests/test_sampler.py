"""SpaCO's chunk sampler in the C core: the documented counter-based draw, its statistics,
CPU/GPU agreement and every bad argument."""
import math

import pytest
import torch

import seqwrap
from seqwrap.ops import reference, sample_chunks

from .conftest import requires_cuda

pytestmark = pytest.mark.ccore


@pytest.mark.parametrize("seed, step", [(12345, 7), (0, 0), (2**64 - 1, 2**63 + 5)])
def test_matches_python_reference(bridge, seed, step):
    """The draw bit for bit against seqwrap.ops.reference.sample_chunks_ref (the documented SplitMix64 keys)."""
    k = 50
    q = [0.05 + 0.9 * ((i * 37) % 50) / 50 for i in range(k)]
    w = sample_chunks(k, probs=q, seed=seed, step=step)
    assert torch.equal(w, reference.sample_chunks_ref(k, probs=q, seed=seed, step=step))
    assert 0 < int((w != 0).sum()) < k   # a real draw: some chunks kept, some not
    for cap in (None, 3.0):
        w = sample_chunks(k, sampling="fixed", budget=9, max_compensation=cap, seed=seed, step=step)
        assert torch.equal(w, reference.sample_chunks_ref(k, sampling="fixed", budget=9, max_compensation=cap,
                                                          seed=seed, step=step))


def test_reproducible_and_step_dependent():
    a = sample_chunks(64, probs=[0.5] * 64, seed=3, step=1)
    assert torch.equal(a, sample_chunks(64, probs=[0.5] * 64, seed=3, step=1))
    assert not torch.equal(a, sample_chunks(64, probs=[0.5] * 64, seed=3, step=2))
    assert not torch.equal(a, sample_chunks(64, probs=[0.5] * 64, seed=4, step=1))
    assert torch.equal(sample_chunks(5, probs=[1.0] * 5, seed=9), torch.ones(5, dtype=torch.float64))


def test_bernoulli_frequencies():
    k, q = 4000, 0.3
    kept = sum(int((sample_chunks(k, probs=[q] * k, seed=1, step=s) > 0).sum()) for s in range(5))
    n = 5 * k
    assert abs(kept - n * q) < 5 * math.sqrt(n * q * (1 - q))
    w = sample_chunks(k, probs=[q] * k, seed=1, step=0)
    assert set(w.unique().tolist()) <= {0.0, 1 / q}


def test_fixed_exact_count_and_uniform():
    k, t, steps = 16, 4, 4000
    counts = torch.zeros(k)
    for s in range(steps):
        w = sample_chunks(k, sampling="fixed", budget=t, seed=11, step=s)
        assert int((w > 0).sum()) == t
        assert set(w.unique().tolist()) == {0.0, k / t}
        counts += (w > 0).double()
    p = t / k
    z = (counts - steps * p) / math.sqrt(steps * p * (1 - p))
    assert z.abs().max() < 5
    w = sample_chunks(k, sampling="fixed", budget=t, max_compensation=2.0, seed=11)
    assert set(w.unique().tolist()) == {0.0, 2.0}


def call(weights, probs=None, seed=0, step=0, mode="bernoulli", budget=1, cap=0.0):
    seqwrap._C.sample_chunks(weights, probs, seed, step, mode, budget, cap, 0)


def expect_raises(exc, pattern, weights, **kw):
    before = weights.clone() if isinstance(weights, torch.Tensor) and not weights.requires_grad else None
    with pytest.raises(exc, match=pattern):
        call(weights, **kw)
    if before is not None:
        assert torch.equal(before, weights) or (before.isnan() & weights.isnan()).any(), "nothing may be written"


def test_bad_inputs_c(bridge):
    w = torch.full((4,), 7.0, dtype=torch.float64)
    q = torch.full((4,), 0.5, dtype=torch.float64)
    expect_raises(TypeError, r"'weights' has dtype float32; expected float64", torch.zeros(4), probs=q)
    expect_raises(ValueError, r"'weights' must be 1-D", torch.zeros(2, 2, dtype=torch.float64), probs=q)
    expect_raises(ValueError, r"'weights'.*empty", torch.zeros(0, dtype=torch.float64), probs=q[:0])
    expect_raises(ValueError, r"contiguous", torch.zeros(8, dtype=torch.float64)[::2], probs=q)
    expect_raises(ValueError, r"'probs' has shape \(3,\)", w, probs=q[:3].clone())
    expect_raises(TypeError, r"'probs' has dtype float32", w, probs=q.float())
    expect_raises(ValueError, r"needs 'probs'", w, probs=None)
    expect_raises(ValueError, r"'weights' and 'probs' overlap in memory", w, probs=w)
    for bad in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        qq = q.clone()
        qq[2] = bad
        expect_raises(ValueError, r"probability of chunk 2 is .*\(0, 1\]", w, probs=qq)
    expect_raises(ValueError, r"takes no 'probs'", w, probs=q, mode="fixed", budget=2)
    expect_raises(ValueError, r"budget must be between 1 and the number of chunks \(4\), got 0", w, mode="fixed", budget=0)
    expect_raises(ValueError, r"got 5", w, mode="fixed", budget=5)
    expect_raises(ValueError, r"max_compensation must be >= 1", w, mode="fixed", budget=2, cap=0.5)
    expect_raises(ValueError, r"max_compensation must be >= 1", w, mode="fixed", budget=2, cap=float("nan"))
    expect_raises(ValueError, r"mode must be 'bernoulli' or 'fixed', not 'uniform'", w, probs=q, mode="uniform")
    expect_raises(ValueError, r"'seed' must be in \[0, 2\*\*64\)", w, probs=q, seed=-1)
    expect_raises(ValueError, r"'step' must be in \[0, 2\*\*64\)", w, probs=q, step=1 << 64)
    expect_raises(TypeError, r"'seed' must be an int, not float", w, probs=q, seed=1.0)
    expect_raises(TypeError, r"'seed' must be an int, not bool", w, probs=q, seed=True)
    expect_raises(ValueError, r"requires grad|require.*grad", torch.zeros(4, dtype=torch.float64, requires_grad=True),
                  probs=q)
    with pytest.raises(TypeError):
        call("not a tensor", probs=q)


def test_bad_inputs_python():
    with pytest.raises(ValueError, match="num_chunks must be an int >= 1"):
        sample_chunks(0, probs=[])
    with pytest.raises(ValueError, match="probability of chunk 1 is 0.0"):
        sample_chunks(2, probs=[0.5, 0.0])
    with pytest.raises(ValueError, match=r"probs has shape \(3,\), expected \(2,\)"):
        sample_chunks(2, probs=[0.5] * 3)
    with pytest.raises(ValueError, match="budget must be an int between 1 and num_chunks"):
        sample_chunks(3, sampling="fixed", budget=4)
    with pytest.raises(ValueError, match="max_compensation applies to sampling='fixed' only"):
        sample_chunks(3, probs=[0.5] * 3, max_compensation=2)
    with pytest.raises(ValueError, match="sampling must be"):
        sample_chunks(3, sampling="topk", budget=1)
    with pytest.raises(ValueError, match="seed must be an int"):
        sample_chunks(3, probs=[0.5] * 3, seed=-5)


@requires_cuda
def test_cuda_matches_cpu():
    for k in (1, 7, 129, 1000):
        for seed in (0, 5, 2**63 + 3):
            q = torch.rand(k, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) * 0.9 + 0.05
            for step in (0, 9):
                a = sample_chunks(k, probs=q, seed=seed, step=step)
                b = sample_chunks(k, probs=q, seed=seed, step=step, device="cuda")
                assert torch.equal(a, b.cpu())
                t = max(1, k // 3)
                a = sample_chunks(k, sampling="fixed", budget=t, max_compensation=2.0, seed=seed, step=step)
                b = sample_chunks(k, sampling="fixed", budget=t, max_compensation=2.0, seed=seed, step=step,
                                  device="cuda")
                assert torch.equal(a, b.cpu())
