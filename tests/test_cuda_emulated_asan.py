"""The emulated CUDA kernels again, built with -fsanitize=address,undefined, in a child process with the
ASan runtime preloaded (as the Makefile's `asan` target runs the C core): device out-of-bounds indexing
and signed overflow in index arithmetic abort the child. A subset (float32 and float64 cases), and the
index-overflow checks (tests/test_cuda_emulated_overflow.py) past 2^31 elements."""
import os
import subprocess
import sys
from pathlib import Path

from .cuda_emu import build

ROOT = Path(__file__).resolve().parent.parent


def asan_env():
    """The environment of a child that loads a sanitized emulated build."""
    libs = [subprocess.run(["gcc", f"-print-file-name={n}"], capture_output=True, text=True).stdout.strip()
            for n in ("libasan.so", "libubsan.so")]
    return dict(os.environ, LD_PRELOAD=" ".join(libs), SEQWRAP_EMU_MODE="asan", OMP_NUM_THREADS="1",
                ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
                PYTHONPATH=str(ROOT))


def test_emulated_kernels_under_asan_and_ubsan():
    build.build("asan")  # built here, so that a compile error shows as such
    env = asan_env()
    # the index-overflow checks too: UBSan's signed-overflow check sees their index arithmetic past 2^31
    r = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_cuda_emulated.py"),
                        str(ROOT / "tests" / "test_cuda_emulated_overflow.py"), "-q", "-x", "-p", "no:cacheprovider",
                        "-k", "dtype0 or float32 or sampler or empty_rows or kahan or past_2_31"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
