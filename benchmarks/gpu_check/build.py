"""Section "build": the machine, then seqwrap._C built for the visible GPU's architecture
(SEQWRAP_CUDA_ARCH from torch.cuda.get_device_capability), then seqwrap.cuda_status() (seqwrap is imported only then).
A dry run builds nothing and reports the build in place."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

from .context import Context, log
from .report import Result

TITLE = "Build"

def _version(dist: str) -> str:
    """Installed version from the package metadata (importing transformers costs seconds)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvcc() -> str:
    for home in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]):
        if os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or ""


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch CUDA": torch.version.cuda or "none",
           "transformers": _version("transformers"), "peft": _version("peft")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", memory=f"{p.total_memory / 2**30:.0f} GiB",
                   devices=torch.cuda.device_count())
    nvcc = _nvcc()
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        env["nvcc"] = out[-1] if out else nvcc
    else:
        env["nvcc"] = "not found"
    return env


def cuda_status() -> dict:
    """seqwrap.cuda_status(); this process imports seqwrap only here, after the build."""
    import seqwrap

    s = seqwrap.cuda_status()
    return {"status": str(s), "usable": s.usable, "archs": list(s.archs), "build_info": seqwrap._C.build_info()}


def run(ctx: Context) -> Result:
    r = Result("build", TITLE)
    try:
        import torch
    except ImportError as exc:
        r.data["no_gpu"] = True
        r.fail(f"torch is not importable by {sys.executable}")
        r.summary = f"no CUDA device: torch is not importable by {sys.executable} ({exc}); set GPU_PY"
        return r
    env = r.data["environment"] = environment()
    t = r.table("Machine and software", ["item", "value"])
    for k, v in env.items():
        t.add(k, v)
    if ctx.dry:
        st = cuda_status()
        t.add("seqwrap build", json.dumps(st["build_info"]))
        t.add("cuda_status()", st["status"])
        r.skip("dry run: no build for a GPU; the in-place build is used (" + st["status"] + ")")
        return r
    if not torch.cuda.is_available():
        r.data["no_gpu"] = True
        r.fail("no CUDA device visible to torch")
        r.summary = f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
        return r
    major, minor = torch.cuda.get_device_capability(0)
    arch = f"{major}{minor}"
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", f"build/gpu-sm{arch}"]
    log(f"SEQWRAP_CUDA_ARCH={arch} {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=ctx.root, env=dict(os.environ, SEQWRAP_CUDA_ARCH=arch), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=max(30, ctx.left() - 20))
    for line in proc.stdout.splitlines():
        log(line)
    t.add("build command", f"SEQWRAP_CUDA_ARCH={arch} {' '.join(cmd)}")
    if proc.returncode != 0:
        r.fail(f"the build failed (exit {proc.returncode}): {proc.stdout.strip()[-300:]}")
        r.summary = f"build for sm_{arch} failed"
        return r
    summary = ctx.root / "build" / "build-summary.txt"
    if summary.exists():
        for line in summary.read_text().splitlines():
            t.add("build", line)
    st = cuda_status()
    log(st["status"])
    t.add("cuda_status()", st["status"])
    r.data["cuda_status"] = st
    if not st["usable"] or int(arch) not in st["archs"]:
        r.fail(f"seqwrap's CUDA kernels are not usable here: {st['status']}")
    r.summary = f"sm_{arch}: {st['status']}"
    return r
