"""The chunk K/V cache pieces: gradient routing of _CatWithPast and the relay accumulators."""
import pytest
import torch

from seqwrap.engines.kv_store import (RELAY_PLAIN_MAX_ADDS, RELAY_TOLERANCE, ChunkKVStore, RelaySink, _CatWithPast,
                                      relay_plain_adds)


def test_cat_with_past_routes_gradients():
    g = torch.Generator().manual_seed(0)
    past = [torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64) for n in (5, 2)]
    fresh = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = [RelaySink(), None]
    out = _CatWithPast.apply(fresh, sinks, *past)
    assert torch.equal(out.detach(), torch.cat([*past, fresh.detach()], dim=-2))
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(up)
    assert torch.equal(fresh.grad, up[..., 7:, :])
    assert torch.equal(sinks[0].acc, up[..., :5, :])
    out2 = _CatWithPast.apply(fresh, sinks, *past)
    out2.backward(up)
    assert torch.equal(sinks[0].acc, 2 * up[..., :5, :])  # accumulates across chunks


def test_relay_sink_half_precision_is_compensated():
    # 4000 bf16 gradients of ~1e-3 on top of 1: float32 Kahan keeps the float64 sum; naive bf16 does not.
    g = torch.Generator().manual_seed(1)
    grads = [(torch.rand(64, generator=g) * 1e-3).to(torch.bfloat16) for _ in range(4000)]
    sink = RelaySink()
    sink.add_(torch.ones(64, dtype=torch.bfloat16))
    naive32 = torch.ones(64)
    for x in grads:
        sink.add_(x)
        naive32 += x.float()
    exact = 1 + torch.stack([x.double() for x in grads]).sum(0)
    assert sink.acc.dtype == torch.float32 and sink.comp is not None
    kahan_err = (sink.acc.double() - exact).abs().max().item()
    naive_err = (naive32.double() - exact).abs().max().item()
    assert kahan_err <= 1e-6 and kahan_err < naive_err / 4


