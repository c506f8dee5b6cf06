"""Whether seqwrap's CUDA kernels were built, and whether a GPU here can run them."""
from __future__ import annotations

from dataclasses import dataclass, field

from ._ext import C


@dataclass(frozen=True)
class CudaStatus:
    built: bool                 # CUDA kernels compiled into seqwrap._C
    usable: bool                # built, and at least one visible device can run them
    archs: tuple[int, ...]      # compute capabilities compiled as SASS, e.g. (80, 90)
    runtime_version: int        # CUDA runtime linked into seqwrap, e.g. 13000
    driver_version: int         # CUDA version the driver supports, 0 without a driver
    devices: tuple[int, ...] = field(default_factory=tuple)  # capability per visible device
    reason: str = ""            # why not usable, in words

    def __str__(self) -> str:
        state = "usable" if self.usable else f"not usable ({self.reason})"
        built = f"built for sm_{', sm_'.join(map(str, self.archs))}" if self.built else "not built"
        return f"seqwrap CUDA kernels: {built}; {state}"


def _runs_on(capability: int, archs: tuple[int, ...]) -> bool:
    """SASS for sm_XY runs on X.Y' with Y' >= Y; the PTX of the newest arch JITs for newer GPUs."""
    if not archs:
        return False
    same_major = any(capability // 10 == a // 10 and capability >= a for a in archs)
    return same_major or capability >= max(archs)


def cuda_status() -> CudaStatus:
    """Reports the CUDA build of seqwrap and the devices its runtime can see."""
    info = C.cuda_info()
    archs = tuple(int(a) for a in C.build_info()["cuda_archs"].split(";") if a)
    devices = tuple(info["capabilities"])
    reason = ""
    if not info["built"]:
        reason = "seqwrap was built without nvcc (or with SEQWRAP_CUDA=0)"
    elif info["device_count"] == 0:
        reason = f"no CUDA device visible: {info['error'] or 'device count is 0'}"
    elif not any(_runs_on(c, archs) for c in devices):
        reason = f"no visible device (capabilities {devices}) matches the built architectures {archs}"
    return CudaStatus(
        built=bool(info["built"]),
        usable=not reason,
        archs=archs,
        runtime_version=info["runtime_version"],
        driver_version=info["driver_version"],
        devices=devices,
        reason=reason,
    )
