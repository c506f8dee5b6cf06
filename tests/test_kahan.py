"""Compensated scaled accumulation: exact arithmetic and measured precision gain."""
import pytest
import torch

import seqwrap
from seqwrap.ops import reference

from .conftest import requires_cuda

pytestmark = pytest.mark.ccore

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def kahan_reference(acc, comp, g, scale):
    """The same float32 steps in torch ops, one rounding per op (what the kernel must do bit for bit)."""
    s = torch.tensor(scale, dtype=torch.float32)
    y = s * g.float() - comp
    t = acc + y
    comp.copy_((t - acc) - y)
    acc.copy_(t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float32_reference_bit_for_bit(bridge, dtype):
    shapes = [(7,), (3, 5), (2, 1, 4), (), (40000,)]  # the last one takes the OpenMP path
    accs = [torch.randn(s) for s in shapes]
    comps = [torch.zeros(s) for s in shapes]
    ref_accs = [a.clone() for a in accs]
    ref_comps = [c.clone() for c in comps]
    for step in range(5):
        grads = [torch.randn(s).to(dtype) for s in shapes]
        scale = float(torch.rand(()) * 3 - 1)
        seqwrap.kahan_accumulate_(accs, comps, grads, scale)
        for a, c, g in zip(ref_accs, ref_comps, grads):
            kahan_reference(a, c, g, scale)
    for a, r, c, rc in zip(accs, ref_accs, comps, ref_comps):
        assert torch.equal(a, r)
        assert torch.equal(c, rc)


@pytest.mark.parametrize("dtype", DTYPES)
def test_close_to_float64_sum(dtype):
    n = 1000
    grads = [torch.randn(257).to(dtype) for _ in range(n)]
    acc = torch.zeros(257)
    comp = torch.zeros(257)
    exact = [acc.double()]
    for g in grads:
        seqwrap.kahan_accumulate_([acc], [comp], [g], 0.1)
        exact = reference.kahan_accumulate_ref(exact, [g], 0.1)
    exact = exact[0]
    # Kahan keeps the error of the float32 sum within a couple of float32 ulps of the exact sum.
    bound = 4 * torch.finfo(torch.float32).eps * exact.abs() + 1e-30 + 4 * torch.finfo(torch.float32).eps * grads[0].abs().double().max()
    assert ((acc.double() - exact).abs() <= bound).all()


def mean_ulp_error(x, exact):
    """Mean |x - exact| in units of the float32 spacing at exact (0.5 is the best float32 can do on average: 0.25)."""
    ulp = torch.nextafter(exact.float().abs(), torch.tensor(float("inf"))).double() - exact.float().abs().double()
    return ((x.double() - exact).abs() / ulp).mean().item()


def precision_experiment(n=4096, steps=2000, base_scale=100.0, grad_scale=1e-4):
    """Adds `steps` small random gradients onto a large float32 sum three ways; errors in float32 ulps."""
    base = torch.randn(n) * base_scale
    grads = [torch.randn(n) * grad_scale for _ in range(steps)]
    exact = base.double() + torch.stack(grads).double().sum(0)
    plain32 = base.clone()
    plain16 = base.to(torch.bfloat16)
    acc, comp = base.clone(), torch.zeros(n)
    for g in grads:
        plain32 += g
        plain16 += g.to(torch.bfloat16)
        seqwrap.kahan_accumulate_([acc], [comp], [g], 1.0)
    return {"kahan": mean_ulp_error(acc, exact), "float32": mean_ulp_error(plain32, exact),
            "bfloat16": mean_ulp_error(plain16, exact)}


def test_precision_gain_over_plain_accumulation():
    """Many small addends onto a large sum: plain float32 and bf16 lose their low bits, Kahan keeps them."""
    err = precision_experiment()
    print("mean error in float32 ulps:", {k: f"{v:.3g}" for k, v in err.items()})
    assert err["kahan"] <= 0.5, "Kahan should be within rounding of the exact sum"
    assert err["float32"] > 5 * err["kahan"]
    assert err["bfloat16"] > err["float32"]


def test_accumulator_class():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    acc = seqwrap.KahanAccumulator(params)
    g1 = [torch.randn_like(p) for p in params]
    g2 = [torch.randn_like(p).bfloat16() for p in params]
    acc.add_(g1, scale=0.5).add_(g2, scale=2.0)
    for v, a, b in zip(acc.values(), g1, g2):
        torch.testing.assert_close(v, 0.5 * a + 2.0 * b.float(), rtol=1e-6, atol=1e-6)
    acc.zero_()
    assert all((v == 0).all() for v in acc.values())
    with pytest.raises(ValueError, match="at least one tensor"):
        seqwrap.KahanAccumulator([])


def test_many_tensors_in_one_call(bridge):
    shapes = [(i % 7 + 1, 3) for i in range(100)]  # more than one CUDA batch (32 jobs) worth
    accs = [torch.zeros(s) for s in shapes]
    comps = [torch.zeros(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    seqwrap.kahan_accumulate_(accs, comps, grads, 1.5)
    for a, g in zip(accs, grads):
        assert torch.equal(a, torch.tensor(1.5) * g)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_bit_for_bit(dtype):
    shapes = [(1000,), (3, 333), (1,), (300000,)] * 10  # 40 jobs: two launches
    cpu_acc = [torch.randn(s) for s in shapes]
    cpu_comp = [torch.randn(s) * 1e-8 for s in shapes]
    gpu_acc = [a.cuda() for a in cpu_acc]
    gpu_comp = [c.cuda() for c in cpu_comp]
    for _ in range(3):
        grads = [torch.randn(s).to(dtype) for s in shapes]
        seqwrap.kahan_accumulate_(cpu_acc, cpu_comp, grads, 0.3)
        seqwrap.kahan_accumulate_(gpu_acc, gpu_comp, [g.cuda() for g in grads], 0.3)
    torch.cuda.synchronize()
    for a, b, c, d in zip(cpu_acc, gpu_acc, cpu_comp, gpu_comp):
        assert torch.equal(a, b.cpu())
        assert torch.equal(c, d.cpu())
