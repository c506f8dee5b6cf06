"""Cases of benchmarks/bench_peers.py, each run in a fresh process (benchmarks/child.py run_case).

Every case returns {"time_s": best of `repeats` timed runs after a warm-up, "base_mb": RSS after the
set-up (inputs, model), ...}; the child adds peak_rss_mb, so peak - base is what the measured work
itself needed. One thread (OMP_NUM_THREADS=1 is set by the parent as well), float32, CPU.

  loss(method, n, hidden, vocab, chunk)  LM head + mean cross-entropy, forward + backward, hidden and
      weight requiring grad: "full" (torch, full (N, V) logits), "torch_chunked"
      (F.linear_cross_entropy with LinearCrossEntropyOptions(batch_chunk_size=chunk)), "deepspeed_tiled"
      (TiledFusedLogitsLoss, N / chunk shards), "seqwrap" (seqwrap.linear_cross_entropy, chunk_size=chunk)
  mlp(method, seq, hidden, intermediate, shards)  one Llama MLP, forward + backward, x and the weights
      requiring grad: "full", "deepspeed_tiled" (TiledMLP), "seqwrap" (MsT's MiniSequenceMLP through
      apply_minisequence's MLP patch); shards=None: each one's own rule (ALST: ceil(seq / hidden);
      seqwrap: from memory, mst_mlp.auto_mlp_chunks)
  step(method, seq, ...)  one training step of a small Llama: "hf_gc" (transformers + gradient
      checkpointing, non-reentrant), "seco" (seqwrap.SeCO, chunk), "streambp" (benchmarks/peers/streambp.py
      when it exists: see STREAMBP_HOOK)
"""
import importlib.util
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.child import rss_mb

# The StreamBP-style baseline is written by another branch (secomem) in benchmarks/peers/streambp.py, with
# a function step(model, input_ids, labels, chunk) -> loss that runs one forward + backward. Until it is
# on main, the "streambp" case reports itself as skipped with this reason.
STREAMBP_HOOK = Path(__file__).resolve().parent / "peers" / "streambp.py"


