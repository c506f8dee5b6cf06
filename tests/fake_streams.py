"""A stand-in for seqwrap.engines.offload.CudaStreams on the CPU: asynchronous copies that run late,
and a log of every copy, wait, event and synchronization in the order they happen.

The model of a CUDA device it follows:
- the current (compute) stream runs what it is given at once, as host code does;
- a side stream only queues its work; the work runs when something waits for it: an event recorded
  on that stream is synchronized, or the current stream waits on such an event (the current stream
  runs at once, so waiting means running the side stream up to that event);
- a copy's destination holds garbage (NaN) from the moment the copy is issued until it has run, as
  memory being written by a DMA engine does.

So code that uses a copy's result before waiting for it reads NaN, and code that reuses a buffer
while a queued copy still reads it hands that copy the wrong data. The log lets tests check the order
itself: ("issue", label, stream), ("done", label), ("record", event, stream, mark),
("synchronize", event), ("wait_event", stream, event), ("wait_stream", stream, other),
("record_stream", stream).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch


def poison(t: torch.Tensor) -> None:
    """Garbage that cannot pass for data: NaN (float), the largest value (integers)."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    else:
        t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.bool else True)


@dataclass
class Copy:
    """One asynchronous copy: its label ("d2h#3", "h2d#4"), where it reads and writes, whether it ran."""
    label: str
    kind: str             # "d2h" (device -> host) or "h2d"
    src_ptr: int
    dst: torch.Tensor
    done: bool = False
    order: int = field(default=0)   # position in the issue order of all copies
    stream: "FakeStream | None" = None
    seq: int = 0                    # its number on that stream (an event recorded right after has mark == seq)


class FakeStream:
    def __init__(self, log: list, name: str, deferred: bool):
        self.log, self.name, self.deferred = log, name, deferred
        self.queue: deque = deque()   # (sequence number, label, fn) not yet run
        self.issued = 0               # work items issued so far (an event's mark)
        self.completed = 0            # work items run so far

    def enqueue(self, label: str, fn) -> None:
        self.issued += 1
        self.log.append(("issue", label, self.name))
        if self.deferred:
            self.queue.append((self.issued, label, fn))
        else:
            fn()
            self.completed = self.issued
            self.log.append(("done", label))

    def run_until(self, mark: int) -> None:
        """Runs the queued work up to and including item number `mark`, in issue order."""
        while self.queue and self.queue[0][0] <= mark:
            seq, label, fn = self.queue.popleft()
            fn()
            self.completed = seq
            self.log.append(("done", label))

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(("wait_stream", self.name, other.name))
        mark = other.issued
        if self.deferred:  # later work of this stream starts after other's work issued so far
            self.enqueue(f"wait {other.name}@{mark}", lambda: other.run_until(mark))
        else:
            other.run_until(mark)

    def wait_event(self, event: "FakeEvent") -> None:
        self.log.append(("wait_event", self.name, event.id))
        if event.stream is None:
            return
        if self.deferred:
            self.enqueue(f"wait e{event.id}", event.run)
        else:
            event.run()


class FakeEvent:
    def __init__(self, log: list, n: int):
        self.log, self.id = log, n
        self.stream: FakeStream | None = None
        self.mark = 0

    def record(self, stream: FakeStream) -> None:
        self.stream, self.mark = stream, stream.issued
        self.log.append(("record", self.id, stream.name, self.mark))

    def run(self) -> None:
        if self.stream is not None:
            self.stream.run_until(self.mark)

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.id))
        self.run()

    def query(self) -> bool:
        return self.stream is None or self.stream.completed >= self.mark


class FakeStreams:
    """Drop-in for CudaStreams (same methods), on CPU tensors."""

    def __init__(self):
        self.log: list = []
        self._current = FakeStream(self.log, "current", deferred=False)
        self.side: list[FakeStream] = []
        self.events: list[FakeEvent] = []
        self.copies: list[Copy] = []

    # -- the CudaStreams interface ---------------------------------------------
    def new_stream(self) -> FakeStream:
        s = FakeStream(self.log, f"side{len(self.side)}", deferred=True)
        self.side.append(s)
        return s

    def current(self) -> FakeStream:
        return self._current

    def new_event(self) -> FakeEvent:
        e = FakeEvent(self.log, len(self.events))
        self.events.append(e)
        return e

    def copy_to_host(self, host: torch.Tensor, t: torch.Tensor, stream: FakeStream) -> None:
        c = self._new_copy("d2h", t.data_ptr(), host)
        poison(host)  # being written: garbage until the copy has run
        stream.enqueue(c.label, lambda: self._run(c, lambda: host.copy_(t)))
        c.stream, c.seq = stream, stream.issued

    def to_device(self, host: torch.Tensor, stream: FakeStream) -> torch.Tensor:
        dev = torch.empty_like(host)
        c = self._new_copy("h2d", host.data_ptr(), dev)
        poison(dev)
        stream.enqueue(c.label, lambda: self._run(c, lambda: dev.copy_(host)))
        c.stream, c.seq = stream, stream.issued
        return dev

    def record_stream(self, t: torch.Tensor, stream: FakeStream) -> None:
        self.log.append(("record_stream", stream.name))

    # -- for the tests ---------------------------------------------------------
    def _new_copy(self, kind: str, src_ptr: int, dst: torch.Tensor) -> Copy:
        c = Copy(f"{kind}#{len(self.copies)}", kind, src_ptr, dst, order=len(self.copies))
        self.copies.append(c)
        return c

    @staticmethod
    def _run(c: Copy, fn) -> None:
        fn()
        c.done = True

    def copy_into(self, t: torch.Tensor) -> Copy:
        """The latest copy that wrote t's memory."""
        found = [c for c in self.copies if c.dst.data_ptr() == t.data_ptr()]
        assert found, "no copy wrote this tensor"
        return found[-1]

    def event_after(self, c: Copy) -> FakeEvent:
        """The first event recorded on c's stream right after c was issued."""
        return next(e for e in self.events if e.stream is c.stream and e.mark == c.seq)

    def pending(self, kind: str | None = None) -> list[Copy]:
        return [c for c in self.copies if not c.done and (kind is None or c.kind == kind)]

    def position(self, entry) -> int:
        """Index of the first log entry equal to `entry` (ValueError if absent)."""
        return self.log.index(entry)

    def drain(self) -> None:
        for s in self.side:
            s.run_until(s.issued)
