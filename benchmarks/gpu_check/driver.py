"""The GPU check: build, kernel checks, engines on the device, compute-sanitizer, cross-entropy and
engine benchmarks, one process per section, inside one time budget. Writes gpu_check.md (tables),
gpu_check.json (the numbers) and gpu_check.log (everything printed) to the output folder.

    python -m benchmarks.gpu_check [--dry] [--out DIR] [--budget SECONDS] [--sections a,b]

Exit status: 0 when every section passed (a dry run: every section that can run on a CPU),
1 when a check failed, a section crashed or ran out of time, 2 without a CUDA device (not --dry).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .context import ROOT
from .report import FAILED, Result, render, write_json


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    gpu_s: float     # longest it may run on the GPU machine
    dry_s: float     # ... in a dry run
    floor_s: float   # kept free for it while earlier sections run


# In order; on an H200 the whole plan is expected to take about 7-8 minutes (build ~1.5, kernels
# ~0.5, emulator ~1 (its build and tests/test_cuda_emulated.py's compact subset), engines ~0.5, sanitizers ~1.5, cross-entropy ~0.7, engine benchmark: the time left).
# Dry limits are several times what a dry run takes on an idle 2-core machine (about 45 s in all), so
# a loaded CI machine does not time out.
PLAN = [
    Section("build", "Build", 300, 90, 30),
    Section("kernels", "Kernel checks", 150, 90, 20),
    Section("emulator", "Kernels under the CUDA emulator", 120, 150, 20),
    Section("engines", "Engines on the device", 150, 120, 20),
    Section("sanitizer", "compute-sanitizer", 200, 60, 20),
    Section("cross_entropy", "Cross-entropy benchmark", 120, 90, 20),
    Section("engine_bench", "Engine benchmark", 240, 120, 45),
]
GPU_BUDGET_S = 540   # under 10 minutes (one device command) with the interpreter starts
DRY_BUDGET_S = 520


def default_out(dry: bool) -> Path:
    env = os.environ.get("SEQWRAP_GPU_OUT")
    if env:
        return Path(env)
    return ROOT / ("build/gpu-check-dry" if dry else "benchmarks/results/gpu")


class Log:
    """Every line to the console and, once open() was called, to gpu_check.log (lines before are kept)."""

    def __init__(self):
        self.f = None
        self.held: list[str] = []
        self.lock = threading.Lock()

    def open(self, path: Path) -> None:
        with self.lock:
            self.f = path.open("w")
            self.f.write("".join(line + "\n" for line in self.held))
            self.f.flush()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            if self.f is None:
                self.held.append(line)
            else:
                self.f.write(line + "\n")
                self.f.flush()


def run_section(sec: Section, dry: bool, out: Path, budget: float, log: Log, tmp: Path) -> Result:
    result_path = tmp / f"{sec.name}.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check.section", sec.name, "--result", str(result_path),
           "--out", str(out), "--budget", f"{max(budget - 10, 5):.0f}"] + (["--dry"] if dry else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if dry:  # toy sizes: one thread is faster than several waiting for each other (and CI machines are shared)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log(f"== {sec.title} (limit {budget:.0f} s): {' '.join(cmd[2:])}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout ends its children too
    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            del tail[:-30]
            log(f"[{sec.name}] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=10)
    seconds = time.monotonic() - t0
    if result_path.exists():
        result = Result.from_json(json.loads(result_path.read_text()))
    else:
        result = Result(sec.name, sec.title, status="error",
                        summary=f"the section's process exited {proc.returncode} without a result: "
                                + " / ".join(tail[-3:])[-400:])
    if timed_out:
        result.status = "timeout"
        result.summary = f"stopped after {budget:.0f} s (its time limit); results so far kept. " + result.summary
    result.title, result.seconds = sec.title, seconds
    log(f"== {sec.title}: {result.status} in {seconds:.0f} s. {result.summary}")
    return result


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def header(dry: bool, results: list[Result], started: str) -> list[str]:
    mode = "dry run: CPU, toy sizes (checks the script's structure; no GPU numbers)" if dry else "GPU"
    lines = [f"- mode: {mode}", f"- started: {started} UTC; commit {git_commit()}; host {platform.node()}"]
    env = next((r.data.get("environment") for r in results if r.name == "build"), None)
    if env:
        lines.append("- " + "; ".join(f"{k}: {v}" for k, v in env.items()))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU dry run at toy sizes (tests the script's structure)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $SEQWRAP_GPU_OUT, else "
                   "benchmarks/results/gpu, or build/gpu-check-dry for --dry)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run")
    p.add_argument("--sections", default=None, help="comma-separated subset of: " + ",".join(s.name for s in PLAN))
    a = p.parse_args(argv)
    out = (a.out or default_out(a.dry)).resolve()
    budget = a.budget or (DRY_BUDGET_S if a.dry else GPU_BUDGET_S)
    wanted = set(a.sections.split(",")) if a.sections else {s.name for s in PLAN}
    plan = [s for s in PLAN if s.name in wanted or s.name == "build"]
    log = Log()   # nothing is written to `out` before a GPU was found (or in a dry run): no GPU, no files
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    deadline = time.monotonic() + budget
    log(f"seqwrap GPU check ({'dry run' if a.dry else 'GPU'}), budget {budget:.0f} s, output {out}")
    results: list[Result] = []

    def write():
        if log.f is None:
            out.mkdir(parents=True, exist_ok=True)
            log.open(out / "gpu_check.log")
        (out / "gpu_check.md").write_text(render(header(a.dry, results, started), results))
        write_json(out / "gpu_check.json", header(a.dry, results, started), results)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for i, sec in enumerate(plan):
            later = sum(s.floor_s for s in plan[i + 1:])
            limit = min(sec.dry_s if a.dry else sec.gpu_s, deadline - time.monotonic() - later)
            if sec is plan[-1]:
                limit = deadline - time.monotonic()  # the last one (the engine benchmark) takes what is left
            if limit < sec.floor_s / 2:
                results.append(Result(sec.name, sec.title, status="timeout",
                                      summary=f"not run: {limit:.0f} s left of the {budget:.0f} s budget"))
            else:
                results.append(run_section(sec, a.dry, out, limit, log, Path(tmp)))
            if sec.name == "build" and results[-1].data.get("no_gpu"):
                log(f"gpu_check: {results[-1].summary}. Nothing was checked and nothing written to {out}. "
                    "`make gpu-check-dry` runs the same script on the CPU at toy sizes.")
                return 2
            write()
    bad = [r for r in results if r.status in FAILED or (r.status == "skipped" and not a.dry)]
    log("")
    log("| section | status | seconds | summary |")
    log("|---|---|---:|---|")
    for r in results:
        log(f"| {r.title} | {r.status} | {r.seconds:.0f} | {r.summary} |")
    log(f"gpu_check: {'all checks passed' if not bad else 'NOT passed: ' + ', '.join(r.title for r in bad)}; "
        f"tables in {out / 'gpu_check.md'}")
    return 1 if bad else 0
