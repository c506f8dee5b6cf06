"""Per-tensor cost of the torch -> C bridge: DLPack C exchange API vs __dlpack__ capsules.

Writes benchmarks/results/bridge.md. Run: `pytest benchmarks/bench_bridge.py -s`.
"""
import time

import torch

import seqwrap

C = seqwrap._C


def per_tensor_us(tensors, mode, repeats=200):
    C._set_bridge_mode(mode)
    try:
        C._bridge_import(tensors)  # warm up
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeats):
                C._bridge_import(tensors)
            best = min(best, (time.perf_counter() - t0) / (repeats * len(tensors)))
        return best * 1e6
    finally:
        C._set_bridge_mode("auto")


def kahan_call_us(n_tensors, mode, repeats=200):
    """Whole kahan_accumulate_ call on n tiny tensors (bridge + checks + kernel), per tensor."""
    accs = [torch.zeros(4) for _ in range(n_tensors)]
    comps = [torch.zeros(4) for _ in range(n_tensors)]
    grads = [torch.ones(4) for _ in range(n_tensors)]
    C._set_bridge_mode(mode)
    try:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeats):
                seqwrap.kahan_accumulate_(accs, comps, grads, 1.0)
            best = min(best, (time.perf_counter() - t0) / (repeats * n_tensors))
        return best * 1e6
    finally:
        C._set_bridge_mode("auto")


def per_call_us(fn, args, repeats=500):
    fn(*args)  # warm up
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best * 1e6


def custom_op_rows():
    """Whole calls through the seqwrap:: custom ops (what a compiled graph runs) vs the direct C call
    (what eager mode runs): the dispatcher's cost per call."""
    accs, comps, grads = [torch.zeros(4) for _ in range(3)], [torch.zeros(4) for _ in range(3)], \
        [torch.ones(4) for _ in range(3)]
    acc, acc_lse = torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4)
    bo, bl = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4)
    ops = torch.ops.seqwrap
    return [
        ("kahan_accumulate_, 3 tiny tensors", per_call_us(lambda *a: C.kahan_accumulate(*a, 0), (accs, comps, grads, 1.0)),
         per_call_us(ops.kahan_accumulate_, (accs, comps, grads, 1.0))),
        ("lse_merge_, (1, 2, 4, 8) block", per_call_us(lambda *a: C.lse_merge(*a, 0), (acc, acc_lse, bo, bl)),
         per_call_us(ops.lse_merge_, (acc, acc_lse, bo, bl))),
    ]


def test_bridge_overhead(results_dir):
    rows = []
    for n in (1, 16, 256):
        tensors = [torch.zeros(8, 8) for _ in range(n)]
        fast = per_tensor_us(tensors, "auto")
        caps = per_tensor_us(tensors, "capsule")
        k_fast = kahan_call_us(n, "auto")
        k_caps = kahan_call_us(n, "capsule")
        rows.append((n, fast, caps, caps / fast, k_fast, k_caps))
    lines = [
        "# Tensor bridge overhead (CPU, microseconds per tensor, best of 5)",
        "",
        f"torch {torch.__version__}; fast = DLPack C exchange API (`__dlpack_c_exchange_api__`), "
        "capsule = `tensor.__dlpack__()` + rename + deleter.",
        "",
        "| tensors per call | import, fast (us) | import, capsule (us) | capsule / fast | kahan_accumulate_ fast (us/tensor, 3 tensors each) | kahan_accumulate_ capsule |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {f:.3f} | {c:.3f} | {r:.1f}x | {kf:.3f} | {kc:.3f} |" for n, f, c, r, kf, kc in rows]
    lines += [
        "",
        "Whole calls, microseconds per call (best of 5): the C entry point directly (eager mode calls it so) "
        "vs the `seqwrap::` custom op (the dispatcher in front: what a torch.compile graph calls).",
        "",
        "| call | direct C (us) | custom op (us) | custom op / direct |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {d:.2f} | {o:.2f} | {o / d:.1f}x |" for name, d, o in custom_op_rows()]
    (results_dir / "bridge.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
