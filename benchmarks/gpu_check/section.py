"""Runs one section in this process and writes its Result as JSON (the driver starts one process per
section, so a crash, a CUDA error that poisons the context or an out-of-memory stays in it).

    python -m benchmarks.gpu_check.section NAME --result FILE --out DIR --budget SECONDS [--dry]
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from .context import Context
from .report import Result

MODULES = {
    "build": "benchmarks.gpu_check.build",
    "kernels": "benchmarks.gpu_check.kernels",
    "emulator": "benchmarks.gpu_check.emulated",
    "engines": "benchmarks.gpu_check.engines",
    "sanitizer": "benchmarks.gpu_check.sanitizer",
    "cross_entropy": "benchmarks.gpu_check.xent_bench",
    "engine_bench": "benchmarks.gpu_check.engine_bench",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=sorted(MODULES))
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--dry", action="store_true")
    a = p.parse_args(argv)
    ctx = Context(dry=a.dry, out=a.out, budget_s=a.budget, result_path=a.result)
    t0 = time.monotonic()
    try:
        mod = importlib.import_module(MODULES[a.name])
        result = mod.run(ctx)
    except BaseException as exc:  # recorded, never lost: the driver goes on with the next section
        traceback.print_exc()
        result = Result(a.name, a.name, status="error", summary=f"{type(exc).__name__}: {exc}"[:500])
    result.seconds = time.monotonic() - t0
    ctx.result_path = a.result
    ctx.checkpoint(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
