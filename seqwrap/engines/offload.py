"""Host offload for the chunked engines: pinned buffer pool, side-stream copies with prefetch,
host-side gradient accumulation and activation parking (FPDT, Yao et al. 2024).

On a CUDA device every host buffer is pinned and comes from a `HostPool` that keeps freed
buffers for the next chunk and the next step (pinning memory is slow). Device -> host and
host -> device copies run on one side stream (`Transfers`), so they overlap compute on torch's
current stream; the two streams meet only through events. Copies on one side stream stay in
issue order, so a host buffer written by a device -> host copy is complete before a later
host -> device copy of it starts. `prefetched` hands out device copies of a list of host
tensors with the copy of the next item already in flight (double buffering).

On a CPU device there is nothing to overlap: the same code runs with synchronous copies into
pool buffers, so the bookkeeping is exercised (and tested) on any machine.

Every stream, event and asynchronous copy goes through one object, `Transfers.streams`
(`CudaStreams` for a CUDA device, the only one production uses). Tests hand `Transfers` a fake
with the same methods whose copies run late and record their order, so the asynchronous path's
ordering (a copy waited on before its result is used, a pool buffer not reused before the copy
that last touched it is done, one prefetch in flight) is checked on a CPU too.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

from ..ops.kahan import kahan_accumulate_


class CudaStreams:
    """The streams, events and asynchronous copies of the offload path on one CUDA device.

    Transfers calls only these methods, so a stand-in with the same ones (tests/fake_streams.py)
    can replace it: new_stream(), current(), new_event() and record_stream() as in torch.cuda;
    streams have wait_stream(other) and wait_event(event), events record(stream) and synchronize().
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def current(self):
        return torch.cuda.current_stream(self.device)

    def new_event(self):
        return torch.cuda.Event()

    def copy_to_host(self, host: torch.Tensor, t: torch.Tensor, stream) -> None:
        """Enqueues host <- t (device) on `stream`; host is pinned, so the copy is asynchronous."""
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)

    def to_device(self, host: torch.Tensor, stream) -> torch.Tensor:
        """Enqueues a copy of host on the device on `stream`; the result is valid once it is done."""
        with torch.cuda.stream(stream):
            return host.to(self.device, non_blocking=True)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        """The caching allocator must not reuse t's memory before `stream`'s work so far is done."""
        t.record_stream(stream)


def streams_for(device: torch.device):
    """The streams object of Transfers on `device`: CudaStreams on CUDA, None (synchronous copies) else."""
    return CudaStreams(device) if torch.device(device).type == "cuda" else None


