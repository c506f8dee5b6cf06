"""Section "emulator": the same kernels under the host emulation of CUDA (tests/cuda_emu), beside the
device's kernel table: tests/test_cuda_emulated.py (each kernel against the CPU kernel and the float64
reference with tests/test_cuda_kernels.py's tolerances, under three schedules: in order, reversed,
seeded random; any race or shuffle report fails a test), a compact subset (every kernel; float32 and
float64 cases, no 256K vocabulary). It runs alike on the GPU machine and in a dry run. When the emulated
library cannot be built (no g++ there), the section is skipped with the reason, not failed."""
from __future__ import annotations

import pytest

from .context import Context
from .kernels import Outcomes
from .report import Result

TITLE = "Kernels under the CUDA emulator"
SUBSET = "(float32 or float64 or dtype0 or kahan or sampler or empty_rows or every_cuda or bad_label) and not 262147"
# test name prefix -> kernel (the keys of tests/test_cuda_kernels.py's TOLERANCES)
PREFIXES = {"test_cross_entropy": "cross_entropy", "test_kahan": "kahan", "test_lse_merge": "lse_merge (chunked_attention)",
            "test_selective_scan": "selective_scan", "test_sampler": "sampler"}


def run(ctx: Context) -> Result:
    r = Result("emulator", TITLE)
    try:
        from tests.cuda_emu import build
        so = build.build("plain")
    except Exception as exc:   # no compiler, or it failed: said, not fatal to the GPU check
        r.skip(f"skipped: the emulated kernels could not be built ({type(exc).__name__}: {str(exc)[:300]})")
        return r
    plugin = Outcomes()
    code = pytest.main([str(ctx.root / "tests" / "test_cuda_emulated.py"), "-k", SUBSET, "-p", "no:cacheprovider",
                        "-q", "--rootdir", str(ctx.root)], plugins=[plugin])
    from tests.test_cuda_kernels import TOLERANCES

    per = {k: {"passed": 0, "failed": 0, "seconds": 0.0} for k in TOLERANCES}
    for test, o in plugin.tests.items():
        name = test.split("::")[-1]
        kernel = next((k for p, k in PREFIXES.items() if name.startswith(p)), None)
        if kernel is None:
            continue
        per[kernel]["passed" if o["outcome"] == "passed" else "failed"] += 1
        per[kernel]["seconds"] += o["seconds"]
    t = r.table("Emulated kernels (tests/test_cuda_emulated.py, 3 schedules each)",
                ["kernel", "emulator: tests passed", "emulator: failed", "tolerance vs CPU kernel",
                 "tolerance vs float64", "seconds"],
                note=f"library {so.parent.name}; compare with the device's table in 'Kernel checks' above. "
                     "The emulator checks index arithmetic, barriers, shuffles, shared-memory and global-memory "
                     "races; not the hardware, nvcc's code generation, streams or speed.")
    for kernel, (vs_cpu, vs_ref) in TOLERANCES.items():
        c = per[kernel]
        t.add(kernel, c["passed"], c["failed"], vs_cpu, vs_ref, round(c["seconds"], 2))
    r.data["emulated"] = per
    failed = sum(c["failed"] for c in per.values())
    missing = [k for k, c in per.items() if c["passed"] + c["failed"] == 0]
    r.summary = f"{sum(c['passed'] for c in per.values())} emulated kernel tests passed, {failed} failed (pytest exit {int(code)})"
    if failed or int(code) != 0:
        r.fail(f"{failed} emulated kernel tests failed (pytest exit {int(code)})")
    if missing:
        r.fail("no emulated test ran for: " + ", ".join(missing))
    return r
