"""Long-sequence training of an FSDP2-sharded model with SeCO (or SpaCO), one process per device.

    # two CPU processes over gloo (no GPU needed)
    torchrun --nproc_per_node 2 examples/fsdp2_seco.py --seq-len 4096 --chunk-size 512 --steps 10
    # GPUs: nccl, parameters / gradients / optimizer state on the host
    torchrun --nproc_per_node 8 examples/fsdp2_seco.py --model ./my-llama --cpu-offload --seq-len 65536

The model (a random byte-level Llama unless --model names a directory or a config.json) is sharded
with torch.distributed.fsdp.fully_shard per decoder layer and at the root; every rank trains on its
own windows of the Python standard library's sources (data parallel). Each engine step all-gathers
every FSDP group once, runs the chunks, and reduce-scatters once (seqwrap.parallel.FSDPSchedule;
--schedule layer keeps only one layer unsharded at a time). Rank 0 shows a progress bar with loss,
tokens/s (all ranks) and the collectives of the step.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random", help="model dir, config.json, or 'random'")
    p.add_argument("--engine", choices=["seco", "spaco"], default="seco")
    p.add_argument("--rate", type=float, default=0.25, help="SpaCO: fraction of chunks backpropagated")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--schedule", choices=["step", "layer"], default="step",
                   help="step: all-gather each group once per step; layer: FSDP's per-layer gather (least memory)")
    p.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPUOffloadPolicy (params/grads/optimizer on host)")
    p.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)")
    p.add_argument("--hidden", type=int, default=128, help="random model: hidden size")
    p.add_argument("--layers", type=int, default=4, help="random model: decoder layers")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args):
    import transformers

    path = Path(args.model)
    if args.model == "random":
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=max(args.seq_len, 2048))
    elif path.is_file():
        config = transformers.AutoConfig.from_pretrained(path)
    else:
        return transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    return transformers.AutoModelForCausalLM.from_config(config)


def shard(model, args, device):
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if args.bf16 else {}
    if args.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def main(argv=None) -> float:
    args = parse_args(argv)
    from tqdm import tqdm

    import seqwrap
    from seqwrap.data import random_windows, stdlib_bytes
    from seqwrap.parallel import FSDPSchedule, count_collectives

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = build_model(args)
    if cuda and not args.cpu_offload:
        model.to(device)
    model = shard(model, args, device)
    engine_cls = seqwrap.SpaCO if args.engine == "spaco" else seqwrap.SeCO
    extra = {"rate": args.rate, "seed": args.seed} if args.engine == "spaco" else {}
    engine = engine_cls(model, chunk_size=args.chunk_size, fsdp=FSDPSchedule(params=args.schedule), **extra)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    corpus = stdlib_bytes()
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own windows

    loss = float("nan")
    bar = tqdm(range(args.steps), disable=rank != 0, unit="step", desc=f"FSDP2 x{world} {args.engine}")
    for _ in bar:
        ids = random_windows(corpus, args.batch, args.seq_len, gen).to(device)
        start = time.perf_counter()
        with count_collectives() as comm:
            out = engine(ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        stats = torch.tensor([out.loss.item(), out.num_tokens], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        loss = stats[0].item() / world
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{stats[1].item() / elapsed:,.0f}",
                        ag=comm.all_gathers, rs=comm.reduce_scatters,
                        MiB=f"{(comm.all_gather_bytes + comm.reduce_scatter_bytes) / 2**20:.1f}")
    if rank == 0:
        print(f"final loss {loss:.4f} after {args.steps} steps on {world} ranks")
    return loss


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
