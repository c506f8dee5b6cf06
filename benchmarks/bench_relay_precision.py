"""Relayed K/V gradient sums of a bf16 SeCO step: error against float64, per way of keeping them.

A small bf16 Llama (1 layer, hidden 64, 2 heads / 1 K/V head of 32) runs one SeCO step per length
(2K-8K tokens, chunk 128: up to 63 additions into a chunk's sums, as many as 64K tokens in chunks of 1K: the error depends on the number of additions, and SeCO at 64K tokens takes too long on this CPU).
Every block gradient relayed into chunk 0's dK / dV sums (the chunk that gets the most additions) is
recorded; the same addends are then summed four ways and compared with their float64 sum (normwise
relative error): float32 (what main kept, with a float32 Kahan buffer: 5x the bf16 K/V on the host in
all), bf16 plain, bf16 Kahan-compensated (a second bf16 buffer), and the exact sum rounded to bf16 (the
floor: the engine rounds the sum to the K/V dtype before its backward). Also: host bytes per token of
sequence (K/V + sums) under offload from the memory model, against the bf16 K/V.

Writes benchmarks/results/relay_precision.md. Run: `pytest benchmarks/bench_relay_precision.py -s`
(about 3 minutes on 2 CPU cores). SEQWRAP_BENCH_RELAY_LENGTHS=2048,8192 picks other lengths.
"""
import os
import time

import torch

LENGTHS = tuple(int(s) for s in os.environ.get("SEQWRAP_BENCH_RELAY_LENGTHS", "2048,4096,8192").split(","))
CHUNK = 128


def _model():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                   max_position_embeddings=1 << 17, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)


def record_addends(seq: int) -> list[torch.Tensor]:
    """One bf16 SeCO step over `seq` tokens; returns the block gradients added into chunk 0's dK sum
    (layer 0), as float64 copies."""
    seen: list[torch.Tensor] = []
    return _with_recorder(_model(), seq, seen)


