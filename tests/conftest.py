"""Shared fixtures: the DLPack bridge path, and the sanitizer-build guard."""
import os

import pytest
import torch

import seqwrap


@pytest.fixture(params=["fast", "capsule"])
def bridge(request):
    """Runs a test once through torch's DLPack C exchange API and once through capsules."""
    C = seqwrap._C
    if request.param == "fast" and not C.build_info()["dlpack_fast_path"]:
        pytest.skip("the installed torch has no DLPack C exchange API")
    C._set_bridge_mode("auto" if request.param == "fast" else "capsule")
    assert C._bridge_mode() == request.param
    yield request.param
    C._set_bridge_mode("auto")


def pytest_sessionstart(session):
    # `make asan` sets SEQWRAP_EXPECT_SANITIZE=1: make sure the sanitized build is the one loaded.
    if os.environ.get("SEQWRAP_EXPECT_SANITIZE") == "1":
        info = seqwrap._C.build_info()
        if not info["sanitize"]:
            raise pytest.UsageError(f"expected the sanitizer build of seqwrap._C, got {seqwrap._C.__file__}")


cuda_usable = torch.cuda.is_available() and seqwrap.cuda_status().usable


def requires_cuda(test):
    """Marks a test `cuda` (selected by `pytest -m cuda`, as `make gpu-check` does) and skips it
    without a CUDA device that seqwrap's kernels can run on."""
    test = pytest.mark.skipif(not cuda_usable, reason="needs a CUDA device that seqwrap's kernels can run on")(test)
    return pytest.mark.cuda(test)
