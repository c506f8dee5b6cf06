"""seqwrap against its peers, side by side in one run: peaks and times as ratios to the baselines.

Three groups, each case in a fresh process (benchmarks/child.py run_case, one thread, float32, CPU):
  LM head + loss (N tokens, hidden H, vocab V, the same chunk of rows for all chunked methods):
      torch's full logits, torch's chunked F.linear_cross_entropy, DeepSpeed's TiledFusedLogitsLoss,
      seqwrap.linear_cross_entropy
  MLP (one Llama MLP, T tokens): plain, DeepSpeed's TiledMLP with ALST's rule ceil(T / H) and with
      seqwrap's shard count, seqwrap's MsT MLP with its own rule (from memory) and with ALST's count
  Training step (a 4-layer Llama, hidden 256, vocab 32K): transformers + gradient checkpointing, SeCO,
      and a StreamBP-style baseline when benchmarks/peers/streambp.py exists (branch secomem)
DeepSpeed is optional: without it those rows say why they were skipped.

Peak = peak RSS of the case's process; extra = peak - RSS after its set-up (inputs, model): what the
measured work itself needed. Writes benchmarks/results/peers.md and peers.png; the MLP's time at equal
shard counts, MsT and TiledMLP interleaved in one process, goes to mlp_ab.md (-k equal_shards_ab).
Run: `pytest benchmarks/bench_peers.py -s` (about 6 minutes on 2 CPU cores);
SEQWRAP_BENCH_PEERS_QUICK=1 runs tiny shapes (a smoke run, under a minute).
"""
import os
import time

import torch

from benchmarks.child import run_case

QUICK = os.environ.get("SEQWRAP_BENCH_PEERS_QUICK") == "1"
LOSS = dict(n=2048, hidden=128, vocab=4000, chunk=512) if QUICK else dict(n=8192, hidden=512, vocab=32000, chunk=1024)
MLP = dict(seq=2048, hidden=128, intermediate=344) if QUICK else dict(seq=16384, hidden=512, intermediate=1376)
STEP = dict(seq=1024, chunk=256) if QUICK else dict(seq=4096, chunk=1024)

LABELS = {
    ("loss", "full"): "torch, full logits",
    ("loss", "torch_chunked"): "torch F.linear_cross_entropy, chunked",
    ("loss", "deepspeed_tiled"): "DeepSpeed TiledFusedLogitsLoss",
    ("loss", "seqwrap"): "seqwrap.linear_cross_entropy",
    ("mlp", "full"): "plain MLP",
    ("mlp", "deepspeed_tiled"): "DeepSpeed TiledMLP",
    ("mlp", "seqwrap"): "seqwrap MsT MLP",
    ("step", "hf_gc"): "transformers + gradient checkpointing",
    ("step", "seco"): "seqwrap.SeCO",
    ("step", "streambp"): "StreamBP-style (benchmarks/peers/streambp.py)",
}


def _env():
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def cases():
    """(group, method, kwargs) in run order."""
    from seqwrap.hf.mst_mlp import alst_mlp_shards, auto_mlp_chunks

    alst = alst_mlp_shards(MLP["seq"], MLP["hidden"])
    ours = auto_mlp_chunks(MLP["seq"], MLP["hidden"], MLP["intermediate"], dtype_bytes=4)
    out = [("loss", m, dict(LOSS, method=m)) for m in ("full", "torch_chunked", "deepspeed_tiled", "seqwrap")]
    out += [("mlp", "full", dict(MLP, method="full")),
            ("mlp", "deepspeed_tiled", dict(MLP, method="deepspeed_tiled", shards=alst)),
            ("mlp", "seqwrap", dict(MLP, method="seqwrap", shards=alst)),
            ("mlp", "deepspeed_tiled", dict(MLP, method="deepspeed_tiled", shards=ours)),
            ("mlp", "seqwrap", dict(MLP, method="seqwrap", shards=None))]
    out += [("step", m, dict(STEP, method=m)) for m in ("hf_gc", "seco", "streambp")]
    return out, alst, ours


def run_all():
    _env()
    todo, alst, ours = cases()
    rows = []
    for group, method, kw in todo:
        r = run_case(f"benchmarks.peers_cases:{group}", kw, timeout=1200)
        r.update(group=group, method=method, kwargs=kw)
        rows.append(r)
        print(group, method, {k: r.get(k) for k in ("time_s", "peak_rss_mb", "base_mb", "shards", "skipped", "error")},
              flush=True)
    return rows, alst, ours


def _extra(r):
    return r["peak_rss_mb"] - r["base_mb"]


def _name(r, alst, ours):
    name = LABELS[(r["group"], r["method"])]
    if r["group"] == "mlp" and r["method"] != "full":
        shards = r.get("shards") or r["kwargs"].get("shards")
        rule = "ALST's rule" if shards == alst and r["kwargs"].get("shards") else "seqwrap's rule, from memory"
        if r["method"] == "deepspeed_tiled" and shards == ours and shards != alst:
            rule = "seqwrap's count"
        if r["method"] == "seqwrap" and r["kwargs"].get("shards") == alst:
            rule = "ALST's count"
        name += f", {shards} shards ({rule})"
    return name


