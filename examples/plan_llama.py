"""What fits where: seqwrap.plan for Llama-3.1-8B + LoRA at 128K / 512K / 1M tokens on 24 / 80 / 141 GB GPUs.

    python examples/plan_llama.py                          # LoRA r=16, 1 TB of host memory for offload
    python examples/plan_llama.py --host-memory 512GB --lora-rank 0 --detail 80GB:1M

Nothing is downloaded or run on a GPU: the config is the one seqwrap embeds ("llama-3.1-8b"), and
every number is the memory model's prediction (benchmarks/results/plan_calibration.md compares it
with measured peaks, on a CPU). --lora-rank 0: full fine-tuning. --detail MEMORY:TOKENS also prints
that plan's full table (the one `python -m seqwrap plan` prints).
"""
from __future__ import annotations

import argparse

import seqwrap
from seqwrap.planning import format_bytes

MEMORIES = ("24GB", "80GB", "141GB")
LENGTHS = ("128K", "512K", "1M")


def plans(host_memory: str | None, lora_rank: int, config: str = "llama-3.1-8b"):
    """{(memory, tokens): Plan, or the PlanError saying what it would need}."""
    out = {}
    for memory in MEMORIES:
        for tokens in LENGTHS:
            try:
                out[memory, tokens] = seqwrap.plan(config, tokens, device_memory=memory, host_memory=host_memory,
                                                   lora=lora_rank or None)
            except seqwrap.PlanError as exc:
                out[memory, tokens] = exc
    return out


def table(results) -> str:
    lines = ["| GPU memory | tokens | chunk_size | offload | grad ckpt | device peak | host peak | longest that fits |",
             "|---:|---:|---:|---|---|---:|---:|---:|"]
    for (memory, tokens), p in results.items():
        if isinstance(p, seqwrap.PlanError):
            lines.append(f"| {memory} | {tokens} | does not fit (needs {format_bytes(p.needed_device_memory)}) "
                         f"| | | | | {p.longest_seq:,} |")
            continue
        lines.append(f"| {memory} | {tokens} | {p.chunk_size:,} | {'on' if p.offload else 'off'} | "
                     f"{'on' if p.checkpointing else 'off'} | {format_bytes(p.device_peak)} | "
                     f"{format_bytes(p.host_peak) if p.offload else '-'} | {p.longest_seq:,} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host-memory", default="1TB", help="host memory for offload ('none': no offload)")
    ap.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on q/k/v/o; 0: full fine-tuning")
    ap.add_argument("--detail", default=None, help="MEMORY:TOKENS, e.g. 80GB:1M: print that plan in full")
    a = ap.parse_args(argv)
    host = None if a.host_memory.lower() == "none" else a.host_memory
    results = plans(host, a.lora_rank)
    training = f"LoRA r={a.lora_rank} on q/k/v/o" if a.lora_rank else "full fine-tuning"
    print(f"Llama-3.1-8B (bf16), {training}, SeCO, host memory {host or 'none'}; device budget = GPU memory minus "
          "a reserve of 10% (at most 6 GB)\n")
    print(table(results))
    if a.detail:
        memory, tokens = a.detail.split(":")
        print(f"\n{memory}, {tokens} tokens:\n")
        print(results.get((memory, tokens)) or seqwrap.plan("llama-3.1-8b", tokens, device_memory=memory,
                                                             host_memory=host, lora=a.lora_rank or None))
    return results


if __name__ == "__main__":
    main()
