"""An emulated CUDA device for the tests: seqwrap's Python ops, on host tensors, run the CUDA kernels
under the host emulation (build.py, emu_runtime.cpp) instead of the CPU kernels.

    dev = EmulatedDevice(build.build("plain"))
    with dev.active(schedule=RANDOM, seed=7) as run:
        loss = seqwrap.linear_cross_entropy(h, w, y)       # the .cu kernel, as fibers
    assert run.reports == []                               # (active() asserts it unless told not to)

What is swapped while active: the extension module the op wrappers call (seqwrap.ops.library, .sampler,
.ssd_scan), and the three places where a wrapper asks `is_cuda` for a CUDA-only argument: the scans'
`work` scratch (allocated here at the CUDA size) and the cross-entropy's device-side label flag (made
here, and turned into the CPU path's ValueError). Everything else is the production path.
"""
import contextlib
import ctypes

import torch

from . import build

IN_ORDER, REVERSED, RANDOM = 0, 1, 2
SCHEDULE_NAMES = {IN_ORDER: "in order", REVERSED: "reversed", RANDOM: "random"}
# (schedule, seed) triples every emulated kernel test runs under
SCHEDULES = [(IN_ORDER, 0), (REVERSED, 0), (RANDOM, 20261203)]


class EmulatorReport(AssertionError):
    pass


class Run:
    reports: list    # the emulator's reports (races, shuffle misuse, barrier divergence, deadlock)
    launched: list   # the kernels launched (names as written at the launch)


class EmulatedDevice:
    def __init__(self, so):
        self.so = so
        self.module = build.load(so)
        self.lib = ctypes.CDLL(str(so))
        self.lib.sw_emu_configure.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_longlong, ctypes.c_longlong]
        self.lib.sw_emu_take_reports.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        self.lib.sw_emu_take_reports.restype = ctypes.c_int
        self.lib.sw_emu_take_launched.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        self.lib.sw_emu_take_launched.restype = ctypes.c_int

    def _take(self, fn):
        buf = ctypes.create_string_buffer(1 << 16)
        n = fn(buf, len(buf))
        return [r for r in buf.value.decode(errors="replace").split("\n") if r][:n]

    def take_reports(self):
        return self._take(self.lib.sw_emu_take_reports)

    def take_launched(self):
        return self._take(self.lib.sw_emu_take_launched)

    @contextlib.contextmanager
    def active(self, schedule=IN_ORDER, seed=0, blocks=None, expect_reports=False):
        """blocks=(first, last): run only those blocks of each launch (the index-overflow checks)."""
        import importlib

        # by module path: seqwrap.ops re-exports functions under the same names
        library, sampler, ssd_scan = (importlib.import_module(f"seqwrap.ops.{m}") for m in ("library", "sampler", "ssd_scan"))

        first, last = blocks if blocks is not None else (0, -1)
        self.lib.sw_emu_configure(schedule, seed, first, last)
        self.take_reports()
        self.take_launched()
        orig = (library.C, sampler.C, ssd_scan._C, library._scan_work, ssd_scan._work, library.cross_entropy_chunk)
        chunk = library.cross_entropy_chunk

        def scan_work(u, dstate, block, comp):
            return torch.empty(u.shape[0] * u.shape[1] * (block + 7) * dstate, dtype=comp)

        def ssd_work(x, dstate, block, comp):
            batch, _, heads, headdim = x.shape
            return torch.empty(batch * heads * headdim * (block + 7) * dstate, dtype=comp)

        def cross_entropy_chunk(logits, labels, *rest):
            *args, flag, start = rest
            own = flag is None
            flag = torch.zeros(1, dtype=torch.int32) if own else flag
            chunk(logits, labels, *args, flag, start)
            if own and int(flag.item()):
                raise ValueError("seqwrap.linear_cross_entropy: a label is outside [0, vocab) (emulated device flag)")

        library.C = sampler.C = ssd_scan._C = self.module
        library._scan_work, ssd_scan._work, library.cross_entropy_chunk = scan_work, ssd_work, cross_entropy_chunk
        run = Run()
        try:
            yield run
        finally:
            (library.C, sampler.C, ssd_scan._C, library._scan_work, ssd_scan._work, library.cross_entropy_chunk) = orig
            self.lib.sw_emu_configure(IN_ORDER, 0, 0, -1)
            run.reports = self.take_reports()
            run.launched = self.take_launched()
        if run.reports and not expect_reports:
            raise EmulatorReport(f"emulator ({SCHEDULE_NAMES[schedule]} schedule) reported:\n" + "\n".join(run.reports))
