"""Section "kernels": every test marked `cuda` (tests/conftest.py's requires_cuda), run with pytest in this
process: each kernel against the CPU kernel and its float64 reference in seqwrap.ops.reference
(tests/test_cuda_kernels.py, with its per-kernel tolerances), the offload path with real streams, the fused
attention blocks, device-side errors.
On a GPU a skipped test is a failure (it means the kernels are not usable); a dry run only collects."""
from __future__ import annotations

import pytest

from .context import Context
from .report import Result

TITLE = "Kernel checks"


def cuda_test_files(ctx: Context) -> list[str]:
    """Test files that use requires_cuda (collecting only these keeps the run short)."""
    return [str(f.relative_to(ctx.root)) for f in sorted((ctx.root / "tests").glob("test_*.py"))
            if "requires_cuda" in f.read_text()]


class Outcomes:
    """pytest plugin: the collected test ids and each test's outcome."""

    def __init__(self):
        self.collected: list[str] = []
        self.tests: dict[str, dict] = {}

    def pytest_collection_finish(self, session):
        self.collected = [item.nodeid for item in session.items]

    def pytest_runtest_logreport(self, report):
        t = self.tests.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0, "message": ""})
        t["seconds"] += report.duration
        if report.failed:
            t["outcome"] = "failed" if report.when == "call" else "error"
            t["message"] = str(report.longrepr).strip().splitlines()[-1][:200] if report.longrepr else ""
        elif report.skipped and t["outcome"] == "passed":
            t["outcome"] = "skipped"
            t["message"] = str(report.longrepr[-1])[:200] if isinstance(report.longrepr, tuple) else ""


def run(ctx: Context) -> Result:
    r = Result("kernels", TITLE)
    files = cuda_test_files(ctx)
    plugin = Outcomes()
    args = [*files, "-m", "cuda", "-p", "no:cacheprovider", "-q", "-rA", "--rootdir", str(ctx.root)]
    code = pytest.main(args + (["--collect-only"] if ctx.dry else []), plugins=[plugin])
    from tests.test_cuda_kernels import TOLERANCES   # imported by the run above

    t = r.table("Tolerances (tests/test_cuda_kernels.py)", ["kernel", "CUDA vs CPU kernel",
                                                                   "CUDA vs float64 reference (seqwrap.ops.reference)"])
    for kernel, (vs_cpu, vs_ref) in TOLERANCES.items():
        t.add(kernel, vs_cpu, vs_ref)
    if ctx.dry:
        if code != 0 or not plugin.collected:
            r.fail(f"collecting the CUDA tests failed (pytest exit {int(code)})")
            return r
        t = r.table("CUDA tests (collected, not run)", ["test", "outcome"])
        for test in plugin.collected:
            t.add(test, "not run (no GPU)")
        r.skip(f"dry run: {len(plugin.collected)} CUDA tests collected from {len(files)} files, not run (no GPU)")
        return r
    t = r.table("CUDA tests", ["test", "outcome", "seconds", "message"])
    for test, o in plugin.tests.items():
        t.add(test, o["outcome"], o["seconds"], o["message"])
    counts = {k: sum(1 for o in plugin.tests.values() if o["outcome"] == k)
              for k in ("passed", "failed", "error", "skipped")}
    r.data["counts"] = counts
    r.summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" (pytest exit {int(code)})"
    if not plugin.tests:
        r.fail(f"no CUDA test ran (pytest exit {int(code)})")
    if counts["failed"] or counts["error"]:
        r.fail(f"{counts['failed'] + counts['error']} CUDA tests failed")
    if counts["skipped"]:
        r.fail(f"{counts['skipped']} CUDA tests skipped on a GPU machine (seqwrap's kernels not usable?)")
    return r