def _with_recorder(model, seq, seen):
    import seqwrap
    from seqwrap.engines import kv_store

    base = kv_store.RelaySink

    class RecordingSink(base):
        __slots__ = ("chunk0",)

        def add_(self, g):
            if getattr(self, "chunk0", False):
                seen.append(g.detach().double().clone())
            base.add_(self, g)

    original = kv_store.ChunkKVStore._sink_pair

    def pair(self, chunk, layer):
        k, v = original(self, chunk, layer)
        rk = RecordingSink(k.compensate, k.host, k.kv_dtype, k.adds, k.plain)
        rk.chunk0 = chunk == 0 and layer == 0
        return rk, v

    kv_store.ChunkKVStore._sink_pair = pair
    try:
        ids = torch.randint(3, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
        seqwrap.SeCO(model, chunk_size=CHUNK)(ids, labels=ids.clone())
    finally:
        kv_store.ChunkKVStore._sink_pair = original
    return seen


def sums(addends: list[torch.Tensor]) -> dict:
    from seqwrap.engines.kv_store import relay_plain_adds
    from seqwrap.engines.offload import add_in_kv_dtype_

    exact = torch.stack(addends).sum(0)
    f32 = torch.zeros(exact.shape)
    plain = torch.zeros(exact.shape, dtype=torch.bfloat16)
    comp_acc, comp = torch.zeros_like(plain), torch.zeros_like(plain)
    sched, sched_comp, first = torch.zeros_like(plain), None, relay_plain_adds(len(addends))
    for k, g in enumerate(addends):
        g32 = g.float()  # the block gradients arrive in float32
        f32 += g32
        add_in_kv_dtype_(plain, None, g32)
        add_in_kv_dtype_(comp_acc, comp, g32)
        if k == first:  # seqwrap's schedule: plain for the first relay_plain_adds(n), then compensated
            sched_comp = torch.zeros_like(plain)
        add_in_kv_dtype_(sched, sched_comp, g32)
    err = lambda t: ((t.double() - exact).norm() / exact.norm()).item()
    return {"float32": err(f32), "bf16 plain": err(plain), "bf16 compensated": err(comp_acc),
            "bf16, seqwrap's schedule (plain, then compensated)": err(sched),
            "floor (exact sum rounded to bf16)": err(exact.to(torch.bfloat16))}


def host_ratio(seq: int, chunk: int) -> float:
    """(K/V + relayed sums) host bytes per token under offload / bf16 K/V, Llama-3.1-8B, from the memory model."""
    from seqwrap.memory_model import DecoderShape, seco_peak

    s = DecoderShape.llama_3_1_8b()
    h = seco_peak(s, seq, chunk, dtype_bytes=2, lora_params=s.lora_params(16), offload=True).host
    return (h["past K/V"] + h["relayed K/V gradient sums"]) / h["past K/V"]


def test_relay_precision(results_dir):
    from seqwrap.engines.kv_store import RELAY_PLAIN_MAX_ADDS, RELAY_TOLERANCE, relay_plain_adds

    torch.set_num_threads(1)
    rows = []
    for seq in LENGTHS:
        t = time.perf_counter()
        addends = record_addends(seq)
        assert len(addends) == seq // CHUNK - 1, len(addends)  # one addition per later chunk
        rows.append((seq, len(addends), sums(addends), time.perf_counter() - t))
        print(seq, rows[-1][1:3], f"{rows[-1][3]:.0f}s", flush=True)
    kinds = list(rows[0][2])
    lines = [
        "# Relayed K/V gradient sums of a bf16 SeCO step: error against float64",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}, CPU, torch {torch.__version__}. Small bf16 Llama (1 layer, hidden 64, "
        f"2 heads / 1 K/V head of 32), one SeCO step, chunk {CHUNK}; the block gradients relayed into chunk 0's dK "
        "sum (the most additions) recorded and summed four ways. Normwise relative error against the float64 sum "
        f"of the same addends. Tolerance (seqwrap.engines.kv_store.RELAY_TOLERANCE): {RELAY_TOLERANCE:.2e} "
        f"(4 bf16 half-ulps); sums of chunks that get more than RELAY_PLAIN_MAX_ADDS = {RELAY_PLAIN_MAX_ADDS} "
        "additions are compensated from their relay_plain_adds(n) = isqrt(16 n)-th addition on (the Kahan buffer "
        "allocated only then), the others plain bf16.",
        "",
        "| tokens | additions | " + " | ".join(kinds) + " | seqwrap keeps |",
        "|---:|---:|" + "---:|" * len(kinds) + "---|",
    ]
    for seq, n, err, _ in rows:
        keeps = f"bf16, compensated after {relay_plain_adds(n)}" if n > RELAY_PLAIN_MAX_ADDS else "bf16 plain"
        lines.append(f"| {seq} | {n} | " + " | ".join(f"{err[k]:.2e}" for k in kinds) + f" | {keeps} |")
    lines += ["", "Host bytes per token of sequence under offload (past K/V + relayed sums), Llama-3.1-8B bf16, "
              "memory model (peak of the past K/V + peak of the relay sums), in units of the bf16 K/V (5.00x at every "
              "length before the bf16 sums; 2.87x at 256 chunks with every compensation from the first addition):", "",
              "| tokens | chunk 1024 | chunk 4096 | chunk 16384 |", "|---:|---:|---:|---:|"]
    for seq in (2048, 8192, 16384, 65536, 262144, 1 << 20):
        cells = [f"{host_ratio(seq, c):.2f}x" if seq > c else "-" for c in (1024, 4096, 16384)]
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    (results_dir / "relay_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for seq, n, err, _ in rows:  # what seqwrap keeps meets the tolerance
        kept = err["bf16, seqwrap's schedule (plain, then compensated)"]
        assert kept <= RELAY_TOLERANCE, (seq, kept)
