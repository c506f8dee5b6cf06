"""The offload path's asynchronous side (the CUDA one) on a CPU: Transfers, prefetched, HostPool,
HostAccumulator and park_activations with the fake streams of fake_streams.py, whose copies run only
when waited for and leave NaN until then. Each test checks the values (NaN wherever an order is
wrong) and the recorded order itself:
- a copy is waited on (event synchronized, or the current stream waits on it) before its result is used;
- a pool buffer is handed out again only after the copies that last used it are done;
- prefetched keeps exactly one item's copies in flight ahead of the one in use.
"""
import gc

import pytest
import torch

import seqwrap
from seqwrap.engines import offload
from seqwrap.engines.offload import HostAccumulator, HostPool, Transfers, park_activations, prefetched

from .conftest import requires_cuda
from .fake_streams import FakeStreams
from .hf_tiny import tiny_model
from .test_seco import batch, check

CPU = torch.device("cpu")


def fake_transfers():
    fake = FakeStreams()
    return fake, Transfers(CPU, HostPool(pin=False), streams=fake)


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def test_cpu_default_is_synchronous_and_cuda_gets_cuda_streams():
    assert Transfers(CPU, HostPool(pin=False)).asynchronous is False
    assert isinstance(offload.streams_for(torch.device("cuda", 0)), offload.CudaStreams)
    assert offload.streams_for(CPU) is None
    _, xfer = fake_transfers()
    assert xfer.asynchronous and xfer.stream.name == "side0"


def test_a_copy_is_waited_on_before_its_result_is_used():
    fake, xfer = fake_transfers()
    x = rand(3, 5)
    host, e_host = xfer.to_host(x)
    assert torch.isnan(host).all(), "the device -> host copy runs late: NaN until it is done"
    dev, e_dev = xfer.start_to_device(host)
    assert torch.isnan(dev).all() and len(fake.pending()) == 2
    # used without waiting, the result would be garbage; finish() makes the current stream wait
    got = xfer.finish(dev, e_dev)
    assert torch.equal(got, x)
    log = fake.log
    wait = fake.position(("wait_event", "current", e_dev.id))
    assert fake.position(("done", "d2h#0")) < fake.position(("done", "h2d#1")), "side-stream copies in issue order"
    assert fake.position(("done", "h2d#1")) > wait, "the copy ran because the current stream waited for it"
    assert ("wait_stream", "side0", "current") in log[:fake.position(("issue", "d2h#0", "side0"))], \
        "the side stream waits for the work that produced x before reading it"
    assert log.index(("record_stream", "current")) > wait, "the device tensor is marked as used on the current stream"
    assert e_host.query() and e_dev.query()


def test_a_pool_buffer_is_not_reused_before_its_copies_finished():
    fake, xfer = fake_transfers()
    x = rand(4, 4, seed=1)
    host, _ = xfer.to_host(x)
    dev, e_dev = xfer.start_to_device(host)   # still queued: it reads `host` later
    xfer.release(host)                         # the event recorded here covers both copies
    release_event = fake.events[-1]
    assert len(fake.pending()) == 2
    again = xfer.pool.zeros((16,), torch.float64)   # same byte size: the same buffer, written on the host
    handed_out = len(fake.log)
    assert again.data_ptr() == host.data_ptr()
    sync = fake.position(("synchronize", release_event.id))
    # handed out only after the copies that used it ran
    assert sync < fake.position(("done", "d2h#0")) < fake.position(("done", "h2d#1")) < handed_out
    assert torch.equal(xfer.finish(dev, e_dev), x), "the earlier copy read the old contents"
    y = rand(4, 4, seed=2)
    xfer.release(again)
    host2, _ = xfer.to_host(y)
    assert host2.data_ptr() == host.data_ptr()
    assert torch.equal(xfer.finish(*xfer.start_to_device(host2)), y)


def test_reusing_a_buffer_without_its_event_corrupts_the_copy():
    """The hazard the release event guards against, made visible: the fake can fail a test."""
    fake, xfer = fake_transfers()
    x = rand(4, 4, seed=1)
    host, _ = xfer.to_host(x)
    dev, e_dev = xfer.start_to_device(host)
    xfer.pool.release(host, None)              # no event: the pool believes the buffer is free
    again = xfer.pool.zeros((16,), torch.float64)
    assert again.data_ptr() == host.data_ptr()
    xfer.finish(dev, e_dev)
    assert torch.equal(again.view(4, 4), x), "the late copy overwrote the new owner's zeros"


