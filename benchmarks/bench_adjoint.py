"""Adjoint sharding vs HF full backprop on a small Mamba (CPU), and the scan kernel vs HF's slow path.

Writes benchmarks/results/adjoint.md, adjoint.png and scan.md. Run: `pytest benchmarks/bench_adjoint.py -s`.
Each training case runs in a fresh subprocess (benchmarks/_adjoint_case.py) so that peak RSS belongs
to that case alone; OMP_WAIT_POLICY=passive keeps idle OpenMP threads from spinning on a shared CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FULL_LENGTHS = [256, 512, 1024, 2048]   # HF full backprop: its slow path is a Python loop per token and
                                        # grows faster than linearly (40 s per step at 2048 here)
ENGINE_LENGTHS = FULL_LENGTHS + [4096, 8192, 16384]
CHUNK, TRUNC = 512, 256


def run_case(method, length):
    env = dict(os.environ, OMP_WAIT_POLICY="passive", PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, str(HERE / "_adjoint_case.py"), method, str(length), str(CHUNK),
                          str(TRUNC)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_adjoint_memory_and_time(results_dir):
    rows = {}
    for length in ENGINE_LENGTHS:
        for method in ("full", "onechunk", "exact", "truncated"):
            if method in ("full", "onechunk") and length not in FULL_LENGTHS:
                continue
            r = run_case(method, length)
            rows[(method, length)] = r
            print(r, flush=True)
    from _adjoint_case import CONFIG  # noqa: E402  (same directory)
    lines = ["# Adjoint sharding vs HF full backprop (CPU, float32)", "",
             f"Model: MambaForCausalLM {CONFIG}, batch 1. AdjointSharding chunk_size={CHUNK}; truncated = "
             f"mode='sharded', truncation={TRUNC}. Memory: peak RSS of the step minus RSS before it (fresh "
             "process per case). Time: seconds per forward+backward step.", "",
             "onechunk = AdjointSharding exact with chunk_size = length: plain backprop through seqwrap's adapter "
             "and C scan (HF's own slow path is a Python loop per token, so it is a weak time baseline).", "",
             "| length | full MB | onechunk MB | exact MB | truncated MB | exact/full mem | full s | onechunk s "
             "| exact s | truncated s | exact/full time | exact/onechunk time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for L in ENGINE_LENGTHS:
        f, o = rows.get(("full", L)), rows.get(("onechunk", L))
        e, t = rows[("exact", L)], rows[("truncated", L)]
        fm, fs = (f"{f['peak_mb']:.0f}", f"{f['step_s']:.2f}") if f else ("-", "-")
        om, os_ = (f"{o['peak_mb']:.0f}", f"{o['step_s']:.2f}") if o else ("-", "-")
        rm = f"{e['peak_mb'] / f['peak_mb']:.3f}" if f else "-"
        rt = f"{e['step_s'] / f['step_s']:.3f}" if f else "-"
        ro = f"{e['step_s'] / o['step_s']:.2f}" if o else "-"
        lines.append(f"| {L} | {fm} | {om} | {e['peak_mb']:.0f} | {t['peak_mb']:.0f} | {rm} | {fs} | {os_} | "
                     f"{e['step_s']:.2f} | {t['step_s']:.2f} | {rt} | {ro} |")
    Lmax = max(FULL_LENGTHS)
    f, e, o = rows[("full", Lmax)], rows[("exact", Lmax)], rows[("onechunk", Lmax)]
    lines += ["", f"At {Lmax} tokens (the longest full backprop run): exact uses "
              f"{e['peak_mb'] / f['peak_mb']:.3f}x the memory (target <= 0.333) and "
              f"{e['step_s'] / f['step_s']:.3f}x the time (target <= 1.5) of HF full backprop; against plain "
              f"backprop through the same kernels (onechunk) it takes {e['step_s'] / o['step_s']:.2f}x the time "
              f"and {e['peak_mb'] / o['peak_mb']:.3f}x the memory.",
              f"torch {torch.__version__}, {os.cpu_count()} CPU cores."]
    (results_dir / "adjoint.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for method, label in (("full", "HF full backprop"), ("onechunk", "seqwrap, one chunk"),
                          ("exact", "AdjointSharding exact"),
                          ("truncated", f"sharded, T={TRUNC}")):
        Ls = [L for L in ENGINE_LENGTHS if (method, L) in rows]
        a1.plot(Ls, [rows[(method, L)]["peak_mb"] for L in Ls], "o-", label=label)
        a2.plot(Ls, [rows[(method, L)]["step_s"] for L in Ls], "o-", label=label)
    for ax, yl in ((a1, "peak memory of a step (MB)"), (a2, "seconds per step")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    a1.legend()
    fig.tight_layout()
    fig.savefig(results_dir / "adjoint.png", dpi=120)
    print((results_dir / "adjoint.md").read_text())


def test_scan_vs_hf_slow_path(results_dir):
    lines = ["# Selective scan fwd+bwd: seqwrap C kernel vs HF MambaMixer slow path (CPU, float32)", "",
             "Same inputs, batch 1, dim 128, dstate 16 (dt already positive, D and z gating included); seconds "
             "per forward+backward, best of several; fresh process per length.", "",
             "| length | HF slow path s | seqwrap s | speed-up |", "|---|---|---|---|"]
    for L in (256, 1024, 2048):
        r = run_case("scan", L)
        lines.append(f"| {L} | {r['hf_s']:.3f} | {r['seqwrap_s']:.4f} | {r['hf_s'] / r['seqwrap_s']:.0f}x |")
    (results_dir / "scan.md").write_text("\n".join(lines) + "\n")
    print((results_dir / "scan.md").read_text())


def test_adjoint_accuracy(results_dir):
    """Float64 gradient errors against HF full backprop: exact, sharded (paper Prop. 3) per layer, and
    the truncation error vs T. Tiny random models (tests/mamba_utils.py), 2 x 64 tokens, chunk 16."""
    sys.path.insert(0, str(HERE.parent))
    import seqwrap
    from tests.mamba_utils import full_backprop, grads_of, max_rel_err, tiny_mamba, total_rel_err

    def run(m, ids, **kw):
        m.zero_grad(set_to_none=True)
        seqwrap.AdjointSharding(m, chunk_size=16, **kw)(ids)
        return grads_of(m)
    torch.set_num_threads(1)
    ids = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    lines = ["# AdjointSharding accuracy (float64, vs HF full backprop)", "",
             "Tiny random MambaForCausalLM (hidden 16, inner 32, state 4), batch 2 x 64 tokens, chunk_size 16. "
             "rel err = ||g - g_bp|| / ||g_bp|| (worst parameter, or all parameters stacked).", "",
             "| layers | exact: worst param | sharded: all params | sharded: per layer (bottom to top) |",
             "|---|---|---|---|"]
    for L in (1, 2, 3):
        m = tiny_mamba(layers=L, seed=L)
        _, g0 = full_backprop(m, ids)
        ge, gs = run(m, ids), run(m, ids, mode="sharded")
        per = ", ".join(f"{total_rel_err(gs, {n: g for n, g in g0.items() if f'layers.{k}.' in n}):.2e}"
                        for k in range(L))
        lines.append(f"| {L} | {max_rel_err(ge, g0)[0]:.1e} | {total_rel_err(gs, g0):.2e} | {per} |")
    m = tiny_mamba(layers=1, seed=9)
    _, g0 = full_backprop(m, ids)
    lines += ["", "Truncated adjoint sharding, one layer (untruncated sharded = backprop here):", "",
              "| T | all params rel err | worst param rel err (param) |", "|---|---|---|"]
    for T in (1, 4, 16, 32, 48, 63):
        g = run(m, ids, mode="sharded", truncation=T)
        w, name = max_rel_err(g, g0)
        lines.append(f"| {T} | {total_rel_err(g, g0):.2e} | {w:.2e} ({name.replace('backbone.', '')}) |")
    (results_dir / "adjoint_accuracy.md").write_text("\n".join(lines) + "\n")
    print((results_dir / "adjoint_accuracy.md").read_text())
