"""ChunkStateStore on its own (no transformers): a toy two-layer model with a causal conv and a diagonal
linear recurrence per layer, trained chunk by chunk with the engines' two passes, equals full backprop."""
import torch

from seqwrap.engines.hybrid_store import HybridChunkStore, make_store
from seqwrap.engines.kv_store import ChunkKVStore
from seqwrap.engines.state_store import ChunkStateStore

K = 3  # conv width


def toy_params(dim=4, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).requires_grad_()  # noqa: E731
    return [dict(w=r(dim, K), a=torch.rand(dim, generator=g, dtype=torch.float64).mul(0.9).requires_grad_(),
                 b=r(dim, dim)) for _ in range(layers)]


def layer_forward(p, x, states, layer):
    """x (B, L, dim) -> (B, L, dim); conv over [state ; x], then h_t = a * h_{t-1} + B conv_t."""
    xc = x.transpose(1, 2)                                           # (B, dim, L)
    if states is None:
        full = torch.nn.functional.pad(xc, (K - 1, 0))
        h = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype)
    else:
        full = states.update_conv(layer, xc, K)
        if full.shape[-1] < xc.shape[-1] + K - 1:                   # chunk 0: zero padding
            full = torch.nn.functional.pad(full, (xc.shape[-1] + K - 1 - full.shape[-1], 0))
        else:
            full = full[..., full.shape[-1] - xc.shape[-1] - K + 1:]
        h = states.entry(layer, "ssm")
        h = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype) if h is None else h
    conv = torch.nn.functional.conv1d(full, p["w"][:, None, :], groups=x.shape[2]).transpose(1, 2)   # (B, L, dim)
    out = []
    for t in range(x.shape[1]):
        h = p["a"] * h + conv[:, t] @ p["b"]
        out.append(torch.tanh(h))
    if states is not None:
        states.update_ssm(layer, h)
    return x + torch.stack(out, 1)


def model(params, x, states=None):
    for i, p in enumerate(params):
        x = layer_forward(p, x, states, i)
    return x


def test_two_pass_chunked_training_equals_full_backprop():
    params = toy_params()
    flat = [t for p in params for t in p.values()]
    x = torch.randn(2, 13, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 13, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = torch.autograd.grad(((model(params, x) - target) ** 2).sum(), flat)

    bounds = [(0, 5), (5, 10), (10, 13)]
    st = ChunkStateStore([0, 1])
    with torch.no_grad():  # pass 1: boundary states
        for i, (s, e) in enumerate(bounds):
            st.begin(i, "record", store=i < len(bounds) - 1)
            model(params, x[:, s:e], st)
            assert st.missing() == []
    assert sorted(st.entries) == [1, 2] and len(st.entries[1]) == 4   # 2 layers x (conv, ssm)
    for i in reversed(range(len(bounds))):  # pass 2: reverse, relaying the state adjoints
        s, e = bounds[i]
        st.begin(i, "replay", grad_chunks=range(len(bounds)))
        loss = ((model(params, x[:, s:e], st) - target[:, s:e]) ** 2).sum()
        model(params, x[:, s:e], st)  # a second forward (a checkpoint recompute): same leaves, its writes ignored
        pairs = st.relay_pairs(i)
        # chunk 0: layer 0's conv state holds only input columns (no graph, nothing to relay)
        assert len(pairs) == {2: 0, 1: 4, 0: 3}[i]
        torch.autograd.backward([loss] + [t for t, _ in pairs], [torch.ones_like(loss)] + [g for _, g in pairs])
        st.finish(i)
    for p, r in zip(flat, ref):
        assert torch.allclose(p.grad, r, rtol=1e-12, atol=1e-13)
    assert not st.entries and not st.leaves and not st.adjoints


def test_adjoint_only_towards_recomputed_chunks():
    """Replaying chunk 2 when chunk 1 is not recomputed (SpaCO): its entry leaves need no grad, no adjoint."""
    params = toy_params(layers=1)
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    st = ChunkStateStore([0])
    with torch.no_grad():
        for i in range(3):
            st.begin(i, "record")
            model(params, x[:, 3 * i:3 * i + 3], st)
    st.begin(2, "replay", grad_chunks={0, 2})
    model(params, x[:, 6:], st).sum().backward()
    assert not any(leaf.requires_grad for leaf in st.leaves.values())
    st.finish(2)
    assert 2 not in st.adjoints


def test_relay_without_fresh_state_is_an_error():
    st = ChunkStateStore([0])
    st.adjoints[1] = {(0, "ssm", 0): torch.ones(2)}
    st.begin(0, "replay", grad_chunks={0, 1})
    try:
        st.relay_pairs(0)
    except RuntimeError as exc:
        assert "did not write that state" in str(exc)
    else:
        raise AssertionError("expected a RuntimeError")


def test_conv_state_keeps_last_width_columns_left_padded():
    st = ChunkStateStore([0])
    st.begin(0, "record")
    full = st.update_conv(0, torch.arange(2.0).view(1, 1, 2), 3)
    assert torch.equal(full, torch.arange(2.0).view(1, 1, 2))
    st.begin(1, "record")
    assert torch.equal(st.entry(0, "conv"), torch.tensor([[[0.0, 0.0, 1.0]]]))
    full = st.update_conv(0, torch.tensor([[[5.0, 6.0]]]), 3)
    assert torch.equal(full, torch.tensor([[[0.0, 0.0, 1.0, 5.0, 6.0]]]))
    st.begin(2, "record")
    assert torch.equal(st.entry(0, "conv"), torch.tensor([[[1.0, 5.0, 6.0]]]))
    assert st.entry(0, "conv")._base is None   # a copy, not a view of the chunk's conv input


def test_make_store():
    args = ([(0, 4)], [False, False], None)
    assert type(make_store([], *args)) is ChunkKVStore
    hybrid = make_store([1], *args)
    assert isinstance(hybrid, HybridChunkStore) and hybrid.states.layers == {1}
