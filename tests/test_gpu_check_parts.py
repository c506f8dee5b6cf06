"""Pieces of the GPU check that need no GPU: finding compute-sanitizer (PATH, CUDA homes, the pip wheels'
layouts), the PyPI name per CUDA major version, reading the tools' summary lines."""
import stat

import pytest

from benchmarks.gpu_check import sanitizer
from benchmarks.gpu_check.context import Context


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


def stand_in(tmp_path, report: str, code: int):
    """A compute-sanitizer stand-in: accepts every option, prints what a run of the workload would and the
    given summary line, exits with `code`."""
    lines = "\n".join(f"echo 'sanitize_target: {k} ok'" for k in
                      ("kahan", "cross_entropy", "lse_merge", "selective_scan", "sampler"))
    script = tmp_path / "compute-sanitizer"
    script.write_text(f"#!/bin/sh\ncase \"$*\" in *--version*) echo 'Version 2026.1'; exit 0;; esac\n"
                      f"echo \"args: $*\"\n{lines}\necho '========= {report}'\nexit {code}\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("report, code, status", [("ERROR SUMMARY: 0 errors", 0, "pass"),
                                                  ("ERROR SUMMARY: 2 errors", 86, "fail")])
def test_sanitizer_section_runs_each_tool_and_reads_its_verdict(monkeypatch, tmp_path, report, code, status):
    monkeypatch.setenv("SEQWRAP_COMPUTE_SANITIZER", str(stand_in(tmp_path, report, code)))
    ctx = Context(dry=False, out=tmp_path, budget_s=120)
    r = sanitizer.run(ctx)
    assert r.status == status, r.notes
    tools = next(t for t in r.tables if t.title.startswith("Tools"))
    assert [row[0] for row in tools.rows] == ["memcheck", "racecheck", "synccheck"]
    assert all(row[4] == "5/5 kernels ok" for row in tools.rows)
    assert [row[2] for row in tools.rows] == [report.split()[2]] * 3
