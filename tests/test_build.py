"""The package imports anywhere and tells the truth about its CUDA build."""
import os
import shutil
import subprocess
import sys

import pytest

import seqwrap
from seqwrap.cuda import _runs_on

pytestmark = pytest.mark.ccore


def test_version_and_build_info():
    assert seqwrap.__version__ == "0.1.0"
    info = seqwrap._C.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "openmp", "sanitize", "dlpack_fast_path"}
    assert info["openmp"] > 0, "the CPU kernels should be built with OpenMP"


@pytest.mark.skipif(os.environ.get("SEQWRAP_EXPECT_SANITIZE") == "1", reason="the sanitizer build is CPU-only")
def test_cuda_objects_built_when_nvcc_present():
    if shutil.which("nvcc") is None or os.environ.get("SEQWRAP_CUDA") == "0":
        pytest.skip("nvcc not on PATH (or SEQWRAP_CUDA=0): a CPU-only build is expected")
    info = seqwrap._C.build_info()
    assert info["cuda"] is True
    assert info["cuda_archs"].split(";") == ["80", "90"] or os.environ.get("SEQWRAP_CUDA_ARCH")
    assert info["cuda_runtime_version"] >= 11000


def test_cuda_status_is_consistent():
    st = seqwrap.cuda_status()
    assert isinstance(st, seqwrap.CudaStatus)
    if st.usable:
        assert st.built and st.devices
    else:
        assert st.reason, "an unusable build must say why"
    assert str(st).startswith("seqwrap CUDA kernels:")


def test_import_without_any_gpu_visible():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = "import seqwrap; s = seqwrap.cuda_status(); print(s.usable, s.built)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    usable, _built = out.stdout.split()
    assert usable == "False"


@pytest.mark.parametrize(
    "cap, archs, ok",
    [(80, (80, 90), True), (86, (80, 90), True), (89, (80, 90), True), (90, (80, 90), True),
     (100, (80, 90), True), (75, (80, 90), False), (70, (80,), False), (86, (), False)],
)
def test_arch_compatibility_rule(cap, archs, ok):
    assert _runs_on(cap, archs) is ok
