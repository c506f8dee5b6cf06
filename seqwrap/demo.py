"""The main job: train a small byte-level Llama on long windows of real text with SeCO.

    python -m seqwrap.demo [--seq-len 8192] [--chunk-size 1024] [--engine seco|spaco|full] ...

The model is built from a transformers LlamaConfig with random weights (no
download); the text is the Python standard library's sources. Each optimizer
step runs --micro-batches sequences of --seq-len tokens through the engine:
SeCO (exact gradients, one chunk's activations at a time; default), SpaCO
(backprop through a sample of chunks, unbiased) or plain full backprop (for
comparison). The micro-batch gradients accumulate in .grad with the step's
global token count as the normaliser, then AdamW steps. Prints loss, tokens/s
and peak memory (RSS on CPU, allocator peak on GPU).
"""
from __future__ import annotations

import argparse
import math
import resource
import time

import torch

import seqwrap
from seqwrap.data import random_windows, stdlib_bytes


def build_model(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=max(args.seq_len, 2048), rope_theta=10000.0, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--engine", choices=["seco", "spaco", "full"], default="seco")
    p.add_argument("--rate", type=float, default=0.25, help="SpaCO: probability of backpropagating a chunk")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro-batches", type=int, default=2, help="long sequences per optimizer step")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    corpus = stdlib_bytes()
    model = build_model(args).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    if args.engine == "seco":
        engine = seqwrap.SeCO(model, chunk_size=args.chunk_size)
    elif args.engine == "spaco":
        engine = seqwrap.SpaCO(model, chunk_size=args.chunk_size, rate=args.rate, seed=args.seed)
    else:
        engine = None
    n_params = sum(p.numel() for p in params)
    print(f"seqwrap {seqwrap.__version__} | {seqwrap.cuda_status()}")
    print(f"byte-level Llama, {n_params / 1e6:.2f}M parameters, {args.layers} layers, "
          f"sequence {args.seq_len} tokens x {args.micro_batches} per step, engine {args.engine}"
          + (f" (chunks of {args.chunk_size})" if engine else "")
          + f", corpus {corpus.numel() / 2**20:.1f} MiB of stdlib sources, device {device}")

    first_loss = last_loss = None
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        batch = [random_windows(corpus, 1, args.seq_len, gen).to(device) for _ in range(args.micro_batches)]
        num_items = (args.seq_len - 1) * args.micro_batches  # labels = input_ids, shifted: one fewer per sequence
        step_loss = 0.0
        for ids in batch:
            if engine is not None:  # forward + backward, chunk by chunk; .grad accumulates
                step_loss += engine(ids, num_items=num_items).loss.item()
            else:
                loss = model(input_ids=ids, labels=ids).loss / args.micro_batches
                loss.backward()
                step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        first_loss = step_loss if first_loss is None else first_loss
        last_loss = step_loss
        tok_s = args.seq_len * args.micro_batches / dt
        print(f"step {step:3d}/{args.steps}  loss {step_loss:.4f}  ppl {math.exp(step_loss):8.2f}  "
              f"{tok_s:8.0f} tok/s  peak mem {peak_memory_mb(device):8.1f} MiB", flush=True)
    total = time.perf_counter() - t_start
    print(f"done: loss {first_loss:.4f} -> {last_loss:.4f} in {total:.1f}s "
          f"({args.steps * args.micro_batches * args.seq_len} tokens)")
    return first_loss, last_loss


if __name__ == "__main__":
    main()