class HostPool:
    """Host buffers by byte size, reused across chunks and steps.

    get(shape, dtype) hands out a buffer (contents undefined); release(t, event) returns it,
    `event` (a CUDA event, or any object with synchronize(); None when no copy is pending) marking
    the last device-side use: a later get() of the same size waits for it. Pinned when CUDA is
    available (unless pin=False). `tag` names what a buffer holds ("kv": stored past K/V, "relay":
    relayed K/V gradient sums and their compensation, "other"): in_use_by / peak_by count bytes per
    tag (each tag's own peak), so the memory model's host terms can be checked against the pool.
    """

    def __init__(self, pin: bool | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._free: dict[int, list[tuple[torch.Tensor, object]]] = {}
        self._lent: dict[int, torch.Tensor] = {}   # data_ptr -> buffer handed out
        self.reserved = 0      # bytes allocated by the pool
        self.in_use = 0        # bytes handed out and not yet released
        self.peak_in_use = 0
        self._tags: dict[int, str] = {}              # data_ptr -> tag of a buffer handed out
        self.in_use_by: dict[str, int] = {}          # tag -> bytes handed out and not yet released
        self.peak_by: dict[str, int] = {}            # tag -> peak of in_use_by[tag]

    def get(self, shape, dtype: torch.dtype, tag: str = "other") -> torch.Tensor:
        shape = tuple(shape)
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        free = self._free.get(nbytes)
        if free:
            buf, event = free.pop()
            if event is not None:
                event.synchronize()
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self.reserved += nbytes
        self.in_use += nbytes
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        self._lent[buf.data_ptr()] = buf
        self._tags[buf.data_ptr()] = tag
        live = self.in_use_by[tag] = self.in_use_by.get(tag, 0) + nbytes
        self.peak_by[tag] = max(self.peak_by.get(tag, 0), live)
        return buf.view(dtype).view(shape)

    def zeros(self, shape, dtype: torch.dtype, tag: str = "other") -> torch.Tensor:
        return self.get(shape, dtype, tag).zero_()

    def release(self, t: torch.Tensor, event=None) -> None:
        buf = self._lent.pop(t.data_ptr(), None)
        if buf is None:
            raise ValueError("HostPool.release: not a buffer handed out by this pool (or released twice)")
        self.in_use -= buf.numel()
        tag = self._tags.pop(t.data_ptr())
        self.in_use_by[tag] -= buf.numel()
        self._free.setdefault(buf.numel(), []).append((buf, event))

    def reset_peak(self) -> None:
        self.peak_in_use = self.in_use
        self.peak_by = dict(self.in_use_by)

    def clear(self) -> None:
        """Frees the buffers kept for reuse (those handed out stay valid)."""
        for free in self._free.values():
            for buf, event in free:
                if event is not None:
                    event.synchronize()
                self.reserved -= buf.numel()
        self._free.clear()


_DEFAULT_POOL: HostPool | None = None


def default_pool() -> HostPool:
    """The process-wide pool the engines share (so buffers survive from one step to the next)."""
    global _DEFAULT_POOL
    if _DEFAULT_POOL is None:
        _DEFAULT_POOL = HostPool()
    return _DEFAULT_POOL


class Transfers:
    """Copies between the compute device and host pool buffers, on one side stream for CUDA.

    streams: the object that owns streams, events and asynchronous copies (see CudaStreams);
    default streams_for(device), i.e. CudaStreams on CUDA and synchronous copies elsewhere.
    """

    def __init__(self, device: torch.device, pool: HostPool, streams=None):
        self.device = torch.device(device)
        self.pool = pool
        self.cuda = self.device.type == "cuda"
        self.streams = streams if streams is not None else streams_for(self.device)
        self.asynchronous = self.streams is not None
        self.stream = self.streams.new_stream() if self.asynchronous else None  # the side stream

    def to_host(self, t: torch.Tensor, tag: str = "other"):
        """Copy of t (detached) into a pool buffer: (host tensor, event marking the copy's end).
        Synchronous copies: (host tensor, None). tag: see HostPool."""
        t = t.detach()
        host = self.pool.get(t.shape, t.dtype, tag)
        if not self.asynchronous:
            host.copy_(t)
            return host, None
        s = self.streams
        self.stream.wait_stream(s.current())  # t is produced on the current stream
        s.copy_to_host(host, t, self.stream)
        event = s.new_event()
        event.record(self.stream)
        s.record_stream(t, self.stream)  # the allocator must not reuse t before the copy has read it
        return host, event

    def start_to_device(self, host: torch.Tensor):
        """Starts a host -> device copy on the side stream: (device tensor, event).
        Synchronous copies: (host, None)."""
        if not self.asynchronous:
            return host, None
        dev = self.streams.to_device(host, self.stream)
        event = self.streams.new_event()
        event.record(self.stream)
        return dev, event

    def finish(self, dev: torch.Tensor, event) -> torch.Tensor:
        """Makes the current stream wait for a copy started by start_to_device; returns the tensor."""
        if event is None:
            return dev
        current = self.streams.current()
        current.wait_event(event)
        self.streams.record_stream(dev, current)
        return dev

    def release(self, host: torch.Tensor) -> None:
        """Returns a pool buffer; its reuse waits for the side-stream copies issued so far."""
        event = None
        if self.asynchronous:
            event = self.streams.new_event()
            event.record(self.stream)
        self.pool.release(host, event)


def prefetched(items, xfer: Transfers):
    """items: iterable of (key, tensors, on_host). Yields (key, tensors on the device) in order;
    host tensors are copied, and the copies of the next item are already in flight while the
    current one is used (double buffering). Device tensors pass through as they are."""
    def start(item):
        if item is None:
            return None
        key, tensors, on_host = item
        return key, [xfer.start_to_device(t) if on_host else (t, None) for t in tensors]

    it = iter(items)
    current = start(next(it, None))
    while current is not None:
        following = start(next(it, None))
        key, copies = current
        yield key, tuple(xfer.finish(d, e) for d, e in copies)
        current = following


class HostAccumulator:
    """Host-side sums of gradients that arrive on the device (relayed dK/dV of offloaded chunks).

    add(acc, comp, g): acc (float32/64 pool buffer) += g, Kahan-compensated through comp for
    half-precision g. With asynchronous copies (CUDA) g goes to a pinned staging buffer on the side
    stream and is added on the host once the copy is done (flush(), or when too many copies are
    pending).
    """

    def __init__(self, xfer: Transfers, max_pending: int = 16):
        self.xfer = xfer
        self.max_pending = max_pending
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, object]] = []

    def add(self, acc: torch.Tensor, comp: torch.Tensor | None, g: torch.Tensor) -> None:
        if not self.xfer.asynchronous:
            _host_add(acc, comp, g.detach())
            return
        staging, event = self.xfer.to_host(g)
        self._pending.append((acc, comp, staging, event))
        if len(self._pending) > self.max_pending:
            self.flush()

    def flush(self) -> None:
        for acc, comp, staging, event in self._pending:
            event.synchronize()
            _host_add(acc, comp, staging)
            self.xfer.pool.release(staging)  # its copy is done (synchronized above)
        self._pending.clear()


