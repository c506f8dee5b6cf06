"""One benchmark case in a fresh process: python benchmarks/_adjoint_case.py METHOD LENGTH [CHUNK] [T].

METHOD: full (HF forward + backward), exact (AdjointSharding exact), truncated (sharded, truncation T),
onechunk (AdjointSharding exact with one chunk = plain backprop through seqwrap's adapter and C scan: the
fair time baseline, since HF's slow path is a Python loop), scan (the scan op vs HF's slow-path scan,
LENGTH tokens, batch 1, dim 128, dstate 16: fwd+bwd seconds of both).
Prints one JSON line: step time (median of the timed steps after one warm-up step) and memory: the process's peak RSS
minus its RSS just before the first step (model, optimizer-free, already built).
"""
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

CONFIG = dict(vocab_size=256, hidden_size=64, state_size=16, num_hidden_layers=2, intermediate_size=128,
              time_step_rank=8, conv_kernel=4)


def main():
    method, length = sys.argv[1], int(sys.argv[2])
    chunk = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    trunc = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    from transformers import MambaConfig, MambaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    import seqwrap
    torch.manual_seed(0)
    if method == "scan":
        return scan_case(length)
    model = MambaForCausalLM(MambaConfig(**CONFIG))
    ids = torch.randint(0, CONFIG["vocab_size"], (1, length))
    if method == "full":
        def step():
            model(ids, labels=ids).loss.backward()
    else:
        kw = dict(mode="sharded", truncation=trunc) if method == "truncated" else dict(mode="exact")
        chunk = length if method == "onechunk" else chunk
        engine = seqwrap.AdjointSharding(model, chunk_size=chunk, **kw)

        def step():
            engine(ids)
    base = psutil.Process().memory_info().rss
    times = []
    # HF's slow path is slow: at >= 2048 tokens its single (cold) step is timed
    steps = 1 if method == "full" and length >= 2048 else 3
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        if i or steps == 1:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "length": length, "step_s": statistics.median(times),
                      "peak_mb": (peak - base) / 2**20}))


def _best(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def scan_case(length, b=1, d=128, n=16):
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan
    from transformers.utils import logging
    logging.set_verbosity_error()

    from seqwrap.ops import selective_scan
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, d, length, generator=g).requires_grad_()
    dt = torch.nn.functional.softplus(torch.randn(b, d, length, generator=g) - 2).requires_grad_()
    A = (-torch.rand(d, n, generator=g) - 0.5).requires_grad_()
    B = torch.randn(b, n, length, generator=g).requires_grad_()
    C = torch.randn(b, n, length, generator=g).requires_grad_()
    D = torch.randn(d, generator=g).requires_grad_()
    z = torch.randn(b, d, length, generator=g).requires_grad_()
    hf = _best(lambda: mamba_selective_scan(u, dt, A, B, C, D, z).sum().backward(), 1 if length > 1024 else 2)
    sw = _best(lambda: selective_scan(u, dt, A, B, C, D, z).sum().backward(), 3)
    print(json.dumps({"method": "scan", "length": length, "shape": [b, d, n], "hf_s": hf, "seqwrap_s": sw}))


if __name__ == "__main__":
    main()
