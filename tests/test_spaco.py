"""SpaCO: rate 1 is SeCO; bernoulli is unbiased (exactly, and statistically over seeds);
fixed sampling with a cap is biased exactly as theory predicts."""
import itertools
import math

import pytest
import torch

import seqwrap
from seqwrap.engines import proportional_to_labels

from .hf_tiny import VOCAB, max_rel_err, reference, tiny_model

T, CHUNK = 16, 4  # 4 chunks


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny steps: threads only add overhead (and the CI machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def data(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, T), generator=g)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def run_with(model, ids, weights, exact_loss=True):
    """One SpaCO step with a forced selection/weights; returns the flat gradient."""
    engine = seqwrap.SpaCO(model, chunk_size=CHUNK, rate=1.0, seed=0, exact_loss=exact_loss)
    engine.chunk_weights = lambda counts: list(weights)
    model.zero_grad(set_to_none=True)
    out = engine(ids)
    g = flat_grad(model) if any(p.grad is not None for p in model.parameters()) else None
    model.zero_grad(set_to_none=True)
    return out, g


def test_rate_one_equals_seco_exactly():
    model = tiny_model("qwen2")
    ids = data()
    seqwrap.SeCO(model, chunk_size=5)(ids)
    seco = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = seqwrap.SpaCO(model, chunk_size=5, rate=1.0, seed=3)(ids)
    assert out.backward_chunks == out.num_chunks == 4
    assert all(torch.equal(p.grad, seco[n]) for n, p in model.named_parameters())


def test_bernoulli_exact_expectation_by_enumeration():
    # E[estimate] = sum over the 2^k selections S of P(S) * g(S, weights 1/q): must be the exact gradient.
    model = tiny_model("llama", layers=2, pure64=True)
    ids = data()
    loss, grads = reference(model, ids)
    exact = torch.cat([grads[n].reshape(-1) for n, _ in model.named_parameters()])
    q = [0.3, 0.9, 0.5, 0.7]
    mean = torch.zeros_like(exact)
    for keep in itertools.product([0, 1], repeat=4):
        prob = math.prod(qi if k else 1 - qi for qi, k in zip(q, keep))
        out, g = run_with(model, ids, [1 / qi if k else 0.0 for qi, k in zip(q, keep)])
        assert abs(out.loss.item() - loss.item()) <= 1e-12 * loss.item()  # the loss is always exact
        assert out.backward_chunks == sum(keep)
        if g is not None:
            mean += prob * g
    assert ((mean - exact).norm() / exact.norm()).item() <= 1e-10
    # exact_loss=False: the reported loss is the unbiased estimate, the gradient is unchanged
    mean_loss = 0.0
    for keep in itertools.product([0, 1], repeat=4):
        prob = math.prod(qi if k else 1 - qi for qi, k in zip(q, keep))
        w = [1 / qi if k else 0.0 for qi, k in zip(q, keep)]
        out, g = run_with(model, ids, w, exact_loss=False)
        _, g_exact_loss = run_with(model, ids, w)
        assert (g is None and g_exact_loss is None) or torch.equal(g, g_exact_loss)
        mean_loss += prob * out.loss.item()
    assert abs(mean_loss - loss.item()) <= 1e-12 * loss.item()


def test_bernoulli_unbiased_over_seeds_z_test():
    """Mean of per-seed estimates vs the exact gradient, bound from the sample variance."""
    model = tiny_model("llama", layers=2, pure64=True)
    ids = data()
    _, grads = reference(model, ids)
    exact = torch.cat([grads[n].reshape(-1) for n, _ in model.named_parameters()])
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(4, exact.numel(), generator=gen, dtype=torch.float64)
    dirs = torch.cat([dirs, exact[None] / exact.norm()])  # 4 random directions + the gradient's own
    q = [0.4, 0.8, 0.6, 0.5]
    n = 200
    proj = torch.empty(n, dirs.shape[0], dtype=torch.float64)
    engine = seqwrap.SpaCO(model, chunk_size=CHUNK, rate=q, seed=1234)
    backward = 0
    for s in range(n):
        model.zero_grad(set_to_none=True)
        out = engine(ids)
        backward += out.backward_chunks
        g = flat_grad(model) if out.backward_chunks else torch.zeros_like(exact)
        proj[s] = dirs @ g
    target = dirs @ exact
    z = (proj.mean(0) - target) / (proj.std(0) / math.sqrt(n))
    assert z.abs().max().item() < 4.5, f"z-scores {z.tolist()}"
    assert abs(backward / n - sum(q)) < 5 * math.sqrt(sum(qi * (1 - qi) for qi in q) / n)
    # the same test rejects the uncompensated estimator (weights 1 instead of 1/q): it has power
    engine.chunk_weights = lambda counts, e=engine: [1.0 if w > 0 else 0.0 for w in SpaCO_weights(e, counts)]
    for s in range(n):
        model.zero_grad(set_to_none=True)
        out = engine(ids)
        g = flat_grad(model) if out.backward_chunks else torch.zeros_like(exact)
        proj[s] = dirs @ g
    z = (proj.mean(0) - target) / (proj.std(0) / math.sqrt(n))
    assert z.abs().max().item() > 10