def _host_add(acc, comp, g):
    if acc.dtype == torch.bfloat16:  # a relayed sum kept in the K/V dtype (kv_store.RelaySink)
        add_in_kv_dtype_(acc, comp, g)
    elif comp is not None:
        kahan_accumulate_([acc], [comp], [g.contiguous()], 1.0)
    else:
        acc.add_(g)


def add_in_kv_dtype_(acc: torch.Tensor, comp: torch.Tensor | None, g: torch.Tensor) -> None:
    """acc += g for a bfloat16 sum acc (any shape; g float32 or bfloat16, same shape), the addition done in
    float32 and rounded once into acc. With comp (bfloat16, same shape): Kahan-compensated, comp holding
    what the roundings of acc added so far (acc - comp is the sum to about 16 significant bits; acc alone is
    within a bfloat16 rounding of it), at the cost of one more bfloat16 buffer."""
    a = acc.float()              # a new float32 tensor (acc is bfloat16): safe to work in place
    if comp is None:
        acc.copy_(a.add_(g.detach()))
        return
    y = g.detach().float() - comp.float()  # the addend, corrected by the error of the previous roundings (g untouched)
    t = (a + y).to(acc.dtype)    # the new sum, rounded to bfloat16
    comp.copy_(t.float().sub_(a).sub_(y))  # (t - a) - y: what this rounding added (small: bfloat16 keeps it)
    acc.copy_(t)


class _Parked:
    """A saved activation parked on the host (see park_activations)."""

    __slots__ = ("host", "event", "device_copy", "index", "unpacked", "__weakref__")

    def __init__(self, host, event, index):
        self.host, self.event, self.device_copy, self.index = host, event, None, index
        self.unpacked = False  # handed to autograd at least once (a prefetch of it would be wasted)


def _count_live(stats: dict, nbytes: int) -> None:
    live = stats["parked_live_bytes"] = stats.get("parked_live_bytes", 0) + nbytes
    stats["parked_peak_bytes"] = max(stats.get("parked_peak_bytes", 0), live)


@contextmanager
def park_activations(xfer: Transfers, skip_storages: set[int], min_bytes: int, stats: dict):
    """Saved-tensor hooks: every tensor autograd saves inside the block (outside checkpointed
    regions: with HF gradient checkpointing, the inputs of the checkpointed layers) is copied to
    the host and brought back when the backward needs it, the previous one (in save order)
    prefetched at the same time. Parameters (storages in skip_storages), tensors on another
    device and tensors under min_bytes stay where they are. stats: "parked_bytes" (all parked),
    "parked_live_bytes" (parked and not yet freed), "parked_peak_bytes" (its peak)."""
    order: list[weakref.ref] = []
    device_type = xfer.device.type

    def pack(t):
        nbytes = t.numel() * t.element_size()
        if (t.device.type != device_type or nbytes < min_bytes or t.layout != torch.strided
                or t.untyped_storage().data_ptr() in skip_storages):
            return t
        if not xfer.asynchronous:  # CPU: a synchronous copy, handed back as it is
            parked = _Parked(t.detach().clone(), None, len(order))
        else:
            host, event = xfer.to_host(t)
            parked = _Parked(host, event, len(order))
            weakref.finalize(parked, xfer.release, host)
        weakref.finalize(parked, _count_live, stats, -nbytes)
        order.append(weakref.ref(parked))
        stats["parked_bytes"] = stats.get("parked_bytes", 0) + nbytes
        _count_live(stats, nbytes)
        return parked

    def fetch(parked):
        if parked.device_copy is None:
            parked.device_copy = xfer.start_to_device(parked.host)
        return parked.device_copy

    def unpack(packed):
        if not isinstance(packed, _Parked):
            return packed
        if not xfer.asynchronous:
            return packed.host
        dev, event = fetch(packed)
        packed.unpacked = True
        i = packed.index
        if i > 0:  # backward runs roughly in reverse save order: prefetch the previous one
            prev = order[i - 1]()
            if prev is not None and not prev.unpacked:
                fetch(prev)
        packed.device_copy = None
        return xfer.finish(dev, event)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
