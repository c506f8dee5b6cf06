"""FPDT pieces inside SeCO: block-by-block attention over the past (no K/V concatenation) and host
offload, measured against the memory model; and the longest sequence it predicts for Llama-3.1-8B.

Writes benchmarks/results/fpdt.md, fpdt.png and fpdt.json (the raw measurements; `python
benchmarks/bench_fpdt.py report` rebuilds the tables from it). Run: `pytest benchmarks/bench_fpdt.py -s`.
Environment: SEQWRAP_BENCH_LENGTHS="2048,4096,8192,16384", SEQWRAP_BENCH_CHUNK=512,
SEQWRAP_BENCH_THREADS=2, SEQWRAP_BENCH_DEVICE=cpu (or cuda).

Each (method, length) runs in a fresh process: build the model (a small Llama, float32, full
fine-tuning), then two SeCO steps; memory is that of both steps, time that of the second (the first
pays one-time costs: pool buffers, allocator growth). Methods:
  concat          SeCO(attention="concat"): the recompute concatenates the past K/V (before this issue)
  chunked         SeCO(): the recompute reads the past block by block (LSE merge)
  offload         SeCO(offload=True, offload_min_bytes=0): past K/V and relay sums in the host pool,
                  every saved activation of the replayed chunk parked on the host
  offload_ckpt    the same with HF gradient checkpointing (checkpointed layer inputs parked too)

Memory on CPU: "total" = peak resident set above the one after model + optimizer state exist
(VmHWM after /proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_=131072 so freed blocks leave the
resident set). Device and host are one memory on a CPU, so the device side is estimated as the
peak, sampled every 2 ms, of (resident set - host-side bytes), host-side bytes being the engine's
pool buffers (lent, or kept for reuse) plus the activations parked on the host, and the host side is
the sampled peak of those. On CUDA: device = torch.cuda.max_memory_allocated, host = the same host-side peak.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

METHODS = ["concat", "chunked", "offload", "offload_ckpt"]
LABELS = {"concat": "SeCO, concatenated past (before)", "chunked": "SeCO, block-by-block past",
          "offload": "SeCO + offload", "offload_ckpt": "SeCO + offload + grad ckpt"}
CONFIG = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4)
MB = 2**20


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Sampler:
    """Peak of f() sampled every 2 ms in a background thread."""

    def __init__(self, f):
        self.f, self.peak, self._stop = f, float("-inf"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.f())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.f())


def run_case(method: str, seq_len: int, chunk: int) -> dict:
    """In the fresh subprocess: one method at one length, two steps."""
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import seqwrap

    torch.set_num_threads(int(os.environ.get("SEQWRAP_BENCH_THREADS", "2")))
    device = torch.device(os.environ.get("SEQWRAP_BENCH_DEVICE", "cpu"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, max_position_embeddings=seq_len)).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for p in model.parameters():  # optimizer state exists before the baseline
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if method == "offload_ckpt":
        seqwrap.hf.enable_checkpointing(model)
    engine = seqwrap.SeCO(model, chunk_size=chunk, attention="concat" if method == "concat" else "chunked",
                          offload=method.startswith("offload"), offload_min_bytes=0)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, seq_len), device=device)
    pool = engine.pool
    gc.collect()
    base = _rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        dev_base = torch.cuda.memory_allocated()

    def host_mb():  # the pool's buffers (lent or kept for reuse) and the parked activations (CPU: copies)
        if pool is None:
            return 0.0
        return (pool.reserved + engine.offload_stats.get("parked_live_bytes", 0)) / MB

    times = []
    with _Sampler(lambda: _rss_mb() - host_mb()) as sampler, _Sampler(host_mb) as host_sampler:
        for _ in range(2):
            t0 = time.perf_counter()
            engine(ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    result = {"method": method, "seq_len": seq_len, "chunk": chunk, "step_s": times[-1],
              "total_mb": _rss_mb("VmHWM") - base,
              "host_mb": host_sampler.peak}
    if device.type == "cuda":
        result["device_mb"] = (torch.cuda.max_memory_allocated() - dev_base) / MB
    else:
        result["device_mb"] = sampler.peak - base
    return result


def predict(method: str, seq_len: int, chunk: int) -> dict:
    """The memory model's device / host peaks (MiB above model + optimizer state) for one case."""
    from transformers import LlamaConfig

    from seqwrap.memory_model import DecoderShape, seco_peak

    shape = DecoderShape.from_config(LlamaConfig(**CONFIG))
    est = seco_peak(shape, seq_len, chunk, dtype_bytes=4, lora_params=None, static=False,
                    grad_ckpt=method == "offload_ckpt", offload=method.startswith("offload"),
                    attention="concat" if method == "concat" else "chunked")
    return {"device_mb": est.device_total / MB, "host_mb": est.host_total / MB,
            "total_mb": (est.device_total + est.host_total) / MB}


