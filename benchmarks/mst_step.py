"""One benchmark case, run in a fresh process by bench_minisequence.py: a HF Llama training step.

    python benchmarks/mst_step.py --seq 4096 --mode mst [--gc] [--vocab 32000 --hidden 256 ...]

mode: "hf" (plain transformers), "mst" (apply_minisequence: MLPs and LM head + loss),
"mst-mlp" (apply_minisequence(loss=False): MLPs only), "mst-loss" (LM head + loss only:
the MLP patches are taken off again, benchmark only). Prints one JSON line:
peak memory (CPU: peak RSS from getrusage; CUDA: torch.cuda.max_memory_allocated),
the memory held before the first step, and seconds per step (forward + backward), wall
clock and process CPU time (best of --steps after one warm-up step).
"""
import argparse
import json
import resource
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--mode", choices=("hf", "mst", "mst-mlp", "mst-loss"), required=True)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--gc", action="store_true", help="HF gradient checkpointing (non-reentrant)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()

    import transformers

    import seqwrap
    from seqwrap.hf.mst_mlp import auto_mlp_chunks

    transformers.logging.set_verbosity_error()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=max(a.seq, 2048),
        attn_implementation="sdpa", use_cache=False,
    )
    model = transformers.LlamaForCausalLM(cfg).to(dev).train()
    if a.gc:
        seqwrap.hf.enable_checkpointing(model, use_reentrant=None)
    if a.mode != "hf":
        seqwrap.apply_minisequence(model, loss=a.mode != "mst-mlp")
    if a.mode == "mst-loss":
        from seqwrap.hf.minisequence import _unpatch

        for layer in model.model.layers:
            _unpatch(layer.mlp)
    ids = torch.randint(0, a.vocab, (1, a.seq), device=dev)  # (B=1, L)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return out.loss.item()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()  # warm-up, also sets the peak
    times, cpu_times = [], []
    for _ in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # all threads of this process: less sensitive to other load
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (ru_maxrss is KiB on Linux)
    print(json.dumps({
        "seq": a.seq, "mode": a.mode, "gc": a.gc, "device": dev.type, "loss": loss, "peak_bytes": peak, "base_bytes": base,
        "sec_per_step": min(times), "cpu_sec_per_step": min(cpu_times), "mlp_chunks": auto_mlp_chunks(a.seq, a.hidden, a.intermediate),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
