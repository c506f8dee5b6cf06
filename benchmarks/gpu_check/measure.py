"""Timing and device memory the same way on a GPU and (for the dry run) on a CPU."""
from __future__ import annotations

import gc
import time

import torch

MiB = 2**20


class Meter:
    """Synchronised wall time and, on CUDA, torch.cuda.max_memory_allocated around one region."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def clean(self) -> None:
        """Frees what the last case left (cached blocks too) and restarts the peak."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def run(self, fn) -> tuple[float, int | None, object]:
        """(seconds, peak bytes allocated during fn or None on a CPU, fn's result)."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, self.peak(), out


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def mib(nbytes) -> float | None:
    return None if nbytes is None else nbytes / MiB


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double().to(a.device)
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num
