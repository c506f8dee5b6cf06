"""A plan as a plain-text table (what `python -m seqwrap plan` prints)."""
from __future__ import annotations

from .units import format_bytes, format_tokens


def plan_table(p) -> str:
    s = p.subject
    shape = s.shape
    rows = [
        ("model", f"{s.name}: {shape.layers} layers, hidden {shape.hidden}, {shape.heads}/{shape.kv_heads} heads "
                  f"of {shape.head_dim}, vocab {shape.vocab}, {shape.params / 1e9:.3g}B parameters"),
        ("training", f"{s.training}, {s.dtype_bytes}-byte weights, AdamW"),
        ("sequence", f"{p.seq_len:,} tokens ({format_tokens(p.seq_len)}) x batch {p.batch}"
                     + (f", {p.world_size} Ulysses ranks" if p.world_size > 1 else "")
                     + (f", parameters sharded over {p.shard} ranks" if p.shard > 1 else "")),
        ("engine", f"seqwrap.{p.engine}(model, chunk_size={p.chunk_size}, offload={p.offload})"),
        ("chunks", f"{p.num_chunks} of {p.chunk_size:,} tokens"),
        ("offload", "on" if p.offload else "off"),
        ("gradient checkpointing", "on (seqwrap.hf.enable_checkpointing(model))" if p.checkpointing else "off"),
        ("device memory", f"{format_bytes(p.device_memory)} ({p.budget_source}); budget "
                          f"{format_bytes(p.device_budget)} after the reserve"),
        ("host memory", "not planned (no host budget)" if p.host_memory is None else format_bytes(p.host_memory)),
        ("predicted device peak", f"{format_bytes(p.device_peak)} ({100 * p.device_peak / p.device_budget:.0f}% "
                                  "of the budget)"),
        ("predicted host peak", format_bytes(p.host_peak)),
        ("longest sequence", f"{p.longest_seq:,} tokens in this memory (any setting); "
                             f"{p.longest_seq_as_planned:,} with this plan's settings"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for side, parts in (("device", p.device_breakdown), ("host", p.host_breakdown)):
        parts = {k: v for k, v in parts.items() if v}
        if not parts:
            continue
        lines += ["", f"{side} peak breakdown:"]
        w = max(len(k) for k in parts)
        lines += [f"  {k.ljust(w)}  {format_bytes(v):>9}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]
    if p.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in p.notes]
    return "\n".join(lines)
