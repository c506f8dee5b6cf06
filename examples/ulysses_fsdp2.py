"""Ulysses sequence parallelism x FSDP2 parameter sharding under SeCO, one process per device.

    # two CPU processes over gloo (no GPU needed)
    torchrun --nproc_per_node 2 examples/ulysses_fsdp2.py --seq-len 2048 --chunk-size 512 --steps 10
    # the two halves alone: --mode ulysses (sequence split, parameters whole) / --mode fsdp2 (data parallel)
    torchrun --nproc_per_node 2 examples/ulysses_fsdp2.py --mode ulysses

--mode both (default): one sequence per step is split over the ranks (each holds chunk_size / P tokens of
every chunk: seqwrap.parallel.shard_batch), attention trades sequence shards for head shards with an
all-to-all (seqwrap.parallel.apply_ulysses), and the parameters are sharded over the same ranks with
torch.distributed.fsdp.fully_shard per decoder layer and at the root: apply_ulysses, then fully_shard,
then seqwrap.SeCO. (Until issue 22 item 1 lands, SeCO refuses this combination with NotImplementedError.)
--mode ulysses: the same without fully_shard (gradients summed over the ranks once per step);
--mode fsdp2: fully_shard only, every rank its own windows (data parallel).
The text is the Python standard library's sources (seqwrap.data.stdlib_bytes), bytes as tokens, on a
random byte-level Llama. Rank 0 shows a progress bar with loss, tokens/s and the step's collectives.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["both", "ulysses", "fsdp2"], default="both")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--hidden", type=int, default=128, help="random model: hidden size")
    p.add_argument("--layers", type=int, default=4, help="random model: decoder layers")
    p.add_argument("--heads", type=int, default=4, help="random model: attention heads (a multiple of the ranks)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args):
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=max(1, args.heads // 2),
                                      max_position_embeddings=max(args.seq_len, 2048))
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    return transformers.LlamaForCausalLM(config)


def main(argv=None) -> float:
    args = parse_args(argv)
    from tqdm import tqdm

    import seqwrap
    from seqwrap.data import random_windows, stdlib_bytes
    from seqwrap.parallel import apply_ulysses, count_collectives, shard_batch

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    ulysses, fsdp = args.mode in ("both", "ulysses"), args.mode in ("both", "fsdp2")
    model = build_model(args)
    if ulysses:
        apply_ulysses(model, group)          # attention: sequence shards <-> head shards (all-to-all)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    engine = seqwrap.SeCO(model, chunk_size=args.chunk_size)   # both: NotImplementedError until item 1 lands
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    corpus = stdlib_bytes()
    # Ulysses: every rank draws the same windows (they split one sequence); FSDP2 alone: each its own
    gen = torch.Generator().manual_seed(args.seed * 1000 + (0 if ulysses else rank))
    tokens_per_step = args.seq_len * (1 if ulysses else world)

    loss = float("nan")
    bar = tqdm(range(args.steps), disable=rank != 0, unit="step", desc=f"{args.mode} x{world} SeCO")
    for _ in bar:
        ids = random_windows(corpus, 1, args.seq_len, gen)
        batch = {"input_ids": ids, "labels": ids}
        if ulysses:  # this rank's chunk_size / P tokens of every chunk
            batch = shard_batch(batch, group, chunk_size=args.chunk_size)
        start = time.perf_counter()
        with count_collectives() as comm:
            out = engine(**batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = torch.tensor([time.perf_counter() - start, out.loss.item()], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX if ulysses else dist.ReduceOp.SUM)
        # Ulysses: every rank has the whole sequence's loss (max = it); FSDP2: the mean of the ranks' losses
        loss = elapsed[1].item() if ulysses else elapsed[1].item() / world
        seconds = elapsed[0].item() if ulysses else elapsed[0].item() / world
        moved = comm.all_gather_bytes + comm.reduce_scatter_bytes + comm.all_reduce_bytes + comm.all_to_all_bytes
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}", ag=comm.all_gathers,
                        rs=comm.reduce_scatters, a2a=comm.all_to_alls, MiB=f"{moved / 2**20:.1f}")
    if rank == 0:
        print(f"final loss {loss:.4f} after {args.steps} steps on {world} ranks ({args.mode})")
    return loss


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