def _timed(run, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _deepspeed_sp():
    try:
        from deepspeed.runtime.sequence_parallel import ulysses_sp
    except Exception as exc:  # not installed, or it cannot import on this machine
        return None, f"deepspeed cannot import: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return ulysses_sp, None


def loss(method: str, n: int, hidden: int, vocab: int, chunk: int, repeats: int = 2):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    y = torch.randint(0, vocab, (n,))
    if method == "full":
        fn = lambda: F.cross_entropy(F.linear(h, w), y)  # noqa: E731
    elif method == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy"):
            return {"skipped": f"torch {torch.__version__} has no F.linear_cross_entropy"}
        opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
        fn = lambda: F.linear_cross_entropy(h, w, y, options=opts)  # noqa: E731
    elif method == "deepspeed_tiled":
        sp, why = _deepspeed_sp()
        if sp is None:
            return {"skipped": why}
        head = torch.nn.Module()

        def shard_loss(self, xs, ys):
            return F.cross_entropy(F.linear(xs, w), ys.view(-1))

        shards = math.ceil(n / chunk)
        fn = lambda: sp.TiledFusedLogitsLoss.apply(shard_loss, head, h.view(1, n, hidden), y.view(1, n), None,  # noqa: E731
                                                   shards, [w], "mean")
    elif method == "seqwrap":
        import seqwrap

        fn = lambda: seqwrap.linear_cross_entropy(h, w, y, chunk_size=chunk)  # noqa: E731
    else:
        raise ValueError(method)
    base = rss_mb()

    def run():
        h.grad = w.grad = None
        out = fn()
        out.backward()

    t = _timed(run, repeats)
    return {"time_s": t, "base_mb": base, "loss": float(fn().detach())}


def _llama_mlp(seq: int, hidden: int, intermediate: int):
    """One Llama MLP (seed 0, one thread), its input x (1, seq, hidden) requiring grad, an upstream
    gradient of the same shape, and the class forward bound to the module: (module, x, gy, original)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = LlamaMLP(transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate))
    x = torch.randn(1, seq, hidden, requires_grad=True)
    gy = torch.randn(1, seq, hidden)
    return module, x, gy, type(module).forward.__get__(module)


def _tiled(sp, module, x, original, shards: int):
    """DeepSpeed's TiledMLP over `module` with `shards` shards (a call of forward)."""
    return lambda: sp.TiledMLP.apply(lambda self, xs: original(xs), module, x, shards, list(module.parameters()))


def _mst(module, x, hidden: int, intermediate: int, shards: int | None):
    """MsT's MLP over `module` with `shards` mini-sequences (None: seqwrap's rule): (call, shards used)."""
    from seqwrap.hf.minisequence import mlp_kind, mst_mlp_forward
    from seqwrap.hf.mst_mlp import auto_mlp_chunks

    used = shards or auto_mlp_chunks(x.shape[1], hidden, intermediate, dtype_bytes=4, kind=mlp_kind(module))
    module._seqwrap_mst = dict(forward=None, chunks=used, hidden_size=hidden, intermediate_size=intermediate,
                               kind=mlp_kind(module), memory=None)
    return (lambda: mst_mlp_forward(module, x)), used


def mlp(method: str, seq: int, hidden: int, intermediate: int, shards=None, repeats: int = 2):
    from seqwrap.hf.mst_mlp import alst_mlp_shards

    module, x, gy, original = _llama_mlp(seq, hidden, intermediate)
    if method == "full":
        fn, used = (lambda: original(x)), 1
    elif method == "deepspeed_tiled":
        sp, why = _deepspeed_sp()
        if sp is None:
            return {"skipped": why}
        used = shards or alst_mlp_shards(seq, hidden)
        fn = _tiled(sp, module, x, original, used)
    elif method == "seqwrap":
        fn, used = _mst(module, x, hidden, intermediate, shards)
    else:
        raise ValueError(method)
    base = rss_mb()

    def run():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        fn().backward(gy)

    t = _timed(run, repeats)
    return {"time_s": t, "base_mb": base, "shards": used}


def mlp_ab(seq: int, hidden: int, intermediate: int, shards: int, rounds: int = 8):
    """MsT's MLP against DeepSpeed's TiledMLP at the same shard count, interleaved in ONE process (one
    thread, the same module, input and upstream gradient; the order alternates each round), so that
    machine drift hits both alike: separate single runs in fresh processes differ by +-10% here.
    Returns the per-round times of forward + backward and the ratios mst / tiled."""
    import statistics

    sp, why = _deepspeed_sp()
    if sp is None:
        return {"skipped": why}
    module, x, gy, original = _llama_mlp(seq, hidden, intermediate)
    fns = {"mst": _mst(module, x, hidden, intermediate, shards)[0], "tiled": _tiled(sp, module, x, original, shards)}

    def run(name):
        x.grad = None
        for p in module.parameters():
            p.grad = None
        t0 = time.perf_counter()
        fns[name]().backward(gy)
        return time.perf_counter() - t0

    grads = {}
    for name in fns:  # warm-up, and the two gradients, which must agree
        run(name)
        grads[name] = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads["mst"], grads["tiled"]))
    times = {name: [] for name in fns}
    for i in range(rounds):
        for name in (("mst", "tiled") if i % 2 == 0 else ("tiled", "mst")):
            times[name].append(run(name))
    ratios = [a / b for a, b in zip(times["mst"], times["tiled"])]
    return {"mst_s": statistics.median(times["mst"]), "tiled_s": statistics.median(times["tiled"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": rounds, "grad_rel_diff": err}


def step(method: str, seq: int, layers: int = 4, hidden: int = 256, intermediate: int = 1024, vocab: int = 32000,
         heads: int = 4, chunk: int = 1024, repeats: int = 1):
    import transformers

    torch.set_num_threads(1)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=max(seq, 4096), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.train()
    ids = torch.randint(3, vocab, (1, seq), generator=torch.Generator().manual_seed(1))
    if method == "hf_gc":
        import seqwrap.hf

        seqwrap.hf.enable_checkpointing(model, use_reentrant=False)
        fn = lambda: model(input_ids=ids, labels=ids).loss.backward()  # noqa: E731
    elif method == "seco":
        import seqwrap

        engine = seqwrap.SeCO(model, chunk_size=chunk)
        fn = lambda: engine(ids, labels=ids)  # noqa: E731
    elif method == "streambp":
        if not STREAMBP_HOOK.exists():
            return {"skipped": "no StreamBP-style baseline in benchmarks/peers/ yet (branch secomem writes "
                               "benchmarks/peers/streambp.py)"}
        spec = importlib.util.spec_from_file_location("streambp_peer", STREAMBP_HOOK)
        peer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peer)
        fn = lambda: peer.streambp_backward(model, ids, chunk)  # noqa: E731  (labels = ids, as the others)
    else:
        raise ValueError(method)
    base = rss_mb()

    def run():
        model.zero_grad(set_to_none=True)
        fn()

    t = _timed(run, repeats)
    return {"time_s": t, "base_mb": base}
