"""Eager vs torch.compile (inductor, CPU) for an MsT step and a SeCO step at 8K tokens, each case in a
fresh process; ratios against eager measured in the same run. Writes benchmarks/results/compile.md.

Run: `pytest benchmarks/bench_compile.py -s` (several minutes on 2 CPU cores: inductor compiles C++).
"""
import os

import torch

from benchmarks.child import run_case

CASES = [("mst", 4096), ("seco", 8192)]


def test_compile_benchmark(results_dir):
    rows = []
    for case, seq in CASES:
        for compiled in (False, True):
            r = run_case("benchmarks.compile_case:run", {"case": case, "compiled": compiled, "seq": seq})
            assert r.get("ok"), r
            rows.append(r)
    lines = [
        "# torch.compile: eager vs compiled (inductor), CPU",
        "",
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the end: "
        "times on a shared machine are noisy, ratios come from the same run). Llama, 2 layers, hidden 256, "
        "intermediate 1024, vocab 32000, float32, batch 1. MsT: `apply_minisequence` (auto mini-sequences), "
        "the whole step compiled (fullgraph-traceable). SeCO: chunk 1024, `model.model.compile()` (the chunk "
        "loop stays Python; the graph breaks at the attention that reads the K/V store). Step = best of 2 "
        "after the first (compiling) step; peak = peak RSS of the process minus RSS before the first step.",
        "",
        "| case | tokens | mode | first step (s) | step (s) | step vs eager | extra peak (MiB) | peak vs eager |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    eager = {(r["case"], r["seq"]): r for r in rows if not r["compiled"]}
    for r in rows:
        e = eager[(r["case"], r["seq"])]
        extra, e_extra = r["peak_rss_mb"] - r["base_rss_mb"], e["peak_rss_mb"] - e["base_rss_mb"]
        lines.append(f"| {r['case']} | {r['seq']} | {'compiled' if r['compiled'] else 'eager'} | "
                     f"{r['first_step_s']:.1f} | {r['step_s']:.2f} | {r['step_s'] / e['step_s']:.2f} | "
                     f"{extra:.0f} | {extra / e_extra:.2f} |")
    (results_dir / "compile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