def test_prefetched_keeps_exactly_one_copy_ahead():
    fake, xfer = fake_transfers()
    n = 5
    values = [(rand(2, 3, seed=10 + i), rand(2, 3, seed=20 + i)) for i in range(n)]
    hosts = []
    for k, v in values:   # host buffers filled on the host (no copy pending)
        hk, hv = xfer.pool.get(k.shape, k.dtype), xfer.pool.get(v.shape, v.dtype)
        hk.copy_(k)
        hv.copy_(v)
        hosts.append((hk, hv))
    on_device = rand(2, 3, seed=99)
    items = [(i, hosts[i], True) for i in range(3)] + [("dev", (on_device,), False)] + \
            [(i, hosts[i], True) for i in range(3, n)]
    host_keys = [i for i, _, on_host in items if on_host]

    def started(key):  # the copies of an item read its host buffers
        ptrs = {t.data_ptr() for t in hosts[key]}
        return [c for c in fake.copies if c.kind == "h2d" and c.src_ptr in ptrs]

    seen = []
    for pos, (key, tensors) in enumerate(prefetched(items, xfer)):
        seen.append(key)
        if key == "dev":
            assert tensors[0] is on_device, "device tensors pass through untouched"
        else:
            copies = started(key)
            assert [c.done for c in copies] == [True, True], "both copies done before use"
            for c in copies:
                assert ("wait_event", "current", fake.event_after(c).id) in fake.log
            assert torch.equal(tensors[0], values[key][0]) and torch.equal(tensors[1], values[key][1])
        # exactly one item ahead: the copies of the items up to the next one are issued, none after
        issued = [k for k in host_keys if started(k)]
        assert issued == [k for k, _, on_host in items[:pos + 2] if on_host], f"at item {key}: issued {issued}"
    assert seen == [0, 1, 2, "dev", 3, 4]
    assert len([c for c in fake.copies if c.kind == "h2d"]) == 2 * n, "one copy per host tensor, none twice"


def test_host_accumulator_waits_for_each_staging_copy():
    fake, xfer = fake_transfers()
    acc_sum = HostAccumulator(xfer, max_pending=2)
    acc = xfer.pool.zeros((3, 4), torch.float32)
    comp = xfer.pool.zeros((3, 4), torch.float32)
    grads = [rand(3, 4, dtype=torch.bfloat16, seed=s) for s in range(5)]
    acc_sum.add(acc, comp, grads[0])
    acc_sum.add(acc, comp, grads[1])
    assert torch.equal(acc, torch.zeros_like(acc)), "nothing is added before the staging copies are done"
    assert len(fake.pending("d2h")) == 2
    acc_sum.add(acc, comp, grads[2])     # a third pending copy: over max_pending, flushed
    assert fake.pending() == [] and len(acc_sum._pending) == 0
    for g in grads[3:]:
        acc_sum.add(acc, comp, g)
    acc_sum.flush()
    staging_events = [e for e in fake.events if ("synchronize", e.id) in fake.log]
    assert len(staging_events) == 5, "each staging copy's event synchronized before its addition"
    want = torch.stack([g.double() for g in grads]).sum(0)
    assert not torch.isnan(acc).any()
    assert (acc.double() - want).abs().max() <= 1e-6 * want.abs().max()
    assert xfer.pool.in_use == 2 * acc.numel() * 4, "the staging buffers went back to the pool"


def test_park_activations_fetches_before_use_and_one_ahead():
    fake, xfer = fake_transfers()
    w = torch.nn.Parameter(rand(6, 6, seed=3))
    x = rand(4, 6, seed=4).requires_grad_()
    stats = {}
    with park_activations(xfer, {w.untyped_storage().data_ptr()}, 0, stats):
        h1 = torch.tanh(x @ w)
        h2 = torch.sin(h1 @ w)
        y = (h2 * h2).sum()
    parked = [c for c in fake.copies if c.kind == "d2h"]
    assert len(parked) >= 3 and all(not c.done for c in parked), "parking copies are queued, not run"
    y.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ((torch.sin(torch.tanh(x @ w) @ w)) ** 2).sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad), "every unpacked tensor held its data"
    fetches = [c for c in fake.copies if c.kind == "h2d"]
    order = {c.dst.data_ptr(): i for i, c in enumerate(parked)}   # host buffer -> save index
    fetched_index = [order[c.src_ptr] for c in fetches]
    assert sorted(fetched_index) == list(range(len(parked))), "each parked tensor fetched exactly once"
    # autograd unpacks in roughly reverse save order; when the current stream waits for the fetch of
    # save k, the fetch of save k - 1 is already issued (prefetch), unless k - 1 was used before k
    by_index = {order[c.src_ptr]: c for c in fetches}
    wait_at = {k: fake.position(("wait_event", "current", fake.event_after(c).id)) for k, c in by_index.items()}
    issue_at = {k: fake.position(("issue", c.label, "side0")) for k, c in by_index.items()}
    for k in range(1, len(parked)):
        assert by_index[k].done
        assert issue_at[k - 1] < wait_at[k] or wait_at[k - 1] < wait_at[k], f"save {k - 1} not fetched ahead of {k}"
    assert sum(issue_at[k - 1] < wait_at[k] for k in range(1, len(parked))) >= len(parked) - 2, \
        "the prefetch runs ahead in most steps"
    del h1, h2, y
    gc.collect()
    assert xfer.pool.in_use == 0 and stats["parked_live_bytes"] == 0


