"""Runs one benchmark case in a fresh process and reports JSON on its last stdout line.

    python -m benchmarks.child MODULE:FUNCTION '{"json": "kwargs"}' [--mem-limit-gb G]

The function returns a dict; the child adds peak_rss_mb (ru_maxrss of this
process) and prints {"ok": true, ...}. A MemoryError / allocator failure under
the address-space limit is reported as {"ok": false, "error": "out of memory"}
instead of letting the kernel's OOM killer pick a victim.
"""
import importlib
import json
import resource
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(target: str, kwargs: dict, mem_limit_gb: float | None = None, timeout: float = 1800) -> dict:
    """Parent side: runs `target` ("module:function") with kwargs in a fresh interpreter."""
    cmd = [sys.executable, "-m", "benchmarks.child", target, json.dumps(kwargs)]
    if mem_limit_gb:
        cmd += ["--mem-limit-gb", str(mem_limit_gb)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def main():
    target, kwargs = sys.argv[1], json.loads(sys.argv[2])
    if "--mem-limit-gb" in sys.argv:
        limit = int(float(sys.argv[sys.argv.index("--mem-limit-gb") + 1]) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    module, func = target.split(":")
    try:
        result = getattr(importlib.import_module(module), func)(**kwargs)
        result.update(ok=True, peak_rss_mb=peak_rss_mb())
    except (MemoryError, RuntimeError) as exc:
        msg = str(exc)
        oom = isinstance(exc, MemoryError) or "can't allocate memory" in msg or "out of memory" in msg
        result = {"ok": False, "error": "out of memory" if oom else msg.splitlines()[0][:300]}
        if not oom:
            traceback.print_exc()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