def SpaCO_weights(engine, counts):
    return seqwrap.SpaCO.chunk_weights(engine, counts)


def test_fixed_with_cap_biased_as_theory_says():
    """One layer: the exact gradient is L + X, L = own-chunk terms, X = terms through one
    earlier chunk's K/V (two-chunk paths). Fixed sampling, t of k, factor c = min(k/t, cap):
    E = c t/k L + c^2 t(t-1)/(k(k-1)) X, computed exactly by enumerating the C(k, t) subsets."""
    model = tiny_model("llama", layers=1, pure64=True)
    ids = data()
    _, grads = reference(model, ids)
    exact = torch.cat([grads[n].reshape(-1) for n, _ in model.named_parameters()])
    k = 4
    own = torch.zeros_like(exact)
    for i in range(k):
        _, g = run_with(model, ids, [1.0 if j == i else 0.0 for j in range(k)])
        own += g
    cross = exact - own
    assert cross.norm() > 0.01 * exact.norm()
    for t, cap in ((2, None), (2, 1.5), (3, 1.2), (1, 2.0)):
        c = min(k / t, cap or float("inf"))
        mean = torch.zeros_like(exact)
        subsets = list(itertools.combinations(range(k), t))
        for sub in subsets:
            _, g = run_with(model, ids, [c if j in sub else 0.0 for j in range(k)])
            mean += g / len(subsets)
        theory = c * t / k * own + c * c * t * (t - 1) / (k * (k - 1)) * cross
        assert ((mean - theory).norm() / theory.norm()).item() <= 1e-10
        bias = ((mean - exact).norm() / exact.norm()).item()
        assert bias > 0.01, (t, cap, bias)  # biased, by the amount above
    # and the engine's own fixed sampler keeps exactly t chunks with factor c
    engine = seqwrap.SpaCO(model, chunk_size=CHUNK, sampling="fixed", budget=2, max_compensation=1.5, seed=4)
    assert engine.chunk_weights([3] * 4).count(1.5) == 2
    assert engine(ids).backward_chunks == 2


def test_rates_budget_and_label_proportional():
    model = tiny_model("llama", layers=1)
    ids = data()
    e = seqwrap.SpaCO(model, chunk_size=2, budget=2, seed=0)
    assert e.probabilities([1] * 8) == [0.25] * 8
    e = seqwrap.SpaCO(model, chunk_size=2, rate=0.25, sampling="fixed", seed=0)
    w = e.chunk_weights([1] * 8)
    assert sorted(w) == [0.0] * 6 + [4.0, 4.0]
    f = proportional_to_labels(0.5)
    q = f([0, 10, 10, 20])
    assert q[0] < q[1] == q[2] < q[3] <= 1 and min(q) >= 0.05
    e = seqwrap.SpaCO(model, chunk_size=4, rate=f, seed=0)
    out = e(ids)
    assert out.num_chunks == 4


def test_spaco_bad_options():
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
        seqwrap.SpaCO(model, chunk_size=4, rate=0)
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
        seqwrap.SpaCO(model, chunk_size=4, rate=1.5)
    with pytest.raises(ValueError, match="sampling must be 'bernoulli' or 'fixed'"):
        seqwrap.SpaCO(model, chunk_size=4, sampling="topk")
    with pytest.raises(ValueError, match="max_compensation applies to sampling='fixed' only"):
        seqwrap.SpaCO(model, chunk_size=4, max_compensation=2)
    with pytest.raises(ValueError, match="max_compensation must be >= 1"):
        seqwrap.SpaCO(model, chunk_size=4, sampling="fixed", max_compensation=0.5)
    with pytest.raises(ValueError, match="budget must be an int >= 1"):
        seqwrap.SpaCO(model, chunk_size=4, budget=0)
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        seqwrap.SpaCO(model, chunk_size=0)
    with pytest.raises(ValueError, match=r"rate gave 3 probabilities for 4 chunks"):
        seqwrap.SpaCO(model, chunk_size=4, rate=[0.5] * 3)(data())
