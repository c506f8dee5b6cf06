"""LM-head + cross-entropy: peak memory and time, torch vs seqwrap. `pytest benchmarks/bench_cross_entropy.py -s`

Every case runs in a fresh process (benchmarks/child.py). Peak extra memory is
the child's peak RSS minus its RSS once the inputs exist (CPU), or the allocator
peak (GPU). Writes benchmarks/results/cross_entropy.md and cross_entropy.png.
Times are the best of 1 run after a warm-up; the largest case (16K x 128K) is timed on
its single first run. Set SEQWRAP_BENCH_QUICK=1 for a small smoke run.

test_cross_entropy_peers: seqwrap beside its peers at the same chunk size, one run: torch's chunked
F.linear_cross_entropy (batch_chunk_size = chunk), DeepSpeed's TiledFusedLogitsLoss (N / chunk shards;
reported as skipped, with the reason, without deepspeed) and full logits; one thread per child; each
child first runs a tiny call of its method so one-time imports are not counted as the work's memory.
Each test rewrites its own section of cross_entropy.md (between <!-- section --> markers).
"""
import datetime
import os
import subprocess

import torch

from benchmarks.child import run_case

METHODS = ["torch_full", "torch_fused", "torch_fused_chunked", "seqwrap"]
QUICK = os.environ.get("SEQWRAP_BENCH_QUICK") == "1"
SHAPES = [(1024, 256, 4096)] if QUICK else [(4096, 1024, 32768), (16384, 1024, 32768), (4096, 1024, 131072), (16384, 1024, 131072)]
MEM_LIMIT_GB = 20  # address-space cap per child: an oversize case fails cleanly instead of waking the OOM killer


# (N, H, V, rows per chunk): the peers benchmark's configuration (results/peers.md) and issue 24's
PEER_CONFIGS = [(1024, 256, 4096, 256)] if QUICK else [(8192, 512, 32000, 1024), (16384, 1024, 32768, 1024)]
PEER_METHODS = ["torch_full", "torch_chunked_same", "deepspeed_tiled", "seqwrap"]
PEER_NAMES = {"torch_full": "torch, full logits (F.linear + F.cross_entropy)",
              "torch_chunked_same": "torch F.linear_cross_entropy, batch_chunk_size = chunk",
              "deepspeed_tiled": "DeepSpeed TiledFusedLogitsLoss, N / chunk shards",
              "seqwrap": "seqwrap.linear_cross_entropy, chunk_size = chunk"}


def test_cross_entropy_peers(results_dir):
    rows = []
    for n, h, v, chunk in PEER_CONFIGS:
        for method in PEER_METHODS:
            r = run_case("benchmarks.cases_cross_entropy:fwd_bwd",
                         dict(method=method, n=n, hidden=h, vocab=v, repeats=0, device="cpu", chunk=chunk,
                              threads=1), mem_limit_gb=MEM_LIMIT_GB)
            if r.get("ok") and "skipped" not in r:
                r["extra_mb"] = r["peak_rss_mb"] - r["base_mb"]
            rows.append(((n, h, v, chunk), method, r))
            print((n, h, v, chunk), method, r, flush=True)
    write_section(results_dir / "cross_entropy.md", "peers", peers_table(rows))


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "?"
    except OSError:
        return "?"


def peers_table(rows):
    day = datetime.date.today().isoformat()
    lines = [f"## seqwrap vs its peers, same chunk size ({day}, commit {_commit()}; CPU, float32, one thread, "
             f"torch {torch.__version__})", "",
             "Forward + backward of the mean loss, hidden and weight requiring grad; each method in a fresh "
             "process after a tiny warm-up call of the same method; time of the single first full-size run. "
             "Peak extra = peak RSS minus RSS with the inputs allocated. 'vs best peer': against the lower "
             "peak of torch chunked and DeepSpeed tiled in the same run.", "",
             "| N | H | V | chunk | method | peak extra MiB | time s | memory vs full logits | time vs full logits "
             "| memory vs best peer | loss |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for cfg in sorted({c for c, _, _ in rows}, key=lambda c: (c[0], c[1])):
        got = {m: r for c, m, r in rows if c == cfg}
        full = got.get("torch_full", {})
        peers = [got[m]["extra_mb"] for m in ("torch_chunked_same", "deepspeed_tiled") if "extra_mb" in got.get(m, {})]
        best = min(peers) if peers else None
        for method in PEER_METHODS:
            r = got.get(method, {})
            has = "extra_mb" in r
            mem = f"{r['extra_mb'] / full['extra_mb']:.3f}" if has and "extra_mb" in full else "-"
            tim = f"{r['time_s'] / full['time_s']:.2f}" if has and "extra_mb" in full else "-"
            vs_best = f"{r['extra_mb'] / best:.3f}" if has and best else "-"
            lines.append(f"| {cfg[0]} | {cfg[1]} | {cfg[2]} | {cfg[3]} | {PEER_NAMES[method]} | "
                         f"{fmt(r, 'extra_mb', '.1f')} | {fmt(r, 'time_s', '.2f')} | {mem} | {tim} | {vs_best} | "
                         f"{fmt(r, 'loss', '.5f')} |")
    return "\n".join(lines) + "\n"


def write_section(path, name, text):
    """Replaces the section `name` of the markdown file at path (appends it when absent)."""
    start, end = f"<!-- section: {name} -->", f"<!-- end: {name} -->"
    old = path.read_text() if path.exists() else ""
    block = f"{start}\n{text}{end}\n"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    path.write_text(new)
    print(text)


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
             f"This table: run of {datetime.date.today().isoformat()} (commit {_commit()}), default threads.", "",
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
    write_section(results_dir / "cross_entropy.md", "main", "\n".join(lines) + "\n")
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
