"""How much memory there is: free memory of a CUDA device, available memory of this machine.

    free_device_memory(torch.device("cuda:0"))   # bytes torch can still get on that GPU
    available_host_memory()                      # bytes this machine can still give (MemAvailable)

On a CPU device the two are one memory. Nothing here guesses: a device or platform it cannot read
raises, naming the argument to pass instead (device_memory= / host_memory=).
"""
from __future__ import annotations

import torch


def available_host_memory() -> int:
    """MemAvailable of /proc/meminfo (Linux); elsewhere psutil's virtual_memory().available."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        raise RuntimeError("seqwrap.plan: cannot read this machine's available memory (no /proc/meminfo, psutil not "
                           "installed): pass device_memory= / host_memory=") from None
    return int(psutil.virtual_memory().available)


def free_device_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device`: CUDA free memory plus what torch's caching allocator holds
    unused; on CPU the machine's available memory."""
    device = torch.device(device)
    if device.type == "cpu":
        return available_host_memory()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    raise RuntimeError(f"seqwrap.plan: cannot read the free memory of a {device.type} device: pass device_memory=")


def default_device() -> torch.device:
    """The device a config is planned for when no memory is given: the current CUDA device, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resident_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes the model's parameters and existing gradients already hold on `device`: counted by the plan's
    static terms, so they are added back to the free memory (each storage once)."""
    seen, total = set(), 0
    for p in model.parameters():
        for t in (p, p.grad):
            if t is None or t.device != device:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
