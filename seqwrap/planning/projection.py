"""A projection (not a measurement): the longest trainable sequence for Llama-3.1-8B with SeCO on 1, 8
and 64 H200s, from seqwrap.planning.distributed. `python -m seqwrap.planning.projection` prints it;
benchmarks/bench_distributed_projection.py writes benchmarks/results/distributed_projection.md."""
from __future__ import annotations

from ..memory_model import DecoderShape
from .distributed import Layout, longest_parallel_sequence, parallel_peak

GB = 1e9
DEVICE_GB, RESERVE_GB = 141.0, 6.0        # H200; kept back for CUDA context, NCCL, allocator slack
HOST_GB_PER_NODE, GPUS_PER_NODE = 2000.0, 8
CHUNK, LORA_RANK = 16384, 16
# full fine-tuning under mixed precision: float32 gradients (reduce dtype), float32 master copy + 2 AdamW moments
FULL_STATE = dict(grad_bytes=4, optim_bytes=12)

# (GPUs, sp, shard, FSDPSchedule (params, grads), note)
LAYOUTS = [
    (1, 1, 1, ("step", "step"), "one GPU"),
    (8, 1, 8, ("layer", "chunk"), "FSDP2 / ZeRO-3 only (data parallel): no sequence parallelism"),
    (8, 8, 8, ("step", "step"), "Ulysses 8 x sharding 8, gather once per step"),
    (8, 8, 8, ("layer", "chunk"), "Ulysses 8 x sharding 8, per-layer gather"),
    (64, 32, 2, ("layer", "chunk"), "2-D mesh: Ulysses 32 x FSDP2 2 (sp <= 32 query heads)"),
    (64, 32, 64, ("layer", "chunk"), "Ulysses 32 x ZeRO-3 over all 64 (ALST-style)"),
    (64, 8, 64, ("layer", "chunk"), "Ulysses 8 x ZeRO-3 over all 64 (8 sequences at once)"),
]


def _cell(shape, layout, host_per_rank, lora):
    kw = dict(dtype_bytes=2, grad_ckpt=True)
    kw.update(dict(lora_params=shape.lora_params(LORA_RANK)) if lora else FULL_STATE)
    budget = (DEVICE_GB - RESERVE_GB) * GB
    n = longest_parallel_sequence(shape, layout, budget, host_per_rank if layout.offload else None, CHUNK, **kw)
    if n <= 0:
        return "does not fit" if n == 0 else "unbounded"
    est = parallel_peak(shape, n, CHUNK, layout, **kw)
    host = f", host {est.host_total / GB:.0f} GB" if est.host_total else ""
    return f"{n / 1e6:.2f}M ({est.device_total / GB:.0f} GB{host})" if n >= 1e6 else \
        f"{n / 1e3:.0f}K ({est.device_total / GB:.0f} GB{host})"


def llama8b_projection() -> str:
    s = DecoderShape.llama_3_1_8b()
    host_per_rank = HOST_GB_PER_NODE / GPUS_PER_NODE * GB
    lines = [
        "# Projection: longest trainable sequence, Llama-3.1-8B, SeCO, 1 / 8 / 64 H200s", "",
        "**A projection from the memory model (seqwrap.planning.distributed), not a measurement.** "
        "No GPU run backs these numbers; the model's single-device terms were checked against CPU runs "
        "(benchmarks/results/fpdt.md, within 8%), its multi-rank collectives against 2-4 gloo ranks "
        "(benchmarks/results/distributed.md).", "",
        "Assumptions:",
        f"- H200: {DEVICE_GB:.0f} GB per GPU, {RESERVE_GB:.0f} GB kept back (CUDA context, NCCL, allocator "
        f"slack): {DEVICE_GB - RESERVE_GB:.0f} GB budget per rank. {GPUS_PER_NODE} GPUs per node, "
        f"{HOST_GB_PER_NODE:.0f} GB host memory per node: {HOST_GB_PER_NODE / GPUS_PER_NODE:.0f} GB per rank.",
        f"- bf16 weights and activations; HF gradient checkpointing on; SeCO chunk {CHUNK} tokens of the whole "
        "sequence (C/sp per rank); batch 1; chunked (block-by-block) attention.",
        "- Full fine-tune: float32 gradients, float32 master weights and AdamW moments (18 bytes per parameter "
        "with the bf16 weight), all sharded over the sharding degree; plus the unsharded bf16 parameters and "
        "float32 gradients the schedule holds (step: the whole model; layer/chunk: root + 2 layers).",
        f"- LoRA: r={LORA_RANK} on q/k/v/o ({s.lora_params(LORA_RANK) / 1e6:.1f}M adapter parameters, float32 "
        "with AdamW: 16 bytes each); frozen bf16 base weights sharded the same way.",
        "- Offload on: SeCO offload (past K/V, relayed K/V gradient sums, checkpointed layer inputs in host "
        "memory) and FSDP2 CPUOffloadPolicy / ZeRO-Offload (sharded weights, gradients, optimizer state on the "
        "host). Off: everything on the device.",
        "- Ulysses degree sp must divide the 32 query heads; with sp > 8 the 8 K/V heads are replicated to 32 "
        "first (4x the stored K/V per token). Ulysses x sharding needs issue 22 item 1 (branch dist) for FSDP2 "
        "and item 2 (branch zero3) for ZeRO-3.",
        "- Not counted: fragmentation beyond the reserve, NCCL buckets beyond one group, the RoPE range "
        "(Llama-3.1-8B's RoPE settings stop at 128K positions: longer runs need a longer RoPE scaling).", "",
        "Each cell: longest sequence (tokens; device peak per rank at that length, host per rank).", "",
        "| GPUs | layout | sp | shard | schedule | offload | full fine-tune | LoRA r=16 |",
        "|---:|---|---:|---:|---|---|---:|---:|",
    ]
    for gpus, sp, shard, (params, grads), note in LAYOUTS:
        for offload in (False, True):
            layout = Layout(sp=sp, shard=shard, params=params, grads=grads, offload=offload, state_offload=offload)
            sched = f"{params}/{grads}" if shard > 1 else "-"
            lines.append(f"| {gpus} | {note} | {sp} | {shard} | {sched} | {'on' if offload else 'off'} | "
                         f"{_cell(s, layout, host_per_rank, False)} | {_cell(s, layout, host_per_rank, True)} |")
    lines += ["", "Reading it: without offload the past K/V and their float32 relay sums (640 KiB per token "
              "on one GPU, divided by sp) fill the device; with offload they fill each rank's share of host "
              "memory instead, so the host per node sets the limit. Sequence parallelism divides every "
              "per-token term by sp; sharding only divides the static state, and under params=\"step\" the "
              "whole unsharded model stays on every rank for the step. Past sp = 8 (the K/V heads) Llama-3.1-8B gains "
              "nothing: the K/V heads are replicated to the query heads, so a rank stores as many K/V bytes per "
              "token at sp = 32 as at sp = 8; on 64 GPUs, Ulysses 8 with 8 sequences in parallel reaches the "
              "same length with 8x the tokens per step. Offload is then bounded by host memory per rank, not "
              "by the GPU count."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(llama8b_projection())