def _relay_error(adds: int, n: int, seed: int, plain: int | None = None) -> tuple[float, RelaySink]:
    """n float32 block gradients (random signs, like dK / dV blocks) into a bf16 sink planned for `adds`
    additions: normwise relative error against the float64 sum of the same addends."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(2, 4, 64, 16, generator=g) for _ in range(n)]
    sink = RelaySink(compensate=True, kv_dtype=torch.bfloat16, adds=adds, plain=plain)
    for x in grads:
        sink.add_(x)
    exact = torch.stack([x.double() for x in grads]).sum(0)
    return ((sink.acc.double() - exact).norm() / exact.norm()).item(), sink


def test_relay_sink_in_kv_dtype_meets_the_tolerance():
    # up to RELAY_PLAIN_MAX_ADDS additions: one bf16 buffer, within the tolerance
    err, sink = _relay_error(RELAY_PLAIN_MAX_ADDS, RELAY_PLAIN_MAX_ADDS, seed=2)
    assert sink.acc.dtype == torch.bfloat16 and sink.comp is None
    assert err <= RELAY_TOLERANCE, err
    # many more additions uncompensated would miss it; compensated (planned for them) it stays at the
    # floor: rounding the exact sum to bf16 (about 0.85 * 2^-9 normwise)
    plain, _ = _relay_error(0, 256, seed=3)
    assert plain > RELAY_TOLERANCE, plain
    err, sink = _relay_error(256, 256, seed=3, plain=0)
    assert sink.comp is not None and sink.comp.dtype == torch.bfloat16
    assert err <= 2.0**-9 and err < plain / 5, (err, plain)
    # seqwrap's schedule: the first relay_plain_adds(256) = 64 plain, then compensated: within the tolerance
    # (the early roundings shrink against the grown sum), the Kahan buffer allocated only at addition 65
    for seed in (3, 5, 6):
        err, sink = _relay_error(256, 256, seed=seed, plain=relay_plain_adds(256))
        assert sink.comp is not None and err <= RELAY_TOLERANCE and err < plain / 2, (seed, err)
        # an upper bound of 256 additions of which only 40 arrive: 32 plain, then compensated
        err, sink = _relay_error(256, 40, seed=seed)
        assert sink.comp is not None and err <= RELAY_TOLERANCE, (seed, err)


def test_relay_adds_and_which_sinks_are_compensated():
    n = RELAY_PLAIN_MAX_ADDS + 4
    bounds = [(2 * i, 2 * i + 2) for i in range(n)]
    store = ChunkKVStore(bounds, [False, True], window=5, attention="chunked")
    assert [store.relay_adds(j, 0) for j in (0, 1, n - 2, n - 1)] == [n - 1, n - 2, 1, 0]
    # sliding layer, window 5: chunk j (keys 2j, 2j+1) is read by chunks whose first query 2i has 2j+2 > 2i-4
    assert [store.relay_adds(j, 1) for j in (0, n - 3, n - 2)] == [2, 2, 1]
    for j in range(n - 1):
        store.keys[0][j] = store.keys[1][j] = torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16)
    for j in range(n - 1):
        (k0, v0), (k1, _) = store.sink(j, 0), store.sink(j, 1)
        assert (k0.kv_dtype, k0.adds, v0.adds, k1.adds) == (torch.bfloat16, n - 1 - j, n - 1 - j, min(2, n - 1 - j))
        # the compensation starts after relay_plain_adds(adds) plain additions (full layer: exact count)
        assert k0.plain == relay_plain_adds(n - 1 - j) and k1.plain == min(2, n - 1 - j)
        for _ in range(k0.plain):
            k0.add_(torch.ones(1, 1, 2, 4))
        assert k0.comp is None
        k0.add_(torch.ones(1, 1, 2, 4))
        k1.add_(torch.ones(1, 1, 2, 4))
        assert (k0.comp is not None) == (n - 1 - j > RELAY_PLAIN_MAX_ADDS) and k1.comp is None
    assert relay_plain_adds(RELAY_PLAIN_MAX_ADDS) == RELAY_PLAIN_MAX_ADDS
    assert relay_plain_adds(255) == 63 and relay_plain_adds(255, exact=False) == RELAY_PLAIN_MAX_ADDS


def test_relay_counts_only_replayed_chunks_and_is_inexact_with_padding():
    n = 40
    bounds = [(i, i + 1) for i in range(n)]
    store = ChunkKVStore(bounds, [False], None, attention="chunked", replayed=range(0, n, 2))
    assert store.relay_adds(0, 0) == (n - 2) // 2 and store.relay_adds(1, 0) == (n - 2) // 2
    assert store.relay_adds_exact(0)
    pad = torch.ones(1, n, dtype=torch.bool)
    pad[0, 5] = False
    padded = ChunkKVStore(bounds, [False], None, attention="chunked", key_padding=pad)
    assert not padded.relay_adds_exact(0)
    padded.keys[0][0] = torch.zeros(1, 1, 1, 4, dtype=torch.bfloat16)
    assert padded.sink(0, 0)[0].plain == RELAY_PLAIN_MAX_ADDS  # an upper bound: compensated after 32


def test_relay_schedule_peak_matches_the_memory_model():
    """Replays a SeCO backward's relay additions into a store's bf16 sinks (n chunks of one token, one
    layer), at a chunk count where the late compensations set the peak: the live bytes of sums and
    compensations, at their peak, equal memory_model.relay_sum_bytes, and every sum meets the tolerance."""
    from seqwrap.memory_model import DecoderShape, relay_sum_bytes

    n, d = 320, 256  # d: enough elements per sum for a normwise error that is not one element's luck
    store = ChunkKVStore([(i, i + 1) for i in range(n)], [False], None, attention="chunked")
    for j in range(n - 1):
        store.keys[0][j] = store.values[0][j] = torch.zeros(1, 1, 1, d, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    addends = {j: [] for j in range(n - 1)}
    live = lambda: sum(t.numel() * t.element_size() for pair in store.sinks.values() for sinks in pair  # noqa: E731
                       for s in sinks for t in (s.acc, s.comp) if t is not None)
    peak = 0
    errors = []
    for i in range(n - 1, 0, -1):  # the replay of chunk i relays into every earlier chunk
        for j in range(i):
            x = torch.randn(1, 1, 1, d, generator=g)
            addends[j].append(x.double())
            for sink in store.sink(j, 0):
                sink.add_(x)
        peak = max(peak, live())
        if i in addends:  # chunk i's sums are complete: compare, then free them
            exact = torch.stack(addends[i]).sum(0)
            acc = store.sinks[i][0][0].acc
            errors.append((((acc.double() - exact).norm() / exact.norm()).item(), i))
        store.free(i)
    shape = DecoderShape(layers=1, hidden=8, intermediate=8, heads=1, kv_heads=1, head_dim=d, vocab=8, params=0)
    assert peak == relay_sum_bytes(shape, n, 1, dtype_bytes=2)
    assert peak > 2 * (n - 1) * d * 2  # the compensations add to the peak at this many chunks
    assert max(errors)[0] <= RELAY_TOLERANCE, max(errors)


def test_sliding_visibility_and_mask_sizes():
    bounds = [(0, 4), (4, 8), (8, 12), (12, 14)]
    store = ChunkKVStore(bounds, [False, True], window=5)
    store.begin(3, "replay")
    assert store._visible(0) == [0, 1, 2]
    assert store._visible(1) == [2]  # a query at 12 sees keys >= 8
    assert store.query_offset == 12
    assert store.mask_sizes(2, 0) == (14, 0)
    assert store.mask_sizes(2, 1) == (6, 8)
    store.begin(2, "replay")
    assert store._visible(1) == [1]  # a query at 8 sees keys >= 4


def test_hf_cache_view_answers_from_the_store():
    pytest.importorskip("transformers")
    from seqwrap.hf.cache import ChunkCache

    store = ChunkKVStore([(0, 4), (4, 8), (8, 12), (12, 14)], [False, True], window=5)
    store.begin(3, "replay")
    cache = ChunkCache(store)
    assert cache.is_sliding == [False, True]
    assert cache.get_seq_length() == 12 and cache.get_query_offset() == 12
    assert cache.get_mask_sizes(2, 1) == (6, 8)
