"""seqwrap.plan: engine, chunk size, offload and gradient checkpointing for a sequence length and a budget.

    p = seqwrap.plan("llama-3.1-8b", "512K", device_memory="80GB", host_memory="1TB", lora=16)
    p.chunk_size, p.offload, p.checkpointing     # what to pass: SeCO(model, p.chunk_size, offload=p.offload)
    p.device_peak, p.device_breakdown            # predicted bytes (memory_model.seco_peak), per component
    p.longest_seq                                # longest sequence any setting fits in this memory
    print(p)                                     # the table

How it chooses. The settings, fastest first: (1) nothing, (2) HF gradient checkpointing, (3) offload,
(4) offload + checkpointing; offload only with a host budget and a device that is not the host (a
model on the CPU, or a config planned for this CPU-only machine with device_memory=None).
Chunks are powers of two from min_chunk (and the whole sequence when it is shorter than max_chunk).
The first setting whose largest fitting chunk reaches min(target_chunk, seq_len) is taken with that
chunk (capped at max_chunk); when none reaches it, the setting with the largest fitting chunk. Fits:
the predicted device peak <= device_memory - reserve, and the host peak <= host_memory.

Budgets. device_memory=None reads the free memory of the model's device (the current CUDA device, or
the CPU, for a config) and adds back what the model's parameters and gradients already hold there
(the prediction counts them). host_memory=None: this machine's available memory when device_memory
is read too and the device is a GPU; otherwise offload is not planned. reserve (default: 10% of the
device memory, at most 6 GB) is kept back for what the model does not count: CUDA context, library
workspaces, allocator fragmentation.

world_size > 1 plans one rank of Ulysses sequence parallelism, and shard > 1 one rank of FSDP2 / ZeRO-3
parameter sharding over `shard` ranks (FSDPSchedule() default: every group all-gathered once for the
step, one reduce-scatter at its end), with the P-rank model (planning/distributed.py parallel_peak,
Layout(sp=world_size, shard=shard)): each rank holds seq_len / world_size tokens and chunk_size /
world_size of each chunk, plus one attention call's all-to-all buffers (K/V heads replicated to the
query heads when world_size does not divide them); the stored weights, gradients and optimizer state
are divided by `shard`, and the step's unsharded parameters and gradients are added. world_size = 1 and
shard = 1 is the single-device model (memory_model.seco_peak) exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..memory_model import MemoryEstimate, longest_sequence, seco_peak
from .distributed import Layout, longest_parallel_sequence, parallel_peak
from .budget import available_host_memory, default_device, free_device_memory, resident_bytes
from .source import Subject, describe
from .units import format_bytes, format_tokens, parse_bytes, parse_tokens

# (checkpointing, offload), fastest first
SETTINGS = ((False, False), (True, False), (False, True), (True, True))
ENGINES = ("SeCO", "SpaCO")


class PlanError(ValueError):
    """Nothing fits: the message says the smallest memory that would, or the longest sequence that does.
    needed_device_memory: the least device memory (reserve included) an allowed setting needs at this length
    (None: no setting allowed); longest_seq: the longest sequence that fits the given memory (0: none)."""

    def __init__(self, message: str, needed_device_memory: int | None = None, longest_seq: int = 0):
        super().__init__(message)
        self.needed_device_memory, self.longest_seq = needed_device_memory, longest_seq


@dataclass
class Plan:
    engine: str
    seq_len: int
    chunk_size: int               # tokens of the whole sequence per chunk
    offload: bool
    checkpointing: bool
    device_peak: int              # predicted bytes, per rank
    host_peak: int
    device_breakdown: dict
    host_breakdown: dict
    device_memory: int            # the budget given or read, and what the reserve leaves of it
    device_budget: int
    host_memory: int | None       # None: offload not planned
    longest_seq: int              # longest sequence any allowed setting fits in this memory
    longest_seq_as_planned: int   # ... with this plan's chunk, offload and checkpointing
    subject: Subject
    batch: int = 1
    world_size: int = 1           # Ulysses ranks
    budget_source: str = ""
    notes: list[str] = field(default_factory=list)
    shard: int = 1                # FSDP2 / ZeRO-3 sharding degree

    @property
    def num_chunks(self) -> int:
        return -(-self.seq_len // self.chunk_size)

    def engine_kwargs(self) -> dict:
        """Arguments for seqwrap.SeCO / SpaCO (gradient checkpointing is the model's: see .checkpointing)."""
        return {"chunk_size": self.chunk_size, "offload": self.offload}

    def summary(self) -> str:
        """One line: what was chosen and the predicted peak."""
        host = f", host {format_bytes(self.host_peak)}" if self.offload else ""
        n = self.num_chunks
        chunks = f"{n} chunk{'s' if n > 1 else ''} of {format_tokens(self.seq_len)} tokens"
        return (f"chunk_size={self.chunk_size} ({chunks}), "
                f"offload={'on' if self.offload else 'off'}, gradient checkpointing="
                f"{'on' if self.checkpointing else 'off'}, predicted peak {format_bytes(self.device_peak)} of a "
                f"{format_bytes(self.device_budget)} budget{host}")

    def table(self) -> str:
        from .table import plan_table

        return plan_table(self)

    __str__ = table


def plan(model_or_config, seq_len, *, device_memory=None, host_memory=None, lora="auto", dtype="auto",
         world_size: int = 1, shard: int = 1, batch: int = 1, engine: str = "SeCO", offload: bool | None = None,
         checkpointing: bool | None = None, attention: str = "chunked", reserve=None, min_chunk: int = 256,
         target_chunk: int = 4096, max_chunk: int = 16384) -> Plan:
    """The plan for training `model_or_config` on sequences of `seq_len` tokens (see the module docstring).

    seq_len: tokens per sequence (an int, or "128K" / "1M"); device_memory / host_memory / reserve:
    bytes, or "80GB" / "24GiB". offload / checkpointing: None lets the planner choose; True / False
    fixes them. attention: the engine's attention mode ("concat" adds its O(T) copies). world_size: Ulysses
    ranks; shard: FSDP2 / ZeRO-3 sharding degree (see the module docstring)."""
    seq_len = parse_tokens(seq_len)
    for what, v, lo in (("world_size", world_size, 1), ("shard", shard, 1), ("batch", batch, 1), ("min_chunk", min_chunk, 1),
                        ("target_chunk", target_chunk, 1), ("max_chunk", max_chunk, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"seqwrap.plan: {what} must be an int >= {lo}, got {v!r}")
    if engine not in ENGINES:
        raise ValueError(f"seqwrap.plan: engine must be one of {ENGINES}, got {engine!r}")
    if attention not in ("chunked", "concat"):
        raise ValueError(f"seqwrap.plan: attention must be 'chunked' or 'concat', got {attention!r}")
    for what, v in (("offload", offload), ("checkpointing", checkpointing)):
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"seqwrap.plan: {what} must be None (the planner chooses), True or False, got {v!r}")
    if offload and attention == "concat":
        raise ValueError("seqwrap.plan: offload needs attention='chunked'")
    if world_size > 1 and attention != "chunked":
        raise ValueError("seqwrap.plan: Ulysses (world_size > 1) needs attention='chunked'")
    if seq_len % world_size:
        raise ValueError(f"seqwrap.plan: seq_len {seq_len} is not a multiple of world_size {world_size}")
    subject = describe(model_or_config, lora=lora, dtype=dtype)

    device = _device_of(subject, device_memory)
    if device_memory is None:
        device_memory = free_device_memory(device) + (resident_bytes(subject.model, device) if subject.model else 0)
        source = f"free memory of {device}" + (" + the model's resident parameters" if subject.model else "")
        if host_memory is None and device.type == "cuda":
            host_memory = available_host_memory()
            source += "; host: this machine's available memory"
    else:
        device_memory = parse_bytes(device_memory, "device_memory")
        source = "given"
    host = None if host_memory is None else parse_bytes(host_memory, "host_memory")
    reserve = min(device_memory // 10, 6 * 10**9) if reserve is None else _reserve(reserve)
    budget = device_memory - reserve
    if budget <= 0:
        raise ValueError(f"seqwrap.plan: the reserve ({format_bytes(reserve)}) leaves nothing of device_memory "
                         f"({format_bytes(device_memory)})")

    notes = list(subject.notes)
    offload_ok = host is not None and device.type != "cpu"
    if offload and not offload_ok:
        raise ValueError("seqwrap.plan: offload=True needs a host budget (host_memory=) and a device that is not the "
                         "CPU itself" + (f" (planning for {device})" if device.type == "cpu" else ""))
    settings = [(ck, off) for ck, off in SETTINGS
                if (checkpointing is None or ck == checkpointing) and (offload is None or off == offload)
                and (not off or offload_ok)]
    if attention == "concat":
        settings = [(ck, off) for ck, off in settings if not off]
    model = _Model(subject, batch, world_size, attention, shard)
    chunks = _chunk_candidates(seq_len, world_size, min_chunk, max_chunk)

    best = _choose(model, seq_len, settings, chunks, budget, host, target_chunk)
    longest = max((model.longest(c, s, budget, host) for s in settings for c in _chunk_candidates(
        1 << 62, world_size, min_chunk, max_chunk)), default=0)
    if best is None:
        msg, needed = _nothing_fits(subject, model, seq_len, settings, chunks, budget, host, reserve, device_memory,
                                    longest)
        if offload is None and host is None and device.type != "cpu" and attention == "chunked" and chunks:
            est = model.peak(seq_len, min(chunks), (True, True))
            msg += (f". With offload (pass host_memory=) it would need {format_bytes(est.device_total + reserve)} of "
                    f"device and {format_bytes(est.host_total)} of host memory")
        raise PlanError(msg, needed, longest)
    chunk, (ckpt, off) = best
    est = model.peak(seq_len, chunk, (ckpt, off))
    if off:
        parked = "checkpointed layer inputs" if ckpt else "saved activations"
        notes.append(f"offload parks past K/V, relayed gradients and {parked} in pinned host memory")
    if subject.max_positions is not None and seq_len > subject.max_positions:
        notes.append(f"seq_len {seq_len:,} is above the config's max_position_embeddings={subject.max_positions:,}: "
                     "the engines take it for rotary models (the model was not trained that long: consider RoPE "
                     "scaling) and refuse it for learned absolute positions")
    if world_size > 1:
        notes.append(f"per rank of {world_size} (Ulysses): {seq_len // world_size:,} tokens and one attention call's "
                     "all-to-all buffers" + ("" if shard > 1 else "; weights and trainable state whole on every rank"))
    if shard > 1:
        notes.append(f"weights, gradients and optimizer state sharded over {shard} ranks (FSDP2 / ZeRO-3), all "
                     "parameters and the trainable gradients unsharded for the step (FSDPSchedule() default)")
    if device.type == "cpu":
        notes.append("planning for the CPU: device and host are one memory, offload is not planned")
    return Plan(engine, seq_len, chunk, off, ckpt, est.device_total, est.host_total, dict(est.device), dict(est.host),
                device_memory, budget, host, longest, model.longest(chunk, (ckpt, off), budget, host), subject,
                batch, world_size, source, notes, shard)


def _choose(model, seq_len, settings, chunks, budget, host, target_chunk):
    """(chunk, setting): the first setting (fastest first) whose largest fitting chunk reaches
    min(target_chunk, seq_len); else the largest fitting chunk of any setting; None when nothing fits."""
    best = None
    for setting in settings:
        fitting = [c for c in chunks if model.fits(seq_len, c, setting, budget, host)]
        if not fitting:
            continue
        c = max(fitting)
        if c >= min(target_chunk, seq_len):
            return c, setting
        if best is None or c > best[0]:
            best = (c, setting)
    return best


class _Model:
    """One rank's peak for one subject, seq_len and chunk of the whole sequence in: memory_model.seco_peak on
    one device, distributed.parallel_peak under Ulysses (world) and / or sharding (shard)."""

    def __init__(self, subject: Subject, batch: int, world: int, attention: str, shard: int = 1):
        self.s, self.batch, self.world, self.attention, self.shard = subject, batch, world, attention, shard

    def _parallel(self) -> bool:
        return self.world > 1 or self.shard > 1

    def _kwargs(self, ckpt: bool) -> dict:
        return dict(batch=self.batch, dtype_bytes=self.s.dtype_bytes, lora_params=self.s.adapter_params,
                    grad_ckpt=ckpt)

    def peak(self, seq_len: int, chunk: int, setting) -> MemoryEstimate:
        ckpt, off = setting
        if self._parallel():
            return parallel_peak(self.s.shape, seq_len, chunk, Layout(sp=self.world, shard=self.shard, offload=off),
                                 **self._kwargs(ckpt))
        return seco_peak(self.s.shape, seq_len, chunk, offload=off, attention=self.attention, **self._kwargs(ckpt))

    def fits(self, seq_len, chunk, setting, budget, host) -> bool:
        est = self.peak(seq_len, chunk, setting)
        return est.device_total <= budget and (host is None or est.host_total <= host)

    def longest(self, chunk: int, setting, budget, host) -> int:
        ckpt, off = setting
        if self._parallel():
            return longest_parallel_sequence(self.s.shape, Layout(sp=self.world, shard=self.shard, offload=off),
                                             budget, host, chunk, **self._kwargs(ckpt))
        return longest_sequence(self.s.shape, budget, host, chunk, offload=off, attention=self.attention,
                                **self._kwargs(ckpt))


def _chunk_candidates(seq_len: int, world: int, min_chunk: int, max_chunk: int) -> list[int]:
    """Powers of two in [min_chunk, min(max_chunk, seq_len)), and seq_len itself when <= max_chunk;
    multiples of world only."""
    out, c = [], 1
    while c < min(max_chunk + 1, seq_len):
        if c >= min_chunk and c % world == 0:
            out.append(c)
        c *= 2
    if seq_len <= max_chunk and seq_len % world == 0:
        out.append(seq_len)
    return out


def _device_of(subject: Subject, device_memory) -> torch.device:
    """The model's device; for a config, this machine's default device when its memory is to be read, else
    an accelerator ("cuda" stands for any device that is not the host)."""
    if subject.model is not None:
        p = next(subject.model.parameters(), None)
        if p is not None:
            return p.device
    return default_device() if device_memory is None else torch.device("cuda")


def _reserve(value) -> int:
    if value == 0:
        return 0
    return parse_bytes(value, "reserve")


def _nothing_fits(subject, model, seq_len, settings, chunks, budget, host, reserve, device_memory, longest) -> str:
    head = (f"seqwrap.plan: nothing fits for {subject.name} ({subject.training}) at {seq_len:,} tokens in "
            f"{format_bytes(device_memory)} of device memory ({format_bytes(budget)} after a "
            f"{format_bytes(reserve)} reserve)" + (f" and {format_bytes(host)} of host memory" if host else ""))
    if not settings or not chunks:
        return head + ": no setting or chunk size is allowed by the arguments", None
    # the least device memory any allowed setting needs at this length (with the host it needs)
    needs = []
    for s in settings:
        for c in chunks:
            est = model.peak(seq_len, c, s)
            needs.append((est.device_total, est.host_total, c, s))
    dev, hst, c, (ckpt, off) = min(needs)
    how = f"chunk_size={c}, offload={'on' if off else 'off'}, checkpointing={'on' if ckpt else 'off'}"
    fix = (f"; it would need at least {format_bytes(dev + reserve)} of device memory ({how}"
           + (f", {format_bytes(hst)} of host memory" if off else "") + ")")
    if host is not None and off and hst > host:
        fix += " - the host budget is short too"
    if longest > 0:
        fix += f"; the longest sequence that fits this memory is {longest:,} tokens"
    else:
        static = model.peak(min(chunks), min(chunks), settings[-1]).device
        fix += ("; no sequence fits this memory: the weights, gradients and optimizer state alone take "
                + format_bytes(static["weights"] + static["gradients"] + static["optimizer state"]))
    return head + fix, dev + reserve