def write_table(rows, alst, ours, path):
    ok = [r for r in rows if r.get("ok") and "skipped" not in r]
    base_of = {"loss": ("full", None), "mlp": ("deepspeed_tiled", alst), "step": ("hf_gc", None)}
    lines = [
        "# seqwrap against its peers, side by side (one run)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `pytest benchmarks/bench_peers.py -s`"
        f"{' (QUICK shapes)' if QUICK else ''}: CPU, 1 thread per case, float32, torch {torch.__version__}, "
        f"fresh process per case. Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(a shared machine: times are noisy, memory is not).",
        "Extra = peak RSS - RSS after the case's set-up (what the measured work needed). Time = best of the timed "
        "runs after a warm-up.",
        f"LM head + loss: N={LOSS['n']} tokens, H={LOSS['hidden']}, V={LOSS['vocab']}, {LOSS['chunk']} rows per chunk "
        "for every chunked method (DeepSpeed: N / chunk shards); forward + backward of the mean loss.",
        f"MLP: one Llama MLP, T={MLP['seq']} tokens, H={MLP['hidden']}, I={MLP['intermediate']}; ALST's rule "
        f"ceil(T / H) = {alst} shards, seqwrap's rule (bytes per shard <= the hidden states' bytes) = {ours}.",
        f"Step: Llama 4 layers, hidden 256, intermediate 1024, vocab 32000, T={STEP['seq']} tokens, SeCO chunk "
        f"{STEP['chunk']}; one forward + backward.",
        "",
        "| group | method | extra (MiB) | extra vs baseline | s | time vs baseline | baseline |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        group = r["group"]
        name = _name(r, alst, ours)
        if not r.get("ok") or "skipped" in r:
            lines.append(f"| {group} | {name} | - | - | - | - | skipped: {r.get('skipped') or r.get('error')} |")
            continue
        bm, bshards = base_of[group]
        base = next((b for b in ok if b["group"] == group and b["method"] == bm
                     and (bshards is None or b.get("shards") == bshards)), None)
        tbase = base
        if group == "mlp" and r["method"] == "seqwrap":  # time at equal shard counts: against TiledMLP with as many
            tbase = next((b for b in ok if b["group"] == "mlp" and b["method"] == "deepspeed_tiled"
                          and b.get("shards") == r.get("shards")), base)
        mem = f"{_extra(r) / _extra(base):.2f}x" if base else "-"
        tim = f"{r['time_s'] / tbase['time_s']:.2f}x" if tbase else "-"
        bname = "-" if base is None else _name(base, alst, ours)
        if tbase is not base and tbase is not None:
            bname += f"; time vs {_name(tbase, alst, ours)}"
        lines.append(f"| {group} | {name} | {_extra(r):.0f} | {mem} | {r['time_s']:.2f} | {tim} | {bname} |")
    path.write_text("\n".join(lines) + "\n")
    return lines


def write_plot(rows, alst, ours, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ("loss", "mlp", "step")
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for col, group in enumerate(groups):
        rs = [r for r in rows if r["group"] == group and r.get("ok") and "skipped" not in r]
        names = [_name(r, alst, ours).replace(", ", ",\n", 1) for r in rs]
        y = range(len(rs))
        axes[0][col].barh(list(y), [_extra(r) for r in rs])
        axes[1][col].barh(list(y), [r["time_s"] for r in rs], color="tab:orange")
        for row, title in ((0, "extra peak RSS (MiB)"), (1, "seconds")):
            ax = axes[row][col]
            ax.set_yticks(list(y))
            ax.set_yticklabels(names, fontsize=6)
            ax.set_title(f"{group}: {title}", fontsize=9)
            ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def test_peers(results_dir):
    rows, alst, ours = run_all()
    lines = write_table(rows, alst, ours, results_dir / "peers.md")
    write_plot(rows, alst, ours, results_dir / "peers.png")
    print("\n".join(lines))
    failed = [r for r in rows if not r.get("ok")]
    assert not failed, failed
    losses = [r["loss"] for r in rows if r["group"] == "loss" and "loss" in r]  # the same loss, all methods
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0])


def test_mlp_time_at_equal_shards_ab(results_dir):
    """MsT vs TiledMLP at equal shard counts (seqwrap's rule and ALST's), interleaved in one process:
    writes benchmarks/results/mlp_ab.md."""
    _env()
    from seqwrap.hf.mst_mlp import alst_mlp_shards, auto_mlp_chunks

    ours = auto_mlp_chunks(MLP["seq"], MLP["hidden"], MLP["intermediate"], dtype_bytes=4)
    alst = alst_mlp_shards(MLP["seq"], MLP["hidden"])
    lines = ["# MsT MLP vs DeepSpeed TiledMLP at equal shards, interleaved A/B", "",
             f"{time.strftime('%Y-%m-%d')}; CPU, float32, one thread, one Llama MLP (T={MLP['seq']}, "
             f"H={MLP['hidden']}, I={MLP['intermediate']}); forward + backward; both methods in ONE process, "
             "alternating order each round (benchmarks/peers_cases.py mlp_ab); ratio = MsT / TiledMLP per round.", "",
             "| shards | rule | rounds | MsT s (median) | TiledMLP s (median) | ratio median | ratio min | ratio max | grad rel diff |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shards, rule in ((ours, "seqwrap's (from memory)"), (alst, "ALST's ceil(T / H)")):
        r = run_case("benchmarks.peers_cases:mlp_ab", dict(MLP, shards=shards), timeout=1200)
        print("mlp_ab", shards, r, flush=True)
        if r.get("skipped") or not r.get("ok"):
            lines.append(f"| {shards} | {rule} | - | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        assert r["grad_rel_diff"] < 1e-5, r   # the same gradients, or the times compare different work
        lines.append(f"| {shards} | {rule} | {r['rounds']} | {r['mst_s']:.3f} | {r['tiled_s']:.3f} | "
                     f"{r['ratio_median']:.3f} | {r['ratio_min']:.3f} | {r['ratio_max']:.3f} | {r['grad_rel_diff']:.1e} |")
    (results_dir / "mlp_ab.md").write_text("\n".join(lines) + "\n")
