"""Benchmark cases for the LM-head + loss, each run in a fresh process by bench_cross_entropy.py.

Methods (forward + backward of the mean loss, hidden and weight requiring grad):
  torch_full     F.cross_entropy(F.linear(hidden, weight), labels)     full (N, V) logits
  torch_fused    torch.nn.functional.linear_cross_entropy (torch >= 2.10), default call (reference path)
  torch_fused_chunked  the same with options=torch.nn.LinearCrossEntropyOptions() (its chunked path)
  seqwrap        seqwrap.linear_cross_entropy, gradients formed in the forward (reduction "mean")
  seqwrap_recompute  same, reduction "none" + sum: gradients by recomputation in the backward
  torch_chunked_same   torch's chunked path with batch_chunk_size = seqwrap's chunk rows (same shard size)
  deepspeed_tiled      DeepSpeed's TiledFusedLogitsLoss, shards of seqwrap's chunk rows (skipped without deepspeed)
"""
import time

import torch
import torch.nn.functional as F

from benchmarks.child import rss_mb


def _same_rows(h, w):
    from seqwrap.ops.cross_entropy import default_chunk_rows

    return default_chunk_rows(h.shape[0], w.shape[1], w.shape[0])


def _deepspeed_loss(h, w, y):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    head = torch.nn.Module()
    head.weight = w

    def fn(module, x, t):  # one shard: its logits and its mean loss
        return F.cross_entropy(F.linear(x, module.weight), t.reshape(-1))

    shards = max(1, h.shape[0] // _same_rows(h, w))
    # (1, N, H) / (1, N): TiledFusedLogitsLoss shards along the sequence; equal shards, so "mean" is exact
    return TiledFusedLogitsLoss.apply(fn, head, h.unsqueeze(0), y.unsqueeze(0), None, shards, [w], "mean")


def _loss(method, h, w, y):
    if method == "torch_chunked_same":
        opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=_same_rows(h, w), chunking_method=None)
        return F.linear_cross_entropy(h, w, y, options=opts)
    if method == "deepspeed_tiled":
        return _deepspeed_loss(h, w, y)
    if method == "torch_full":
        return F.cross_entropy(F.linear(h, w), y)
    if method == "torch_fused":
        return F.linear_cross_entropy(h, w, y)
    if method == "torch_fused_chunked":
        return F.linear_cross_entropy(h, w, y, options=torch.nn.LinearCrossEntropyOptions())
    import seqwrap

    if method == "seqwrap":
        return seqwrap.linear_cross_entropy(h, w, y)
    if method == "seqwrap_recompute":
        return seqwrap.linear_cross_entropy(h, w, y, reduction="none").sum() / y.numel()
    raise ValueError(method)


def fwd_bwd(method: str, n: int, hidden: int, vocab: int, repeats: int = 2, device: str = "cpu"):
    torch.manual_seed(0)
    dev = torch.device(device)
    if method.startswith(("torch_fused", "torch_chunked")) and not hasattr(F, "linear_cross_entropy"):
        return {"skipped": "this torch has no F.linear_cross_entropy"}
    if method == "deepspeed_tiled":
        try:
            import deepspeed.runtime.sequence_parallel.ulysses_sp  # noqa: F401
        except ImportError as exc:
            return {"skipped": f"deepspeed not importable: {exc}"}
    h = torch.randn(n, hidden, device=dev, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev) / hidden**0.5).requires_grad_()
    y = torch.randint(0, vocab, (n,), device=dev)
    base = torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(repeats + 1):  # the first run warms up (repeats=0: time the single first run)
        h.grad = w.grad = None
        t0 = time.perf_counter()
        loss = _loss(method, h, w, y)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        del loss
    out = {"loss": float(_loss(method, h.detach(), w.detach(), y)), "time_s": min(times[1:] or times), "base_mb": base}
    if dev.type == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out
