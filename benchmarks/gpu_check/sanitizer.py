"""Section "sanitizer": compute-sanitizer memcheck, racecheck and synccheck over sanitize_target.py,
checking seqwrap's own kernels (names starting sw_) only.

compute-sanitizer is looked for in $SEQWRAP_COMPUTE_SANITIZER, on PATH, next to nvcc, in CUDA homes and in
the nvidia-* Python wheels; when missing it is pip-installed into build/gpu-check-tools (the PyPI name is
nvidia-cuda-sanitizer-api for CUDA 13, nvidia-cuda-sanitizer-api-cu12 for CUDA 12; from the wheels in
$SEQWRAP_GPU_WHEELS when that folder is given). When it cannot be found or installed the section says so
and is reported as skipped; it never stops the run."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .context import Context, log
from .report import Result

TITLE = "compute-sanitizer"
TOOLS = ("memcheck", "racecheck", "synccheck")
ERROR_EXIT = 86
NAME = "compute-sanitizer"


def system_candidates() -> list[Path]:
    """$SEQWRAP_COMPUTE_SANITIZER, PATH, next to nvcc, CUDA homes."""
    out = []
    env = os.environ.get("SEQWRAP_COMPUTE_SANITIZER")
    if env:
        out.append(Path(env))
    on_path = shutil.which(NAME)
    if on_path:
        out.append(Path(on_path))
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    homes += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]
    for home in filter(None, homes):
        out += [Path(home) / "bin" / NAME, Path(home) / "compute-sanitizer" / NAME]
    return out


def wheel_candidates(roots) -> list[Path]:
    """The pip wheels' layouts under site folders: nvidia/cu13/compute-sanitizer/compute-sanitizer (CUDA 13),
    nvidia/cuda_sanitizer_api/compute-sanitizer/compute-sanitizer (CUDA 12), nvidia/*/bin/compute-sanitizer."""
    out = []
    for root in roots:
        if root and os.path.isdir(os.path.join(root, "nvidia")):
            out += [Path(p) for p in sorted(glob.glob(os.path.join(root, "nvidia", "*", "compute-sanitizer", NAME)))]
            out += [Path(p) for p in sorted(glob.glob(os.path.join(root, "nvidia", "*", "bin", NAME)))]
    return out


def locate(extra_dirs=(), system: bool = True) -> Path | None:
    """The first executable compute-sanitizer: system places, then the wheels in extra_dirs and sys.path."""
    found = (system_candidates() + wheel_candidates([*extra_dirs, *sys.path])) if system else \
        wheel_candidates(extra_dirs)
    for c in found:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def pip_name(cuda_version: str | None) -> str:
    major = int((cuda_version or "13").split(".")[0])
    return "nvidia-cuda-sanitizer-api" if major >= 13 else f"nvidia-cuda-sanitizer-api-cu{major}"


def install(ctx: Context, package: str) -> tuple[Path | None, str]:
    """pip-installs `package` into build/gpu-check-tools; (its binary or None, what happened)."""
    target = ctx.root / "build" / "gpu-check-tools"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(target), "--retries", "0", "--timeout", "10"]
    wheels = os.environ.get("SEQWRAP_GPU_WHEELS")
    if wheels:
        cmd += ["--no-index", "--find-links", wheels]
    cmd.append(package)
    log(" ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(120, max(10, ctx.left() / 3)))
    except subprocess.TimeoutExpired:
        return None, f"pip install {package} timed out"
    if proc.returncode != 0:
        return None, f"pip install {package} failed: {(proc.stderr or proc.stdout).strip()[-200:]}"
    found = locate([str(target)])
    return found, (f"pip-installed {package} into {target}" if found else
                   f"pip installed {package} but no {NAME} binary was found in {target}")


def accepts(binary: Path, *option: str) -> bool:
    """Whether this compute-sanitizer takes the option (and value): options are parsed before --version."""
    try:
        return subprocess.run([str(binary), *option, "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def summary_of(output: str) -> tuple[int | None, str]:
    """(errors reported, the tool's summary line) from compute-sanitizer's output."""
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", output)
    if m:
        return int(m.group(2)), m.group(0)
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", output)
    if m:
        return int(m.group(1)), m.group(0)
    return None, "no summary line"


def run(ctx: Context) -> Result:
    r = Result("sanitizer", TITLE)
    where = r.table("Where compute-sanitizer was looked for", ["step", "result"])
    binary = locate()
    where.add("search (env, PATH, CUDA homes, nvidia wheels)", str(binary) if binary else "not found")
    if ctx.dry:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check.sanitize_target", "--device", "cpu"],
                              cwd=ctx.root, capture_output=True, text=True, timeout=max(10, ctx.left()))
        where.add("workload on the CPU, without sanitizer", "ok" if proc.returncode == 0 else proc.stdout[-300:])
        if proc.returncode != 0:
            r.fail(f"the sanitizer workload failed on the CPU: {proc.stdout.strip()[-300:]}")
            return r
        r.skip(f"dry run: no GPU; the workload ran on the CPU; {NAME} " + (f"at {binary}" if binary else "not found"))
        return r
    if binary is None:
        import torch

        binary, what = install(ctx, pip_name(torch.version.cuda))
        where.add("pip install", what)
    if binary is None:
        r.skip(f"{NAME} not available: not found on this machine and not installable ({where.rows[-1][1]})")
        return r
    common = ["--error-exitcode", str(ERROR_EXIT), "--print-limit", "50"]
    if accepts(binary, "--kernel-name", "kns=sw_"):
        common += ["--kernel-name", "kns=sw_"]   # seqwrap's kernels only: torch's are not ours to check
    else:
        where.add("kernel filter", "this compute-sanitizer takes no --kernel-name kns=: every kernel is checked")
    if accepts(binary, "--report-api-errors", "no"):
        common += ["--report-api-errors", "no"]  # torch probes the runtime with calls that may fail by design
    else:
        where.add("API errors", "--report-api-errors no not accepted: the tool's default applies")
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    where.add("version", version[-1] if version else "unknown")
    t = r.table("Tools over benchmarks/gpu_check/sanitize_target.py (kernels sw_*)",
                ["tool", "exit code", "errors", "summary line", "workload", "seconds"])
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # one allocation per tensor: overruns are visible
    for i, tool in enumerate(TOOLS):
        left = ctx.left() - 5
        limit = left / (len(TOOLS) - i)
        if limit < 15:
            t.add(tool, None, None, "not run: no time left", None, None)
            r.fail(f"{tool} not run: no time left")
            continue
        cmd = [str(binary), "--tool", tool, *common, sys.executable, "-m", "benchmarks.gpu_check.sanitize_target"]
        log(" ".join(cmd))
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ctx.root, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=limit)
            output, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output, code = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), None
        seconds = time.monotonic() - t0
        for line in output.splitlines()[-60:]:
            log(f"{tool}: {line}")
        errors, line = summary_of(output)
        ran = sum(1 for ln in output.splitlines() if ln.startswith("sanitize_target:") and ln.endswith(" ok"))
        t.add(tool, code if code is not None else "timeout", errors, line, f"{ran}/5 kernels ok", seconds)
        if code is None:
            r.fail(f"{tool} timed out after {limit:.0f} s")
        elif code != 0 or errors:
            r.fail(f"{tool}: exit {code}, {line}")
    r.summary = "; ".join(f"{row[0]}: {row[2]} errors" for row in t.rows)
    return r
