"""Build of seqwrap._C: C11 sources with gcc/clang, CUDA sources with nvcc.

Environment:
  SEQWRAP_CUDA=0          CPU-only build even where nvcc is found
  SEQWRAP_CUDA_ARCH="80;90"  architectures for nvcc (SASS for each, PTX for the last)
  SEQWRAP_SANITIZE=1      AddressSanitizer + UBSan build (CPU only; see Makefile `asan`)
  CUDA_HOME               where to look for nvcc before PATH

torch must already be installed (its include directory provides ATen/dlpack.h);
install with `pip install --no-build-isolation .` so pip does not fetch another torch.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SUMMARY = ROOT / "build" / "build-summary.txt"


def log(msg):
    """Print a build decision and keep it in build/build-summary.txt."""
    print(f"seqwrap: {msg}", flush=True)
    SUMMARY.parent.mkdir(exist_ok=True)
    with SUMMARY.open("a") as f:
        f.write(msg + "\n")


def torch_include_dir():
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "seqwrap: torch is not installed. Install torch first (e.g. `pip install torch==2.13.0`), "
            "then `pip install --no-build-isolation .`"
        )
    inc = Path(list(spec.submodule_search_locations)[0]) / "include"
    if not (inc / "ATen" / "dlpack.h").exists():
        sys.exit(f"seqwrap: {inc}/ATen/dlpack.h not found; this torch install has no C headers")
    return inc


def find_nvcc():
    if os.environ.get("SEQWRAP_CUDA", "").strip() == "0":
        return None, "SEQWRAP_CUDA=0"
    if os.environ.get("SEQWRAP_SANITIZE", "").strip() == "1":
        return None, "sanitizer build is CPU-only"
    for home in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]):
        cand = Path(home) / "bin" / "nvcc"
        if cand.exists():
            return cand, None
    found = shutil.which("nvcc")
    return (Path(found).resolve(), None) if found else (None, "nvcc not found on PATH or CUDA_HOME")


def find_cudart_static(nvcc):
    """The lib directory holding libcudart_static.a, next to nvcc or in a CUDA home."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(nvcc.parent.parent), "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (Path(home) / sub / "libcudart_static.a").exists():
                return Path(home) / sub
    sys.exit(f"seqwrap: nvcc found at {nvcc} but not libcudart_static.a; set CUDA_HOME or SEQWRAP_CUDA=0")


def cuda_archs():
    raw = os.environ.get("SEQWRAP_CUDA_ARCH", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        sys.exit(f"seqwrap: SEQWRAP_CUDA_ARCH={raw!r} is not a list like '80;90'")
    return archs


SANITIZE = os.environ.get("SEQWRAP_SANITIZE", "").strip() == "1"
# Warnings are errors in development and CI builds (the Makefile sets SEQWRAP_WERROR=1), not in a
# user's `pip install`: a newer compiler's new warning must not break installation.
WERROR = os.environ.get("SEQWRAP_WERROR", "").strip() == "1"
SAN_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
C_FLAGS = ["-std=c11", "-Wall", "-Wextra", *(["-Werror"] if WERROR else []), "-fopenmp", "-fvisibility=hidden"]
C_FLAGS += (["-O1", "-g"] + SAN_FLAGS) if SANITIZE else ["-O3"]


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc (when found) and links them in."""

    def build_extension(self, ext):
        SUMMARY.unlink(missing_ok=True)
        nvcc, why_not = find_nvcc()
        cu_sources = sorted(CSRC.glob("*/*.cu"))  # csrc/cuda/ and the op folders
        if nvcc is None:
            log(f"CUDA kernels skipped ({why_not}); CPU-only build")
            ext.sources = [s for s in ext.sources if s != "csrc/cuda_absent.c"] + ["csrc/cuda_absent.c"]
        else:
            ext.sources = [s for s in ext.sources if s != "csrc/cuda_absent.c"]
            archs = cuda_archs()
            objs = self.compile_cuda(nvcc, cu_sources, archs)
            cuda_lib = find_cudart_static(nvcc)
            ext.extra_objects = objs
            ext.depends = list(ext.depends) + objs  # relink when a CUDA object changes
            ext.library_dirs = [str(cuda_lib)]
            # Static runtime: importing seqwrap needs no libcudart.so, and no driver.
            ext.libraries = ["cudart_static", "stdc++", "dl", "rt", "pthread"]
            ext.define_macros = [("SEQWRAP_CUDA_ARCHS", f'"{";".join(archs)}"')]
        if SANITIZE:
            ext.define_macros = list(ext.define_macros or []) + [("SEQWRAP_SANITIZE", "1")]
            log("sanitizer build: -fsanitize=address,undefined")
        log(f"C flags: {' '.join(C_FLAGS)}")
        super().build_extension(ext)

    def compile_cuda(self, nvcc, sources, archs):
        version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.strip()
        log(f"nvcc found at {nvcc} ({version.splitlines()[-1] if version else 'unknown version'})")
        log(f"building CUDA kernels for sm_{', sm_'.join(archs)} (+ PTX for compute_{archs[-1]})")
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objs = []
        headers = list(CSRC.glob("*.h")) + list(CSRC.glob("*/*.h")) + list(CSRC.glob("*.inc")) + list((CSRC / "cuda").glob("*.cuh"))
        newest_header = max((h.stat().st_mtime for h in headers), default=0)
        for src in sources:
            obj = out_dir / (src.stem + ".o")
            fresh = obj.exists() and obj.stat().st_mtime > max(src.stat().st_mtime, newest_header)
            if not fresh or self.force:
                host = "-fPIC,-Wall,-Wextra," + ("-Werror," if WERROR else "") + "-fvisibility=hidden"
                cmd = [str(nvcc), "-c", str(src), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", host,
                       *(["--Werror", "all-warnings"] if WERROR else []), *gencode]
                log("nvcc " + src.relative_to(ROOT).as_posix())
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            objs.append(str(obj))
        return objs


c_sources = sorted(str(p.relative_to(ROOT)) for p in [*CSRC.glob("*.c"), *CSRC.glob("*/*.c")])

setup(
    ext_modules=[
        Extension(
            "seqwrap._C",
            sources=c_sources,
            include_dirs=[str(CSRC), str(torch_include_dir())],
            extra_compile_args=C_FLAGS,
            extra_link_args=["-fopenmp"] + (SAN_FLAGS if SANITIZE else []),
            depends=[str(p.relative_to(ROOT)) for p in [*CSRC.glob("*.h"), *CSRC.glob("*/*.h"), *CSRC.glob("*.inc")]],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
