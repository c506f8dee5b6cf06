"""HF Llama training step with and without seqwrap.apply_minisequence: peak memory and time.

Each case runs in a fresh process (benchmarks/mst_step.py), so peak RSS (CPU) or
torch.cuda.max_memory_allocated (GPU) belongs to that case alone. Writes
benchmarks/results/minisequence.md and minisequence.png.

Run: `pytest benchmarks/bench_minisequence.py -s` (about 4 minutes on 2 idle CPU cores).
SEQWRAP_BENCH_MST_LENGTHS=1024,4096 picks other sequence lengths.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
STEP = Path(__file__).resolve().parent / "mst_step.py"
LENGTHS = tuple(int(s) for s in os.environ.get("SEQWRAP_BENCH_MST_LENGTHS", "2048,4096,8192").split(","))
MODES = ("hf", "mst-loss", "mst")
MODEL = dict(vocab=32000, hidden=256, intermediate=1024, layers=2, heads=4)
LABELS = {"hf": "transformers", "mst-mlp": "MsT, MLP only", "mst-loss": "fused loss only", "mst": "MsT, MLP + fused loss"}


def run_case(seq: int, mode: str, gc: bool = False) -> dict:
    args = [sys.executable, str(STEP), "--seq", str(seq), "--mode", mode, "--steps", "2"]
    args += ["--gc"] if gc else []
    args += [f"--{k}={v}" for k, v in MODEL.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(b):
    return b / 2**20


def write_table(rows, path):
    dev = rows[0]["device"]
    mem = "peak RSS" if dev == "cpu" else "torch.cuda.max_memory_allocated"
    lines = [
        "# MsT: HF Llama training step (forward + backward), with and without `apply_minisequence`",
        "",
        f"Device: {dev} ({rows[0]['threads']} threads), torch {torch.__version__}, float32, batch 1. Model: "
        f"Llama, {MODEL['layers']} layers, hidden {MODEL['hidden']}, intermediate {MODEL['intermediate']}, "
        f"vocab {MODEL['vocab']}, sdpa attention; mlp_chunks=None (auto). Gradient checkpointing (GC, HF non-reentrant) "
        "only where the table says so.",
        f"Peak = {mem} of a fresh process per case; extra = peak - memory held before the first step "
        "(model, inputs, and on CPU the interpreter and libraries). Time = best of 2 steps after a warm-up step, wall clock and "
        "process CPU time (all threads; less disturbed by other processes on a shared machine).",
        f"Load average while measuring (1 min, at the end): {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: on a "
        "shared machine the times are noisy, the memory is not.",
        "",
        "| tokens | GC | MLP chunks (auto) | mode | peak (MiB) | extra (MiB) | extra vs transformers | s / step | time vs transformers | CPU s / step | CPU time vs transformers |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {(r["seq"], r["gc"]): r for r in rows if r["mode"] == "hf"}
    for r in rows:
        b = base[(r["seq"], r["gc"])]
        extra, b_extra = r["peak_bytes"] - r["base_bytes"], b["peak_bytes"] - b["base_bytes"]
        lines.append(
            f"| {r['seq']} | {'on' if r['gc'] else 'off'} | {r['mlp_chunks']} | {LABELS[r['mode']]} | {_mib(r['peak_bytes']):.0f} | {_mib(extra):.0f} | "
            f"{extra / b_extra:.2f}x | {r['sec_per_step']:.2f} | {r['sec_per_step'] / b['sec_per_step']:.2f}x | "
            f"{r['cpu_sec_per_step']:.2f} | {r['cpu_sec_per_step'] / b['cpu_sec_per_step']:.2f}x |"
        )
    path.write_text("\n".join(lines) + "\n")
    return lines


def write_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_cpu = rows[0]["device"] == "cpu"
    t_key, t_title = ("cpu_sec_per_step", "CPU seconds per step") if on_cpu else ("sec_per_step", "seconds per step")
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode and not r["gc"]]
        x = [r["seq"] for r in rs]
        ax_m.plot(x, [_mib(r["peak_bytes"] - r["base_bytes"]) for r in rs], "o-", label=LABELS[mode])
        ax_t.plot(x, [r[t_key] for r in rs], "o-", label=LABELS[mode])
    for ax, title in ((ax_m, "extra peak memory (MiB)"), (ax_t, t_title)):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_m.legend()
    fig.suptitle(f"HF Llama step, vocab {MODEL['vocab']}, hidden {MODEL['hidden']} ({rows[0]['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def test_minisequence_llama_step(results_dir):
    rows = [run_case(seq, mode) for seq in LENGTHS for mode in MODES]
    rows += [run_case(max(LENGTHS), mode, gc=True) for mode in MODES]  # with checkpointing, at the longest
    lines = write_table(rows, results_dir / "minisequence.md")
    write_plot(rows, results_dir / "minisequence.png")
    print("\n".join(lines))
    for seq in LENGTHS:  # same model, same data: the same loss to float32 rounding
        losses = [r["loss"] for r in rows if r["seq"] == seq]
        assert max(losses) - min(losses) < 1e-4 * abs(losses[0])
