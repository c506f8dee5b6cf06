"""Calibration of seqwrap.plan on this machine (CPU): predicted vs measured peak memory of the plan it chose.

Writes benchmarks/results/plan_calibration.md (and plan_calibration.json, the raw results). Run:
`pytest benchmarks/bench_plan.py -s`. Environment: SEQWRAP_BENCH_THREADS=1 (torch threads).

Each case: a small Llama-style model from a HF config, random weights, float32, full fine-tuning or
LoRA r=8 on q/k/v/o, AdamW; seqwrap.plan(model, seq_len, device_memory=budget, reserve=0) picks chunk
size and gradient checkpointing (offload is never planned on a CPU); a fresh process then trains two
steps with exactly that (SeCO(model, chunk_size=AutoChunk(...)) plans again at its first step and
must agree) and measures the peak resident set (benchmarks/plan_case.py says how). The budgets are
chosen so that the plans differ: one chunk, several, with and without checkpointing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.plan_case import measure

# vocab 8192, MHA; vocab 32000, GQA (4 query heads / 2 K/V heads)
A = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
         num_key_value_heads=4)
B = dict(vocab_size=32000, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2)
OPTIONS = dict(min_chunk=128, target_chunk=512, max_chunk=1024)
# (config name, LoRA rank or None, tokens, device budget)
CASES = [("A", None, 1024, "300MB"), ("A", None, 2048, "250MB"), ("A", None, 2048, "200MB"), ("A", None, 4096, "250MB"),
         ("A", 8, 2048, "1GB"), ("A", 8, 4096, "200MB"), ("A", 8, 4096, "150MB"),
         ("B", None, 2048, "250MB"), ("B", None, 4096, "1GB"), ("B", 8, 4096, "1GB")]
CONFIGS = {"A": A, "B": B}
MB = 1e6


def case(config: str, lora, seq_len: int, budget: str) -> dict:
    return dict(config=CONFIGS[config], lora=lora, seq_len=seq_len, device_memory=budget, options=OPTIONS,
                threads=int(os.environ.get("SEQWRAP_BENCH_THREADS", "1")))


def report(rows: list[dict]) -> str:
    import torch

    def err(r, what):
        return 100 * (r[f"measured_{what}"] / r[f"predicted_{what}"] - 1)

    lines = ["# seqwrap.plan calibration (CPU)", "",
             f"torch {torch.__version__}, {os.cpu_count()} CPU cores (shared machine), float32, AdamW, batch 1, "
             "SeCO. `seqwrap.plan(model, tokens, device_memory=budget, reserve=0, min_chunk=128, target_chunk=512, "
             "max_chunk=1024)` chose the chunk size and gradient checkpointing; a fresh process trained two steps "
             "with that plan. *Total*: peak resident set above the one after the imports (weights, trainable "
             "state, gradients and the step), against the plan's predicted device peak; *above static*: above the "
             "resident set once model and optimizer state exist, against the prediction without weights and "
             "optimizer state. Error = measured / predicted - 1. "
             "Config A: hidden 256, 4 layers, 4 heads = K/V heads, intermediate 688, vocab 8192; "
             "B: hidden 128, 2 layers, 4 heads / 2 K/V heads, intermediate 352, vocab 32000. "
             "CPU only: no GPU was measured (there the CUDA context and allocator slack are what the reserve is for).",
             "", "| config | training | tokens | budget | plan: chunk x n | grad ckpt | predicted total MB | "
                 "measured total MB | error | predicted above static MB | measured above static MB | error |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {'LoRA r=8' if r['lora'] else 'full'} | {r['seq_len']} | "
                     f"{r['device_memory'] / MB:.0f} MB | {r['chunk_size']} x {r['num_chunks']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['predicted_total'] / MB:.1f} | "
                     f"{r['measured_total'] / MB:.1f} | {err(r, 'total'):+.1f}% | {r['predicted_dynamic'] / MB:.1f} | "
                     f"{r['measured_dynamic'] / MB:.1f} | {err(r, 'dynamic'):+.1f}% |")
    tot = [err(r, "total") for r in rows]
    dyn = [err(r, "dynamic") for r in rows]
    over = sum(r["measured_total"] <= r["device_memory"] for r in rows)
    lines += ["", f"- total: mean absolute error {sum(map(abs, tot)) / len(tot):.1f}%, largest "
              f"{max(tot, key=abs):+.1f}%; "
              f"above static: mean absolute error {sum(map(abs, dyn)) / len(dyn):.1f}%, largest "
              f"{max(dyn, key=abs):+.1f}%.",
              f"- measured peak within the budget the plan was made for: {over} of {len(rows)} cases.",
              "- tests/test_plan.py::test_calibration runs two smaller cases the same way and asserts "
              "0.85 <= measured / predicted <= 1.15 (total)."]
    return "\n".join(lines) + "\n"


def test_plan_calibration(results_dir: Path):
    rows = []
    for config, lora, seq_len, budget in CASES:
        r = measure(case(config, lora, seq_len, budget))
        r["config"] = config
        rows.append(r)
        print(config, lora, seq_len, budget, r["chunk_size"], r["checkpointing"],
              f"{r['measured_total'] / r['predicted_total'] - 1:+.3f}", flush=True)
    (results_dir / "plan_calibration.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = report(rows)
    (results_dir / "plan_calibration.md").write_text(text)
    print(text)
    # a benchmark, not a test: the margin is asserted by tests/test_plan.py
