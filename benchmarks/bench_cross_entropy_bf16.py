"""bf16 on the CPU: seqwrap.linear_cross_entropy against torch's full-logits bf16 path, one run.

    python -m benchmarks.bench_cross_entropy_bf16 [--rows 2048] [--hidden 512] [--vocab 32768]

Each case runs in a fresh process (benchmarks.child.run_case), one thread, one warm-up step on 64 rows
(same H, V) then one timed forward + backward; ratios are against torch's full logits measured in the
same run. "seqwrap, row-major grad_h" is the layout used before the fix (cross_entropy._fast_lhs turned
off), so the before/after ratio comes from the same run. With --profile, the top operators of a
torch.profiler run of each seqwrap case go into the table's notes. Writes results/cross_entropy_bf16.md.
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import time
from pathlib import Path

from .child import run_case

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("torch_full_bf16", "torch_full_bf16_f32ce", "seqwrap", "seqwrap_rowmajor")
LABEL = {
    "torch_full_bf16": "torch full logits, bf16 F.linear + bf16 F.cross_entropy",
    "torch_full_bf16_f32ce": "torch full logits, bf16 F.linear + float32 F.cross_entropy (HF's upcast)",
    "seqwrap": "seqwrap.linear_cross_entropy (this branch)",
    "seqwrap_rowmajor": "seqwrap.linear_cross_entropy, row-major grad_h operand (before)",
}


def case(kind: str, rows: int, hidden: int, vocab: int, profile: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    import seqwrap
    from seqwrap.ops import cross_entropy as ce

    if kind == "seqwrap_rowmajor":
        ce._fast_lhs = lambda g: g  # the layout of main before the fix
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, vocab, (rows,), generator=g)

    def step(n):
        hh = h[:n]
        if kind.startswith("seqwrap"):
            loss = seqwrap.linear_cross_entropy(hh, w, y[:n])
        elif kind == "torch_full_bf16":
            loss = F.cross_entropy(F.linear(hh, w), y[:n])
        else:
            loss = F.cross_entropy(F.linear(hh, w).float(), y[:n])
        loss.backward()
        h.grad = w.grad = None
        return float(loss)

    step(64)
    t0 = time.perf_counter()
    loss = step(rows)
    out = {"time_s": time.perf_counter() - t0, "loss": loss}
    if profile and kind.startswith("seqwrap"):
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            step(min(rows, 512))
        out["profile"] = p.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=6, max_name_column_width=28, max_shapes_column_width=44)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    res = {}
    for kind in CASES:
        res[kind] = run_case("benchmarks.bench_cross_entropy_bf16:case",
                             dict(kind=kind, rows=a.rows, hidden=a.hidden, vocab=a.vocab, profile=a.profile))
        print(kind, {k: v for k, v in res[kind].items() if k != "profile"}, flush=True)
    base = res["torch_full_bf16_f32ce"].get("time_s")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Fused linear cross-entropy in bfloat16 on the CPU",
        "",
        f"Measured {datetime.date.today()} at {rev} (+ working tree) by `python -m benchmarks.bench_cross_entropy_bf16"
        f" --rows {a.rows} --hidden {a.hidden} --vocab {a.vocab}{' --profile' if a.profile else ''}`: "
        f"N={a.rows}, H={a.hidden}, V={a.vocab}, bf16 inputs, one thread, fresh process per case, one timed "
        "forward + backward after a 64-row warm-up. Ratio: time / torch full logits with float32 cross-entropy.",
        "",
        "| case | time (s) | ratio | peak RSS (MiB) | loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in CASES:
        r = res[kind]
        if not r.get("ok"):
            lines.append(f"| {LABEL[kind]} | failed: {r.get('error')} | | | |")
            continue
        ratio = f"{r['time_s'] / base:.2f}" if base else "-"
        lines.append(f"| {LABEL[kind]} | {r['time_s']:.2f} | {ratio} | {r['peak_rss_mb']:.0f} | {r['loss']:.4f} |")
    for kind in ("seqwrap_rowmajor", "seqwrap"):
        if res[kind].get("profile"):
            lines += ["", f"torch.profiler, {LABEL[kind]}, 512 rows (top operators by self CPU time):", "", "```",
                      res[kind]["profile"].rstrip(), "```"]
    out = RESULTS / "cross_entropy_bf16.md"
    prev = out.read_text().split("<!-- finding -->")[1] if out.exists() and "<!-- finding -->" in out.read_text() else ""
    out.write_text("\n".join(lines) + "\n\n<!-- finding -->" + prev)
    print(out)


if __name__ == "__main__":
    main()
