"""Pieces of the GPU check that need no GPU: finding compute-sanitizer (PATH, CUDA homes, the pip wheels'
layouts), the PyPI name per CUDA major version, reading the tools' summary lines."""
import stat

import pytest

from benchmarks.gpu_check import sanitizer


def fake_binary(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize("layout", ["nvidia/cu13/compute-sanitizer/compute-sanitizer",
                                    "nvidia/cuda_sanitizer_api/compute-sanitizer/compute-sanitizer",
                                    "nvidia/cu13/bin/compute-sanitizer"])
def test_finds_the_wheel_layouts(tmp_path, layout):
    assert sanitizer.locate([str(tmp_path)], system=False) is None
    binary = fake_binary(tmp_path / layout)
    assert sanitizer.locate([str(tmp_path)], system=False) == binary


def test_skips_a_file_that_is_not_executable(tmp_path):
    f = tmp_path / "nvidia/cu13/compute-sanitizer/compute-sanitizer"
    f.parent.mkdir(parents=True)
    f.write_text("not a program")
    assert sanitizer.locate([str(tmp_path)], system=False) is None


def test_environment_variable_first(monkeypatch, tmp_path):
    binary = fake_binary(tmp_path / "tools" / "compute-sanitizer")
    monkeypatch.setenv("SEQWRAP_COMPUTE_SANITIZER", str(binary))
    assert sanitizer.locate() == binary


def test_pypi_name_per_cuda_major():
    assert sanitizer.pip_name("13.0") == "nvidia-cuda-sanitizer-api"
    assert sanitizer.pip_name("12.8") == "nvidia-cuda-sanitizer-api-cu12"
    assert sanitizer.pip_name("9.2") == "nvidia-cuda-sanitizer-api-cu9"


def test_reads_the_summary_lines():
    assert sanitizer.summary_of("x\n========= ERROR SUMMARY: 0 errors\n") == (0, "ERROR SUMMARY: 0 errors")
    assert sanitizer.summary_of("========= ERROR SUMMARY: 3 errors") == (3, "ERROR SUMMARY: 3 errors")
    race = "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)"
    assert sanitizer.summary_of(race) == (1, race.split("= ")[1])
    assert sanitizer.summary_of("crashed before the end") == (None, "no summary line")