@pytest.fixture
def fake_streams_in_engines(monkeypatch):
    """Every Transfers made on the CPU gets fake asynchronous streams; the shared pool is emptied after."""
    made = []

    def fake_for(device):
        made.append(FakeStreams())
        return made[-1]

    monkeypatch.setattr(offload, "streams_for", fake_for)
    yield made
    for f in made:
        f.drain()
    offload.default_pool().clear()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_seco_offload_with_late_copies_equals_full_backprop(fake_streams_in_engines, family):
    model = tiny_model(family)
    ids, labels, mask = batch()
    check(model, 7, ids, labels, mask, offload=True, offload_min_bytes=0)
    fakes = fake_streams_in_engines
    assert fakes, "the engine's Transfers took the injected streams"
    kinds = {c.kind for f in fakes for c in f.copies}
    assert kinds == {"d2h", "h2d"}
    assert offload.default_pool().in_use == 0


def test_spaco_offload_with_late_copies_equals_spaco(fake_streams_in_engines):
    ids, labels, mask = batch()
    grads = []
    for off in (False, True):
        model = tiny_model("llama")
        seqwrap.SpaCO(model, chunk_size=4, rate=0.5, seed=11, offload=off)(ids, labels=labels, attention_mask=mask)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert fake_streams_in_engines and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-12, atol=1e-14)


def test_bfloat16_offload_with_late_copies(fake_streams_in_engines):
    """Half-precision relay sums go through HostAccumulator's staging copies and Kahan additions."""
    ids, labels, mask = batch()
    results = []
    for off in (False, True):
        model = tiny_model("llama", dtype=torch.float32).to(torch.bfloat16)
        out = seqwrap.SeCO(model, chunk_size=5, offload=off, offload_min_bytes=0)(ids, labels=labels,
                                                                                   attention_mask=mask)
        results.append((out.loss, {n: p.grad.float() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert abs(l1.item() - l0.item()) <= 1e-6 * abs(l0.item())
    for n in g0:
        assert not torch.isnan(g1[n]).any(), n
        assert (g1[n] - g0[n]).norm() <= 1e-2 * g0[n].norm() + 1e-6, n


# -- the same paths with real CUDA streams -----------------------------------------------------------

@requires_cuda
def test_cuda_transfers_round_trip_prefetch_and_pool_reuse():
    dev = torch.device("cuda")
    xfer = Transfers(dev, HostPool())
    assert isinstance(xfer.streams, offload.CudaStreams) and xfer.pool.pin
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(512, 1024, device=dev, generator=g) for _ in range(6)]   # 2 MiB each
    hosts = [xfer.to_host(x)[0] for x in xs]
    items = [(i, (h,), True) for i, h in enumerate(hosts)]
    for i, (t,) in prefetched(items, xfer):
        assert t.device.type == "cuda" and torch.equal(t, xs[i]), f"item {i}"
    reserved = xfer.pool.reserved
    for h in hosts:
        xfer.release(h)
    again = [xfer.to_host(x * 2)[0] for x in xs]        # reuses the released buffers
    assert xfer.pool.reserved == reserved
    for i, (t,) in prefetched([(i, (h,), True) for i, h in enumerate(again)], xfer):
        assert torch.equal(t, xs[i] * 2), f"reused buffer {i}"
    acc_sum = HostAccumulator(xfer, max_pending=3)
    acc, comp = xfer.pool.zeros((512, 1024), torch.float32), xfer.pool.zeros((512, 1024), torch.float32)
    for x in xs:
        acc_sum.add(acc, comp, x.to(torch.bfloat16))
    acc_sum.flush()
    want = torch.stack([x.to(torch.bfloat16).double() for x in xs]).sum(0).cpu()
    assert (acc.double() - want).abs().max() <= 1e-6 * want.abs().max()


@requires_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_seco_offload_equals_seco(dtype, tol):
    """The side stream, events, pinned pool and prefetch on a real device: offload changes nothing."""
    ids, labels, mask = (t.cuda() for t in batch())
    results = []
    for off in (False, True):
        model = tiny_model("llama", dtype=torch.float32).to("cuda", dtype)
        out = seqwrap.SeCO(model, chunk_size=5, offload=off, offload_min_bytes=0)(ids, labels=labels,
                                                                                   attention_mask=mask)
        results.append((out.loss, {n: p.grad.float() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert abs(l1.item() - l0.item()) <= tol * abs(l0.item())
    for n in g0:
        assert (g1[n] - g0[n]).norm() <= tol * g0[n].norm() + 1e-6, n