def _subprocess(method: str, seq_len: int, chunk: int) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    proc = subprocess.run([sys.executable, __file__, method, str(seq_len), str(chunk)], capture_output=True,
                          text=True, cwd=root, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"method": method, "seq_len": seq_len, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def report(results: list[dict], chunk: int, out_dir: Path) -> str:
    import torch

    from seqwrap.memory_model import llama8b_table

    lengths = sorted({r["seq_len"] for r in results})
    by = {(r["method"], r["seq_len"]): r for r in results if "error" not in r}
    dev = os.environ.get("SEQWRAP_BENCH_DEVICE", "cpu")
    lines = ["# FPDT in SeCO: block-by-block past, host offload, memory model", "",
             f"torch {torch.__version__}, device {dev}, {os.cpu_count()} CPU cores, "
             f"{os.environ.get('SEQWRAP_BENCH_THREADS', '2')} torch threads; small Llama "
             f"(hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, {CONFIG['num_attention_heads']} "
             f"heads = K/V heads, vocab {CONFIG['vocab_size']}), float32, full fine-tuning, batch 1, chunk {chunk}. "
             "Memory above model + optimizer state, over two steps in a fresh process; time of the second step. "
             "On a CPU, device and host are one memory: *device* is the sampled peak of everything outside the "
             "engine's host pool (its buffers, lent or kept for reuse) and the parked activations, *host* the peak of those, *total* the peak "
             "resident set (see the module "
             "docstring).", "",
             "| tokens | method | device MiB | host MiB | total MiB | step s | model: device / host / total MiB "
             "| model error (total) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    errors = []
    for n in lengths:
        for m in METHODS:
            r = by.get((m, n))
            if r is None:
                lines.append(f"| {n} | {LABELS[m]} | failed | | | | | |")
                continue
            p = predict(m, n, chunk)
            err = (p["total_mb"] - r["total_mb"]) / r["total_mb"]
            errors.append(abs(err))
            lines.append(f"| {n} | {LABELS[m]} | {r['device_mb']:.0f} | {r['host_mb']:.0f} | {r['total_mb']:.0f} | "
                         f"{r['step_s']:.2f} | {p['device_mb']:.0f} / {p['host_mb']:.0f} / {p['total_mb']:.0f} | "
                         f"{err:+.0%} |")
    lines += ["", "## What it shows", ""]
    top = lengths[-1]
    if ("concat", top) in by and ("chunked", top) in by:
        c, k = by[("concat", top)], by[("chunked", top)]
        lines.append(f"- No O(T) K/V copy per chunk: at {top} tokens the block-by-block past needs "
                     f"{k['total_mb']:.0f} MiB against {c['total_mb']:.0f} MiB with the concatenation "
                     f"({k['total_mb'] / c['total_mb']:.2f}x), at {k['step_s'] / c['step_s']:.2f}x its step time"
                     + (f" (one timed step per case on a shared machine: SeCO + offload, the same attention work "
                        f"plus the copies, took {by[('offload', top)]['step_s'] / c['step_s']:.2f}x)"
                        if ("offload", top) in by else "") + ".")
    off = [n for n in lengths if ("offload", n) in by]
    if off:
        d = [by[("offload", n)]["device_mb"] for n in off]
        h = [by[("offload", n)]["host_mb"] for n in off]
        lines.append(f"- With offload the device side stays at {min(d):.0f}-{max(d):.0f} MiB from {off[0]} to "
                     f"{off[-1]} tokens while the host pool grows {h[0]:.0f} -> {h[-1]:.0f} MiB (K/V and relayed "
                     "gradient sums).")
    if errors:
        lines.append(f"- Memory model against these measurements: mean absolute error {sum(errors) / len(errors):.0%}, "
                     f"largest {max(errors):.0%} (total memory).")
    lines += ["", "## Longest trainable sequence, Llama-3.1-8B + LoRA on one 80 GB GPU (memory model)", "",
              llama8b_table(), "", "![memory and time](fpdt.png)"]
    text = "\n".join(lines) + "\n"
    (out_dir / "fpdt.md").write_text(text)
    _plot(by, lengths, out_dir / "fpdt.png")
    return text


def _plot(by, lengths, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for m in METHODS:
        pts = [(n, by[(m, n)]) for n in lengths if (m, n) in by]
        if not pts:
            continue
        xs = [n for n, _ in pts]
        axes[0].plot(xs, [r["device_mb"] for _, r in pts], marker="o", label=LABELS[m])
        axes[1].plot(xs, [r["host_mb"] for _, r in pts], marker="o", label=LABELS[m])
        axes[2].plot(xs, [r["step_s"] for _, r in pts], marker="o", label=LABELS[m])
    for ax, title in zip(axes, ("device side (MiB)", "host pool (MiB)", "time per step (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def test_fpdt_memory_and_time(results_dir):
    lengths = [int(x) for x in os.environ.get("SEQWRAP_BENCH_LENGTHS", "2048,4096,8192,16384").split(",")]
    chunk = int(os.environ.get("SEQWRAP_BENCH_CHUNK", "512"))
    results = []
    for n in lengths:
        for m in METHODS:
            r = _subprocess(m, n, chunk)
            print(r, flush=True)
            results.append(r)
    (results_dir / "fpdt.json").write_text(json.dumps({"chunk": chunk, "results": results}, indent=1))
    print(report(results, chunk, results_dir))


if __name__ == "__main__":
    if sys.argv[1:] == ["report"]:  # the tables again from the last run's measurements (fpdt.json)
        out = Path(__file__).resolve().parent / "results"
        saved = json.loads((out / "fpdt.json").read_text())
        print(report(saved["results"], saved["chunk"], out))
    else:
        print(json.dumps(run_case(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))), flush=True)
