"""`python -m seqwrap plan`: the plan for a config and a length, printed as a table.

    python -m seqwrap plan --config llama-3.1-8b --tokens 1M --device-memory 80GB --host-memory 1TB --lora-rank 16

--config: a config.json, a model folder, a known name (llama-3.1-8b) or a hub id already in the local
Hugging Face cache (read offline). Without --lora-rank: full fine-tuning. Without --device-memory:
the free memory of this machine's GPU (or its available memory, on a machine without one).
"""
from __future__ import annotations

import argparse

from .planner import PlanError, plan
from .units import parse_bytes, parse_tokens


def _arg(parse, what):
    def f(text):
        try:
            return parse(text, what)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("seqwrap.plan: ")) from None
    return f


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="plan chunk size / offload / checkpointing for a length and a memory budget",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="config.json, model folder, known name or cached hub id")
    p.add_argument("--tokens", required=True, type=_arg(parse_tokens, "--tokens"),
                   help="sequence length: 131072, 128K, 1M")
    p.add_argument("--device-memory", type=_arg(parse_bytes, "--device-memory"), help="per GPU: 80GB, 24GiB")
    p.add_argument("--host-memory", type=_arg(parse_bytes, "--host-memory"), help="for offload: 1TB (default: none)")
    p.add_argument("--reserve", type=_arg(parse_bytes, "--reserve"),
                   help="device memory kept back (default 10%% of it, at most 6GB)")
    p.add_argument("--lora-rank", type=_positive_int, help="LoRA rank on q/k/v/o (default: full fine-tuning)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16, fp32 (default: the config's)")
    p.add_argument("--world-size", type=_positive_int, default=1, help="Ulysses ranks (default 1)")
    p.add_argument("--shard", type=_positive_int, default=1,
                   help="FSDP2 / ZeRO-3 parameter sharding degree (default 1)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences per step (default 1)")
    p.set_defaults(run=run)


def run(args, parser) -> None:
    try:
        p = plan(args.config, args.tokens, device_memory=args.device_memory, host_memory=args.host_memory,
                 reserve=args.reserve, lora=args.lora_rank, dtype=args.dtype, world_size=args.world_size,
                 shard=args.shard, batch=args.batch)
    except (ValueError, TypeError) as exc:  # PlanError included: a usage error, no traceback
        parser.error(str(exc))
    print(p.table())


__all__ = ["add_parser", "run", "PlanError"]
