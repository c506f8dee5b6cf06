"""Peak-memory model of a SeCO training step, and the longest sequence that fits.

    shape = DecoderShape.from_config(model.config)            # or DecoderShape.llama_3_1_8b()
    est = seco_peak(shape, seq_len=1 << 20, chunk=16384, dtype_bytes=2, lora_params=13_631_488,
                    grad_ckpt=True, offload=True)
    est.device_total, est.host_total, est.device, est.host   # bytes, and bytes per component
    longest_sequence(shape, device_bytes=80e9, host_bytes=1e12, chunk=16384, ...)

`python -m seqwrap.memory_model` prints the Llama-3.1-8B + LoRA table of benchmarks/results/fpdt.md.

What the model counts (B = batch, T = sequence, C = chunk, L layers, H hidden, I intermediate,
Hq / Hkv heads of size D, V vocabulary, b bytes per model element, r = 4 bytes (8 for float64)):

  static      weights (params * b); trainable parameters' gradient and optimizer state
              (full fine-tuning: 3 b per parameter, grads and AdamW moments in the model dtype;
              LoRA: 16 bytes per adapter parameter, float32 weight, grad and two moments)
  sequence    stored K/V of the past, 2 L Hkv D b per token, and the relayed K/V gradient sums,
              2 L Hkv D r per token; half-precision (bfloat16) models keep them in the K/V dtype,
              2 L Hkv D b per token, plus as much again for the chunks that more than
              RELAY_PLAIN_MAX_ADDS later chunks add into, once they are compensated (their Kahan
              buffer exists from their relay_plain_adds-th addition to their own backward;
              kv_store.py); the relay term is the peak of that schedule (relay_sum_bytes).
              Host bytes per token of sequence with offload, bf16: 2x the bf16 K/V up to 32
              chunks, 2.02x at 64, 2.51x at 256, approaching 3x at very many chunks.
              Peak at the first replayed chunk: both exist for the T - C tokens before it.
              Token ids, labels and mask: 24 bytes per token, always on the device.
  chunk       the replayed chunk's saved activations per token and layer (Llama-style block):
              b (7 H + 2 Hkv D + 4 I) (+ 8 H for the float32 norm inputs of half models);
              all L layers without gradient checkpointing, else the L layer inputs (C H b each)
              plus one layer's activations during its recompute. With offload the tensors saved
              outside checkpointed regions are parked on the host (all activations, or the layer
              inputs) and come back about one layer at a time. The attention's dq accumulator
              (C Hq D r), the relayed sums of the replayed chunk brought to the device for all
              layers (2 L C Hkv D r), and with offload the two prefetch buffers of a past block.
              The LM head + loss (linear_cross_entropy): one chunk of float32 logits (about 2^24,
              see default_chunk_rows) and the hidden-state gradient C H r, plus the head's weight
              gradient V H r when it is trained. Full fine-tuning: each chunk's backward forms new
              embedding and LM-head weight gradients (V H b each) before adding them into .grad.
  concat      attention="concat" only: each layer's [past ; fresh] K/V copy, saved for the
              backward of the replayed chunk, 2 L T Hkv' D b (Hkv' = Hq when the model's
              attention repeats K/V heads for grouped-query attention), and the (C x T) mask HF
              builds for the chunk, which SDPA saves per layer as a float tensor: L C T b.

With offload the sequence terms and the checkpointed layer inputs live in host memory; what is
left on the device no longer grows with T. Not counted: allocator fragmentation and CUDA
context / library workspaces (add a reserve when comparing with a device budget), framework
temporaries below a chunk.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from .ops.cross_entropy import default_chunk_rows


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int          # total parameter count
    tied: bool = False   # LM head shares the embedding matrix

    @classmethod
    def from_config(cls, config, params: int | None = None) -> "DecoderShape":
        """From a HF decoder config (Llama, Mistral, Qwen2/3, ...); params defaults to an estimate
        of a Llama-style block stack (exact for Llama/Mistral without biases)."""
        h, n = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        d = getattr(config, "head_dim", None) or h // heads
        i, v = config.intermediate_size, config.vocab_size
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if params is None:
            per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * i + 2 * h
            params = n * per_layer + v * h * (1 if tied else 2) + h
        return cls(n, h, i, heads, kv, d, v, params, tied)

    @classmethod
    def llama_3_1_8b(cls) -> "DecoderShape":
        """meta-llama/Llama-3.1-8B's published config (no download): 32 layers, hidden 4096,
        intermediate 14336, 32 heads / 8 KV heads of 128, vocab 128256, 8.03e9 parameters."""
        return cls(32, 4096, 14336, 32, 8, 128, 128256, 8_030_261_248, False)

    def lora_params(self, rank: int, targets=("q", "k", "v", "o")) -> int:
        """Adapter parameters of LoRA rank `rank` on the attention projections named in targets."""
        dims = {"q": (self.hidden, self.heads * self.head_dim), "k": (self.hidden, self.kv_heads * self.head_dim),
                "v": (self.hidden, self.kv_heads * self.head_dim), "o": (self.heads * self.head_dim, self.hidden),
                "gate": (self.hidden, self.intermediate), "up": (self.hidden, self.intermediate),
                "down": (self.intermediate, self.hidden)}
        return self.layers * sum(rank * (a + b) for a, b in (dims[t] for t in targets))


@dataclass
class MemoryEstimate:
    device: dict = field(default_factory=dict)   # component -> bytes
    host: dict = field(default_factory=dict)

    @property
    def device_total(self) -> int:
        return int(sum(self.device.values()))

    @property
    def host_total(self) -> int:
        return int(sum(self.host.values()))


def seco_peak(shape: DecoderShape, seq_len: int, chunk: int, *, batch: int = 1, dtype_bytes: int = 2,
              lora_params: int | None = None, grad_ckpt: bool = True, offload: bool = False,
              attention: str = "chunked", concat_kv_heads: int | None = None, static: bool = True) -> MemoryEstimate:
    """Peak memory of one SeCO step (see the module docstring). lora_params=None: full fine-tuning.
    static=False leaves out the weights and trainable state (memory above model + optimizer)."""
    s = shape
    b, r = dtype_bytes, (8 if dtype_bytes == 8 else 4)
    half = dtype_bytes == 2
    C = min(chunk, seq_len)
    past = seq_len - C if seq_len > C else 0  # tokens whose K/V and relay sums coexist at the peak
    kv_tok = 2 * s.layers * s.kv_heads * s.head_dim
    est = MemoryEstimate()
    dev, host = est.device, est.host
    full_ft = lora_params is None
    if static:
        dev["weights"] = s.params * b
    trainable_state = s.params * 3 * b if full_ft else lora_params * 16
    # full fine-tuning: the gradients come into existence during the step; their optimizer state is static
    dev["gradients"] = s.params * b if full_ft else lora_params * 4
    if static:
        dev["optimizer state"] = trainable_state - dev["gradients"]
    seq_side = host if offload else dev
    seq_side["past K/V"] = batch * past * kv_tok * b
    seq_side["relayed K/V gradient sums"] = relay_sum_bytes(shape, seq_len, chunk, batch=batch, dtype_bytes=dtype_bytes)
    dev["token ids, labels, mask"] = batch * seq_len * 24
    layer_act = batch * C * b * (7 * s.hidden + 2 * s.kv_heads * s.head_dim + 4 * s.intermediate)
    if half:
        layer_act += batch * C * 8 * s.hidden
    if grad_ckpt:
        (host if offload else dev)["checkpointed layer inputs"] = s.layers * batch * C * s.hidden * b
        dev["chunk activations (one layer recomputed)"] = layer_act
    elif offload:  # every saved activation parked on the host; the backward brings back about a layer at a time
        host["parked chunk activations"] = s.layers * layer_act
        dev["chunk activations (one layer back from the host)"] = layer_act
    else:
        dev["chunk activations"] = s.layers * layer_act
    dev["attention dq + relayed sums of the chunk"] = batch * C * (s.heads * s.head_dim * r + kv_tok * (b if half else r))
    if offload:
        dev["prefetch buffers (2 past blocks)"] = 2 * batch * C * 2 * s.kv_heads * s.head_dim * b
    if full_ft:  # each chunk's backward forms fresh embedding / LM-head gradients before adding them to .grad
        dev["per-chunk embedding + LM-head gradients"] = s.vocab * s.hidden * b * (1 if s.tied else 2)
    rows = default_chunk_rows(batch * C, s.hidden, s.vocab)
    dev["LM head + loss chunk"] = rows * s.vocab * r + batch * C * s.hidden * r + (s.vocab * s.hidden * r if full_ft else 0)
    if attention == "concat":
        heads = concat_kv_heads or s.kv_heads
        dev["concatenated past K/V (attention='concat')"] = 2 * s.layers * batch * seq_len * heads * s.head_dim * b
        dev["(C x T) attention masks (attention='concat')"] = s.layers * batch * C * seq_len * b
    return est


def relay_sum_bytes(shape: DecoderShape, seq_len: int, chunk: int, *, batch: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes of the relayed K/V gradient sums at their peak, as kv_store.RelaySink allocates them for
    full-attention layers in a SeCO step. float32 models: float32 sums of every past chunk (the peak is the
    first replayed chunk); float64: float64. dtype_bytes=2 (bfloat16): bfloat16 sums, and a bfloat16
    compensation for chunk j (n - 1 - j additions, the k-th from chunk n - k) from its
    relay_plain_adds-th addition on, i.e. from the replay of chunk n - 1 - plain_j; chunk i's sums and
    compensation are freed after its own backward. The peak over the replays i = n-1 .. 1 of
    (sums of the chunks j <= i, j < n - 1) + (compensations allocated by then for j <= i)."""
    from .engines.kv_store import relay_plain_adds

    C = min(chunk, seq_len)
    n = -(-seq_len // C)                     # chunks
    past = seq_len - C if seq_len > C else 0  # tokens of the chunks before the last
    kv_tok = 2 * shape.layers * shape.kv_heads * shape.head_dim
    if dtype_bytes != 2:
        return batch * past * kv_tok * (8 if dtype_bytes == 8 else 4)
    # comp of chunk j lives over the replays i in [j, n - 1 - plain_j] (when plain_j < adds_j): a difference
    # array over i counts the live ones
    live = [0] * (n + 1)
    for j in range(max(0, n - 1)):
        adds = n - 1 - j
        plain = relay_plain_adds(adds)
        if plain < adds:
            live[j] += 1
            live[n - plain] -= 1  # last replay it is alive at: n - 1 - plain
    peak_chunks, comps = 0, 0
    for i in range(n):
        comps += live[i]
        if i >= 1:  # replay of chunk i (chunk 0 relays to no one; its sums were counted at i = 1)
            peak_chunks = max(peak_chunks, min(i + 1, n - 1) + comps)
    return batch * min(peak_chunks * C, 2 * past) * kv_tok * dtype_bytes


def longest_fitting(fits, chunk: int) -> int:
    """Largest multiple of `chunk` whose chunk count n satisfies fits(n) (fits monotone: true, then false).
    0: not even one chunk fits; -1: nothing grows with the length (unbounded)."""
    if not fits(1):
        return 0
    hi = 1
    while fits(hi * 2):
        hi *= 2
        if hi > 1 << 40:  # nothing grows with T: unbounded
            return -1
    lo, hi = hi, hi * 2   # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * chunk


def longest_sequence(shape: DecoderShape, device_bytes: float, host_bytes: float | None, chunk: int,
                     **kwargs) -> int:
    """Largest multiple of `chunk` whose seco_peak fits device_bytes (and host_bytes, when given)."""
    def fits(n_chunks: int) -> bool:
        est = seco_peak(shape, n_chunks * chunk, chunk, **kwargs)
        return est.device_total <= device_bytes and (host_bytes is None or est.host_total <= host_bytes)

    return longest_fitting(fits, chunk)


GB = 1e9


def llama8b_table(chunk: int = 16384, device_gb: float = 80.0, reserve_gb: float = 6.0,
                  host_gbs=(256, 512, 1024, 2048), lora_rank: int = 16) -> str:
    """Markdown: longest trainable sequence for Llama-3.1-8B + LoRA on one GPU, offload off / on."""
    s = DecoderShape.llama_3_1_8b()
    lora = s.lora_params(lora_rank)
    kw = dict(dtype_bytes=2, lora_params=lora, grad_ckpt=True)
    budget = (device_gb - reserve_gb) * GB
    lines = [f"Llama-3.1-8B (bf16 weights), LoRA r={lora_rank} on q/k/v/o ({lora / 1e6:.1f}M float32 adapter "
             f"parameters, AdamW), HF gradient checkpointing, SeCO chunk {chunk}, batch 1; device budget "
             f"{device_gb:.0f} GB minus a {reserve_gb:.0f} GB reserve (CUDA context, allocator slack).", "",
             "| offload | host RAM for the step | longest sequence | device peak at that length | host peak |",
             "|---|---:|---:|---:|---:|"]
    n = longest_sequence(s, budget, None, chunk, **kw)
    est = seco_peak(s, n, chunk, **kw)
    lines.append(f"| off | - | {n:,} | {est.device_total / GB:.1f} GB | - |")
    for h in host_gbs:
        n = longest_sequence(s, budget, h * GB, chunk, offload=True, **kw)
        est = seco_peak(s, n, chunk, offload=True, **kw)
        lines.append(f"| on | {h} GB | {n:,} | {est.device_total / GB:.1f} GB | {est.host_total / GB:.0f} GB |")
    per_tok = seco_peak(s, 2 * chunk, chunk, offload=True, **kw).host
    kv = per_tok["past K/V"] / chunk
    sums = per_tok["relayed K/V gradient sums"] / chunk
    lines += ["", f"Per token of sequence: {kv / 1024:.0f} KiB of bf16 K/V and {sums / 1024:.0f} KiB of relayed "
              "gradient sums (bf16, Kahan-compensated only for chunks with more than 32 later chunks); with "
              "offload both live in host memory, and the device peak stays at its value for one chunk whatever "
              "the length."]
    return "\n".join(lines)


def _number_arg(kind, minimum: float, strict: bool):
    """An argparse type: `kind` (int or float), finite, > minimum (strict) or >= minimum."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        bad = not math.isfinite(value) or (value <= minimum if strict else value < minimum)
        if bad:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return value
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunk", type=_number_arg(int, 0, strict=True), default=16384, help="SeCO chunk, tokens (> 0)")
    p.add_argument("--device-gb", type=_number_arg(float, 0, strict=True), default=80.0, help="device memory, GB")
    p.add_argument("--reserve-gb", type=_number_arg(float, 0, strict=False), default=6.0,
                   help="device memory kept back, GB (below --device-gb)")
    p.add_argument("--lora-rank", type=_number_arg(int, 0, strict=True), default=16, help="LoRA rank (> 0)")
    a = p.parse_args(argv)
    if a.reserve_gb >= a.device_gb:
        p.error(f"--reserve-gb ({a.reserve_gb:g}) must be below --device-gb ({a.device_gb:g})")
    print(llama8b_table(a.chunk, a.device_gb, a.reserve_gb, lora_rank=a.lora_rank))


if __name__ == "__main__":
    main()
