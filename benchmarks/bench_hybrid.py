"""Peak memory and step time vs sequence length on a small hybrid (Bamba: Mamba-2 mixers + attention):
HF full backprop, HF + gradient checkpointing, SeCO and SpaCO (rate 1/4). One fresh subprocess per case.

Writes benchmarks/results/hybrid.md. Run: `pytest benchmarks/bench_hybrid.py -s`.
Environment: SEQWRAP_BENCH_LENGTHS="2048,4096,8192,16384,32768", SEQWRAP_BENCH_CHUNK=1024,
SEQWRAP_BENCH_THREADS=1 (torch threads), SEQWRAP_BENCH_MEM_GB=9 (a method stops at the first length whose
peak, predicted from the last two lengths, exceeds it), SEQWRAP_BENCH_MAX_S=600 (same rule for the step time).

Model: Bamba-like, hidden 256, 6 layers (Mamba-2 mixers in layers 0, 1, 3, 4: 8 heads x 64, state 64, one
group, SSD chunk 256; attention in layers 2 and 5: 4 heads / 2 KV heads), MLP 688, vocab 32000, float32,
AdamW (foreach=False), batch 1. HF runs its own torch paths (no mamba_ssm / causal_conv1d here).
Each case runs in two fresh processes: memory (one step; peak resident set minus the resident set once the
model and optimizer state exist: Linux VmHWM reset through /proc/self/clear_refs, with
MALLOC_MMAP_THRESHOLD_=131072 so freed large blocks leave the resident set) and time (one warm-up step,
then one timed step, default allocator).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["hf", "hf_ckpt", "seco", "spaco"]
LABELS = {"hf": "HF full backprop", "hf_ckpt": "HF + grad ckpt", "seco": "SeCO", "spaco": "SpaCO rate 1/4"}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _setup(seq_len: int):
    """(model, optimizer with its state, input ids)."""
    import torch
    from transformers import BambaConfig, BambaForCausalLM

    torch.set_num_threads(int(os.environ.get("SEQWRAP_BENCH_THREADS", "1")))
    torch.manual_seed(0)
    config = BambaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                         attn_layer_indices=[2, 5], num_attention_heads=4, num_key_value_heads=2,
                         mamba_n_heads=8, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=64, mamba_expand=2,
                         mamba_chunk_size=256, max_position_embeddings=max(seq_len, 4096))
    model = BambaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for p in model.parameters():  # optimizer state exists before the baseline
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, torch.randint(0, config.vocab_size, (1, seq_len))


def run_case(mode: str, method: str, seq_len: int, chunk: int) -> dict:
    """Fresh subprocess. mode "memory": one step, peak resident set above the model + optimizer;
    mode "time": one warm-up step, then one timed step."""
    import gc

    import seqwrap

    model, opt, ids = _setup(seq_len)
    engine = None
    if method == "seco":
        engine = seqwrap.SeCO(model, chunk_size=chunk)
    elif method == "spaco":
        engine = seqwrap.SpaCO(model, chunk_size=chunk, rate=0.25, seed=0)
    elif method == "hf_ckpt":
        seqwrap.hf.enable_checkpointing(model)

    def step():
        if engine is None:
            model(ids, labels=ids).loss.backward()
        else:
            engine(ids)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if mode == "time":
        step()
        t0 = time.perf_counter()
        step()
        return {"step_s": time.perf_counter() - t0}
    gc.collect()
    base = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    return {"peak_mb": _rss_mb("VmHWM") - base}


def _subprocess(mode: str, method: str, seq_len: int, chunk: int) -> dict:
    """Runs one case in a fresh interpreter: its JSON result, or {"error": last stderr line}."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    if mode == "memory":  # glibc: large blocks mmapped and returned on free, so the resident set follows live
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # memory (slower: not for the timing runs)
    proc = subprocess.run([sys.executable, __file__, mode, method, str(seq_len), str(chunk)], capture_output=True,
                          text=True, cwd=root, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def measure(method: str, seq_len: int, chunk: int) -> dict:
    r = {"method": method, "seq_len": seq_len}
    mem = _subprocess("memory", method, seq_len, chunk)
    r.update(mem)
    if "error" not in mem:
        r.update(_subprocess("time", method, seq_len, chunk))
    return r


def _predict(points, n):
    """Linear extrapolation of [(length, value)] to length n (from the last two points)."""
    if len(points) < 2:
        return points[-1][1] * n / points[-1][0]
    (n0, v0), (n1, v1) = points[-2:]
    return v1 + (v1 - v0) / (n1 - n0) * (n - n1)


def slope(points):
    """Least-squares MB per 1K tokens of [(length, MB)]."""
    if len(points) < 2:
        return float("nan")
    xs, ys = [n / 1024 for n, _ in points], [v for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def report(results, skipped, chunk, out_dir: Path) -> str:
    import torch

    lengths = sorted({r["seq_len"] for r in results} | {n for _, n, _ in skipped})
    by = {(r["method"], r["seq_len"]): r for r in results}
    skip = {(m, n): why for m, n, why in skipped}

    def cell(m, n):
        r = by.get((m, n))
        if r is None:
            return skip.get((m, n), "-")
        if "error" in r:
            return "failed"
        return f"{r['peak_mb']:.0f} MB / {r['step_s']:.1f} s"

    lines = ["# SeCO / SpaCO on a hybrid model (Bamba-like) vs Hugging Face backprop (CPU)", "",
             f"torch {torch.__version__}, {os.cpu_count()} CPU cores (shared machine), "
             f"{os.environ.get('SEQWRAP_BENCH_THREADS', '1')} torch thread(s). Bamba-like model: hidden 256, 6 layers "
             "(4 Mamba-2 mixers: 8 heads x 64, state 64, SSD chunk 256; 2 attention layers), vocab 32000, float32, "
             f"AdamW, batch 1; engine chunk {chunk}. Cell: peak memory above the model and optimizer "
             "(fresh process) / time of one optimizer step after a warm-up step (another fresh process).", "",
             "| tokens | " + " | ".join(LABELS[m] for m in METHODS) + " |", "|---:|" + "---:|" * len(METHODS)]
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(cell(m, n) for m in METHODS) + " |")
    loads = [r["load"] for r in results if "load" in r]
    if loads:
        lines += ["", f"Load average (1 min) when the cases started: {min(loads):.1f} to {max(loads):.1f} on "
                  f"{os.cpu_count()} cores: the times are single measurements on a shared machine and move by "
                  "up to 2x between neighbouring cells; the memory columns do not depend on the load."]
    lines += ["", "Memory slope (least squares over the lengths each method ran), MB per 1K tokens:", ""]
    for m in METHODS:
        pts = [(n, by[(m, n)]["peak_mb"]) for n in lengths if (m, n) in by and "error" not in by[(m, n)]]
        lines.append(f"- {LABELS[m]}: {slope(pts):.1f} MB / 1K tokens ({len(pts)} lengths)")
    for r in results:
        if "error" in r:
            lines.append(f"- {LABELS[r['method']]} at {r['seq_len']} failed: {r['error']}")
    text = "\n".join(lines) + "\n"
    (out_dir / "hybrid.md").write_text(text)
    return text


def test_hybrid_memory_and_time(results_dir):
    lengths = [int(x) for x in os.environ.get("SEQWRAP_BENCH_LENGTHS", "2048,4096,8192,16384,32768").split(",")]
    chunk = int(os.environ.get("SEQWRAP_BENCH_CHUNK", "1024"))
    mem_cap = float(os.environ.get("SEQWRAP_BENCH_MEM_GB", "9")) * 1024
    time_cap = float(os.environ.get("SEQWRAP_BENCH_MAX_S", "600"))
    results, skipped, done = [], [], {m: [] for m in METHODS}
    stopped = {}
    for n in lengths:
        for m in METHODS:
            if m in stopped:
                skipped.append((m, n, stopped[m]))
                continue
            pts = done[m]
            if pts:
                mem = _predict([(k, r["peak_mb"]) for k, r in pts], n)
                sec = _predict([(k, r["step_s"]) for k, r in pts], n) * 3  # memory, warm-up and timed steps
                if mem > mem_cap or sec > time_cap:
                    stopped[m] = f"not run (from {n}: predicted {mem / 1024:.1f} GB, {sec / 3:.0f} s)"
                    skipped.append((m, n, stopped[m]))
                    continue
            r = measure(m, n, chunk)
            r["load"] = os.getloadavg()[0]
            print(r, flush=True)
            results.append(r)
            if "error" in r:
                stopped[m] = "not run (failed at a shorter length)"
            else:
                pts.append((n, r))
    print(report(results, skipped, chunk, results_dir))


if __name__ == "__main__":
    if len(sys.argv) == 5:
        print(json.dumps(run_case(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))), flush=True)
