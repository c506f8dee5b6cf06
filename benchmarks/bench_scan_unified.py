"""Forward + backward time per layer of the unified selective-scan op (csrc/scan/) against Hugging Face's
torch paths, in one process: Mamba-2 mode vs HF's chunked SSD in plain torch (`mamba2_chunk_scan`, what
Mamba2Mixer / Bamba run without mamba_ssm), and Mamba-1 mode vs HF's sequential torch scan
(`mamba_selective_scan`, the MambaMixer slow path), each both as the bare scan and as the whole mixer
(HF's forward vs seqwrap's mixer forward on the same module: projections, conv and norm included).

Writes benchmarks/results/scan_unified.md. Run: `pytest benchmarks/bench_scan_unified.py -s`.
Environment: SEQWRAP_BENCH_LENGTHS="1024,2048,4096,8192", SEQWRAP_BENCH_REPEATS=5,
SEQWRAP_BENCH_THREADS=2 (torch threads; the C kernels use OpenMP on the same cores),
SEQWRAP_BENCH_MAX_S=60 (a case whose previous length took longer than this, predicted x2, is not run).

Sizes (a tiny model's layer, float32, batch 1): Mamba-2: hidden 256, 8 heads x 64, state 64, one group,
SSD chunk 256 (the Bamba layer of bench_hybrid.py); Mamba-1: hidden 64, inner 128, state 16, conv 4.
Each cell is the median of the repeats (HF and seqwrap interleaved), fresh leaf inputs per call.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

LENGTHS = [int(s) for s in os.environ.get("SEQWRAP_BENCH_LENGTHS", "1024,2048,4096,8192").split(",")]
REPEATS = int(os.environ.get("SEQWRAP_BENCH_REPEATS", "5"))
THREADS = int(os.environ.get("SEQWRAP_BENCH_THREADS", "2"))
MAX_S = float(os.environ.get("SEQWRAP_BENCH_MAX_S", "60"))
H, P, N, G, CHUNK, HIDDEN2 = 8, 64, 64, 1, 256, 256
HIDDEN1, INNER1, N1 = 64, 128, 16


def _fwd_bwd(make, f):
    """Seconds of f(*leaves) + backward of its sum, leaves from make()."""
    leaves = make()
    t = time.perf_counter()
    out = f(*leaves)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return time.perf_counter() - t


def _ssd_inputs(length):
    g = torch.Generator().manual_seed(length)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    base = [r(1, length, H, P), r(1, length, H), -torch.exp(r(H) * 0.5), r(1, length, G, N), r(1, length, G, N), r(H)]
    bias = r(H) * 0.1
    return lambda: [t.clone().requires_grad_() for t in base], bias


def _scan1_inputs(length):
    g = torch.Generator().manual_seed(length)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    base = [r(1, INNER1, length), r(1, INNER1, length), -torch.exp(r(INNER1, N1) * 0.5), r(1, N1, length),
            r(1, N1, length), r(INNER1), r(1, INNER1, length)]
    bias = r(INNER1) * 0.1
    return lambda: [t.clone().requires_grad_() for t in base], bias


def _cases():
    """name -> (per-length setup giving (make, hf_fn, ours_fn))."""
    from transformers import Mamba2Config, MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer, mamba_selective_scan
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer, mamba2_chunk_scan

    from seqwrap.hf.mamba1_mixer import mamba1_forward
    from seqwrap.hf.mamba2_mixer import mamba2_forward
    from seqwrap.ops import selective_scan, ssd_scan

    def ssd(length):
        make, bias = _ssd_inputs(length)
        hf = lambda x, dt, A, B, C, D: mamba2_chunk_scan(x, dt, A, B, C, chunk_size=CHUNK, D=D,  # noqa: E731
                                                         dt_bias=bias, dt_softplus=True)
        ours = lambda x, dt, A, B, C, D: ssd_scan(x, F.softplus(dt + bias), A, B, C, D)  # noqa: E731
        return make, hf, ours

    torch.manual_seed(0)
    cfg2 = Mamba2Config(hidden_size=HIDDEN2, num_heads=H, head_dim=P, state_size=N, n_groups=G, expand=2,
                        chunk_size=CHUNK, num_hidden_layers=1, vocab_size=16)
    mixer2 = Mamba2Mixer(cfg2, layer_idx=0)

    def ssd_mixer(length):
        g = torch.Generator().manual_seed(length)
        base = torch.randn(1, length, HIDDEN2, generator=g)
        return (lambda: [base.clone().requires_grad_()], mixer2.forward,
                lambda hs: mamba2_forward(mixer2, hs))

    def scan1(length):
        make, bias = _scan1_inputs(length)
        hf = lambda u, dt, A, B, C, D, z: mamba_selective_scan(u, dt, A, B, C, D, z, delta_bias=bias,  # noqa: E731
                                                                delta_softplus=True)
        ours = lambda u, dt, A, B, C, D, z: selective_scan(u, F.softplus(dt + bias[:, None]), A, B, C, D, z)  # noqa: E731
        return make, hf, ours

    cfg1 = MambaConfig(hidden_size=HIDDEN1, intermediate_size=INNER1, state_size=N1, conv_kernel=4,
                       num_hidden_layers=1, vocab_size=16, use_mambapy=False)
    mixer1 = MambaMixer(cfg1, layer_idx=0)

    def scan1_mixer(length):
        g = torch.Generator().manual_seed(length)
        base = torch.randn(1, length, HIDDEN1, generator=g)
        return (lambda: [base.clone().requires_grad_()], mixer1.forward,
                lambda hs: mamba1_forward(mixer1, hs))

    return {"Mamba-2 scan (SSD)": ssd, "Mamba-2 mixer (layer)": ssd_mixer,
            "Mamba-1 scan": scan1, "Mamba-1 mixer (layer)": scan1_mixer}


def measure(setup, length, skip_hf):
    make, hf, ours = setup(length)
    _fwd_bwd(make, ours)                       # warm-up
    if not skip_hf:
        _fwd_bwd(make, hf)
    t_hf, t_ours = [], []
    for _ in range(REPEATS):
        if not skip_hf:
            t_hf.append(_fwd_bwd(make, hf))
        t_ours.append(_fwd_bwd(make, ours))
    return (statistics.median(t_hf) if t_hf else None), statistics.median(t_ours)


def check_same(setup, length=300):
    """The two sides compute the same thing (float32 rounding): a benchmark of different maths is void."""
    make, hf, ours = setup(length)
    a, b = hf(*make()), ours(*make())
    a, b = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err < 1e-4, err
    return err


def report(rows, out_dir, load):
    lines = ["# Unified selective scan (csrc/scan/) vs Hugging Face torch paths: forward + backward per layer (CPU)",
             "",
             f"torch {torch.__version__}, {THREADS} torch threads, OpenMP on the same cores; 2 CPU cores shared with "
             f"other jobs (load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end). float32, batch 1. "
             f"Median of {REPEATS} interleaved runs, seconds per forward + backward.",
             "",
             f"- Mamba-2: hidden {HIDDEN2}, {H} heads x {P}, state {N}, {G} group, SSD chunk {CHUNK} (HF: "
             "`mamba2_chunk_scan`, the chunked SSD in plain torch that Mamba2Mixer / Bamba run without mamba_ssm; "
             "seqwrap: `ssd_scan`, the unified op in Mamba-2 mode).",
             f"- Mamba-1: hidden {HIDDEN1}, inner {INNER1}, state {N1} (HF: `mamba_selective_scan`, the MambaMixer "
             "slow path; seqwrap: `selective_scan`, the unified op in Mamba-1 mode).",
             "- scan: the bare scan on the same inputs (softplus of dt + bias inside HF's call, before ours); mixer: "
             "HF's mixer forward vs seqwrap's mixer forward (seqwrap/hf/) on the same module.",
             "- speed-up = HF s / seqwrap s (above 1: seqwrap faster). Equal results checked first (relative error "
             "column, float32 rounding).",
             "", "| case | tokens | HF s | seqwrap s | speed-up | rel. err |", "|---|---:|---:|---:|---:|---:|"]
    for name, length, t_hf, t_ours, err in rows:
        hf = f"{t_hf:.3f}" if t_hf is not None else f"not run (> {MAX_S:.0f} s predicted)"
        ratio = f"{t_hf / t_ours:.1f}x" if t_hf is not None else "-"
        lines.append(f"| {name} | {length} | {hf} | {t_ours:.4f} | {ratio} | {err:.1e} |")
    text = "\n".join(lines) + "\n"
    (out_dir / "scan_unified.md").write_text(text)
    return text


def test_scan_unified_vs_hf(results_dir):
    torch.set_num_threads(THREADS)
    load0 = os.getloadavg()[0]
    rows = []
    for name, setup in _cases().items():
        err = check_same(setup)
        last_hf = 0.0
        for length in LENGTHS:
            skip = last_hf * 2 > MAX_S
            t_hf, t_ours = measure(setup, length, skip)
            last_hf = t_hf if t_hf is not None else float("inf")
            rows.append((name, length, t_hf, t_ours, err))
            print(name, length, t_hf, t_ours, flush=True)
    print(report(rows, results_dir, (load0, os.getloadavg()[0])))
