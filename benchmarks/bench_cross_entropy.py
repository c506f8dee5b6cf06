"""LM-head + cross-entropy: peak memory and time, torch vs seqwrap. `pytest benchmarks/bench_cross_entropy.py -s`

Every case runs in a fresh process (benchmarks/child.py). Peak extra memory is
the child's peak RSS minus its RSS once the inputs exist (CPU), or the allocator
peak (GPU). Writes benchmarks/results/cross_entropy.md and cross_entropy.png.
Times are the best of 1 run after a warm-up; the largest case (16K x 128K) is timed on
its single first run. Set SEQWRAP_BENCH_QUICK=1 for a small smoke run.
"""
import os

import torch

from benchmarks.child import run_case

METHODS = ["torch_full", "torch_fused", "torch_fused_chunked", "seqwrap"]
QUICK = os.environ.get("SEQWRAP_BENCH_QUICK") == "1"
SHAPES = [(1024, 256, 4096)] if QUICK else [(4096, 1024, 32768), (16384, 1024, 32768), (4096, 1024, 131072), (16384, 1024, 131072)]
MEM_LIMIT_GB = 20  # address-space cap per child: an oversize case fails cleanly instead of waking the OOM killer


def test_cross_entropy_benchmark(results_dir):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for n, h, v in SHAPES:
        big = n * v >= 16384 * 131072
        for method in METHODS + (["seqwrap_recompute"] if (n, v) == SHAPES[min(1, len(SHAPES) - 1)][::2] else []):
            r = run_case("benchmarks.cases_cross_entropy:fwd_bwd",
                         dict(method=method, n=n, hidden=h, vocab=v, repeats=0 if big else 1, device=device),
                         mem_limit_gb=MEM_LIMIT_GB if device == "cpu" else None)
            if r.get("ok") and "skipped" not in r:
                r["extra_mb"] = r["device_peak_mb"] if device == "cuda" else r["peak_rss_mb"] - r["base_mb"]
            rows.append(((n, h, v), method, r))
            print((n, h, v), method, r, flush=True)
    write_results(results_dir, rows, device)


def fmt(r, key, spec):
    return format(r[key], spec) if r.get("ok") and key in r else (r.get("skipped") or r.get("error", "?"))


def write_results(results_dir, rows, device):
    lines = [f"# LM head + cross-entropy, forward + backward ({device}, float32, torch {torch.__version__})", "",
             "Peak extra memory: peak RSS minus RSS with the inputs allocated (CPU) / allocator peak (GPU). "
             "Ratios are against torch_full (F.linear + F.cross_entropy) in the same run.", "",
             "| N tokens | H | V | method | peak extra MiB | time s | memory vs torch_full | time vs torch_full | loss |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    base = {shape: r for shape, m, r in rows if m == "torch_full"}
    for shape, method, r in rows:
        b = base.get(shape, {})
        ok = r.get("ok") and "extra_mb" in r and b.get("ok") and "extra_mb" in b
        mem_ratio = f"{r['extra_mb'] / b['extra_mb']:.3f}" if ok else "-"
        time_ratio = f"{r['time_s'] / b['time_s']:.2f}" if ok else "-"
        lines.append(f"| {shape[0]} | {shape[1]} | {shape[2]} | {method} | {fmt(r, 'extra_mb', '.0f')} | "
                     f"{fmt(r, 'time_s', '.2f')} | {mem_ratio} | {time_ratio} | {fmt(r, 'loss', '.5f')} |")
    (results_dir / "cross_entropy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results_dir / "cross_entropy.png", rows)


def plot(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({s for s, _, _ in rows})
    methods = [m for m in METHODS + ["seqwrap_recompute"] if any(mm == m for _, mm, _ in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        for ax, key in zip(axes, ("extra_mb", "time_s")):
            vals = []
            for s in shapes:
                r = next((r for ss, m, r in rows if ss == s and m == method), {})
                vals.append(r.get(key, 0) if r.get("ok") else 0)
            ax.bar([i + k * width for i in range(len(shapes))], vals, width, label=method)
    labels = [f"N={s[0] // 1024}K\nV={s[2] // 1024}K" for s in shapes]
    for ax, title in zip(axes, ("peak extra memory (MiB; 0 = out of memory)", "forward+backward time (s)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], labels)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
