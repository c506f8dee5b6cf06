"""`make gpu-check-dry`: the GPU check (benchmarks/gpu_check) run on the CPU at toy sizes, in a
subprocess, into a temporary folder. Checks the report's structure: every section with its status, the
rows each section must produce, the log; and that without a GPU the real check says so and fails."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

STATUS = {"Build": "skipped", "Kernel checks": "skipped", "Kernels under the CUDA emulator": "pass", "Engines on the device": "pass",
          "compute-sanitizer": "skipped", "Cross-entropy benchmark": "pass", "Engine benchmark": "pass"}
ENGINE_CASES = {("SeCO", "full"), ("SeCO + offload", "full"), ("SeCO + MsT", "full"), ("SeCO", "LoRA + grad ckpt"),
                ("SeCO + offload (activations parked)", "LoRA + grad ckpt")}
KERNELS = {"kahan", "cross_entropy", "lse_merge (chunked_attention)", "selective_scan", "sampler"}
BENCH_METHODS = {"HF + grad ckpt", "SeCO", "SpaCO 1/8", "SeCO + offload", "SeCO + MsT"}


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-dry")
    proc = gpu_check(out, "--dry")
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    sections = {s["title"]: s for s in report["sections"]} if report else {}
    return proc, out, sections


def rows(section: dict, title_start: str) -> list[list[str]]:
    table = next(t for t in section["tables"] if t["title"].startswith(title_start))
    return table["rows"]


def test_dry_run_passes_and_writes_its_files(dry):
    proc, out, sections = dry
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert list(sections) == list(STATUS)
    assert {t: s["status"] for t, s in sections.items()} == STATUS
    md = (out / "gpu_check.md").read_text()
    assert "- mode: dry run" in md
    for title, status in STATUS.items():
        assert f"## {title}" in md and f"| {title} | {status} |" in md
    log = (out / "gpu_check.log").read_text()
    for name in ("build", "kernels", "emulator", "engines", "sanitizer", "cross_entropy", "engine_bench"):
        assert f"benchmarks.gpu_check.section {name} " in log
    assert "gpu_check: all checks passed" in log


def test_dry_run_skips_only_what_needs_a_gpu_and_says_why(dry):
    _, _, sections = dry
    assert sections["Build"]["summary"].startswith("dry run: no build for a GPU")
    kernels = sections["Kernel checks"]
    assert {r[0] for r in rows(kernels, "Tolerances")} == KERNELS
    collected = [r[0] for r in rows(kernels, "CUDA tests")]
    assert any(t.startswith("tests/test_cuda_kernels.py::test_cross_entropy") for t in collected)
    assert any(t.startswith("tests/test_offload_order.py::test_cuda_seco_offload") for t in collected)
    san = sections["compute-sanitizer"]
    assert "no GPU" in san["summary"]
    assert dict(rows(san, "Where"))["workload on the CPU, without sanitizer"] == "ok"


def test_dry_run_engine_checks(dry):
    _, _, sections = dry
    eng = sections["Engines on the device"]
    table = rows(eng, "Against float64 full backprop")
    seen = {(r[0], r[1], r[2]) for r in table}
    assert seen == {(d, e, t) for d in ("float32", "bfloat16") for e, t in ENGINE_CASES}
    assert all(r[-1] == "pass" for r in table)
    spaco = rows(eng, "SpaCO")
    assert [r[0] for r in spaco] == ["float32", "bfloat16"] and all(r[-1] == "pass" for r in spaco)


def test_dry_run_benchmark_rows(dry):
    _, _, sections = dry
    xent = sections["Cross-entropy benchmark"]
    avail = dict(rows(xent, "Fused losses available"))
    assert set(avail) == {"torch F.linear_cross_entropy", "Liger fused linear cross-entropy",
                          "Apple CCE (cut_cross_entropy)"}
    timed = {(r[0], r[1]) for r in rows(xent, "Forward + backward") if r[2] != "-"}
    for n in ("64", "128"):
        assert (n, "seqwrap.linear_cross_entropy") in timed and (n, "torch, full logits (float32 upcast)") in timed
    bench = rows(sections["Engine benchmark"], "One training step")
    assert {(r[0], r[1]) for r in bench} == {(n, m) for n in ("32", "64") for m in BENCH_METHODS}
    for r in bench:
        assert r[5] != "-" and float(r[5].replace(",", "")) > 0, r   # tokens/s measured
        assert (r[3] == "-") == (r[1] == "HF + grad ckpt"), r          # the memory model beside each SeCO case


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the real check would run")
def test_without_a_gpu_the_check_says_so_and_fails(tmp_path):
    proc = gpu_check(tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "no CUDA device visible to torch" in proc.stdout and "make gpu-check-dry" in proc.stdout
    assert not (tmp_path / "gpu_check.md").exists(), "no GPU: earlier results in the folder stay as they were"


def test_dry_run_emulated_kernel_table(dry):
    """The emulator's section runs in a dry run too: a row per kernel, each with passing tests."""
    _, _, sections = dry
    table = rows(sections["Kernels under the CUDA emulator"], "Emulated kernels")
    assert {r[0] for r in table} == KERNELS
    for r in table:
        assert int(r[1]) > 0 and int(r[2]) == 0, r
