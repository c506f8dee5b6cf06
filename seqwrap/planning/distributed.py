"""The SeCO memory model on P ranks: Ulysses sequence parallelism x parameter sharding (FSDP2 / ZeRO-3).

    layout = Layout(sp=8, shard=64, params="layer", grads="chunk", offload=True, state_offload=True)
    est = parallel_peak(DecoderShape.llama_3_1_8b(), seq_len=1 << 20, chunk=16384, layout=layout)
    est.device_total, est.host_total         # bytes on one rank's device / in one rank's share of host memory
    longest_parallel_sequence(shape, layout, device_bytes=135e9, host_bytes=250e9, chunk=16384)

One rank of a step (memory_model.seco_peak is the single-device model; with sp=1, shard=1 and the
default state bytes this model returns exactly its numbers):

  sequence / chunk   Ulysses with SeCO: each rank holds T/sp tokens of the sequence and C/sp of each
                     chunk (seqwrap.parallel.shard_batch(..., chunk_size=C)), so every per-token term
                     of seco_peak is taken at (T/sp, C/sp). Around attention the rank trades its part
                     of the chunk for the whole chunk on Hq/sp heads; when sp does not divide the K/V
                     heads they are replicated to the query heads first, so the stored K/V, their relay
                     sums and the chunk's K/V terms grow by Hq/Hkv. sp must divide Hq.
  all-to-all         one attention call's exchange buffers on the device: q, k, v and the output, each
                     as the contiguous send copy and the receive buffer, C/sp tokens' worth:
                     2 B (C/sp) (2 Hq + 2 Hkv') D b.
  static, sharded    the sharding degree `shard` (FSDP2 / ZeRO-3, 1 = not sharded) divides the stored
                     weights (b per parameter), the trainable parameters' gradients and optimizer
                     state. Full fine-tuning: grad_bytes / optim_bytes per parameter (default: the
                     single-device model's b and 2 b; mixed precision with float32 AdamW: 4 and 12,
                     a float32 master copy and two float32 moments). LoRA: 4 + 12 per adapter parameter.
  unsharded          shard > 1: what the step computes with. params="step" (FSDPSchedule default,
                     ZeRO-3 gathering once per step): every parameter unsharded for the step, P b;
                     params="layer": the root's parameters (embeddings, LM head, final norm) plus two
                     layers (the one computing and the one prefetched). grads="step": the unsharded
                     gradients of all trainable parameters (grad_bytes each) until the one
                     reduce-scatter; grads="chunk": the root's plus two layers' worth.
  offload            SeCO offload: past K/V, relay sums and checkpointed layer inputs in host memory (as
                     in seco_peak). state_offload (FSDP2 CPUOffloadPolicy / ZeRO-Offload): the sharded
                     weights, gradients and optimizer state in host memory too.

Host memory is per rank: a node's host memory divided by the ranks on it. Not counted: allocator
fragmentation, CUDA context / NCCL buffers (keep a device reserve), communication buckets beyond one
group, and activations of a second data-parallel sequence (each rank trains one sequence shard).
No torch or transformers import here.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..memory_model import DecoderShape, MemoryEstimate, longest_fitting, seco_peak

_PARAMS = ("step", "layer")
_GRADS = ("step", "chunk")


@dataclass(frozen=True)
class Layout:
    sp: int = 1               # Ulysses sequence-parallel degree
    shard: int = 1            # parameter sharding degree (FSDP2 / ZeRO-3); 1: every rank holds everything
    params: str = "step"      # FSDPSchedule(params=...): "step" or "layer"
    grads: str = "step"       # FSDPSchedule(grads=...): "step" or "chunk"
    offload: bool = False     # SeCO offload: K/V, relay sums, checkpoints in host memory
    state_offload: bool = False  # sharded weights / gradients / optimizer state in host memory

    def __post_init__(self):
        for what in ("sp", "shard"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Layout: {what} must be a positive integer, got {v!r}")
        if self.params not in _PARAMS:
            raise ValueError(f"Layout: params must be one of {_PARAMS}, got {self.params!r}")
        if self.grads not in _GRADS:
            raise ValueError(f"Layout: grads must be one of {_GRADS}, got {self.grads!r}")


def _root_params(s: DecoderShape) -> int:
    """Embeddings, LM head (untied) and the final norm: the root FSDP group."""
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


def _layer_params(s: DecoderShape) -> int:
    return (s.params - _root_params(s)) // s.layers


def kv_heads_per_rank(s: DecoderShape, sp: int) -> float:
    """K/V heads one rank stores per token of the whole sequence, relative to Hkv: Hkv/sp when sp divides
    Hkv, else the heads are replicated to Hq first (Hq/sp)."""
    if s.heads % sp:
        raise ValueError(f"parallel_peak: {s.heads} query heads cannot be split over sp={sp} ranks")
    return (s.kv_heads if s.kv_heads % sp == 0 else s.heads) / sp


def parallel_peak(shape: DecoderShape, seq_len: int, chunk: int, layout: Layout = Layout(), *, batch: int = 1,
                  dtype_bytes: int = 2, lora_params: int | None = None, grad_ckpt: bool = True,
                  grad_bytes: int | None = None, optim_bytes: int | None = None) -> MemoryEstimate:
    """Peak memory of one rank in one SeCO step under `layout` (see the module docstring).
    lora_params=None: full fine-tuning; grad_bytes / optim_bytes per trainable parameter (full
    fine-tuning only; default dtype_bytes and 2 dtype_bytes, as seco_peak)."""
    s, L, b = shape, layout, dtype_bytes
    if seq_len % L.sp or chunk % L.sp:
        raise ValueError(f"parallel_peak: seq_len {seq_len} and chunk {chunk} must be multiples of sp={L.sp}")
    rep = kv_heads_per_rank(s, L.sp) * L.sp / s.kv_heads   # 1, or Hq/Hkv when K/V heads are replicated
    est = seco_peak(s, seq_len // L.sp, chunk // L.sp, batch=batch, dtype_bytes=b, lora_params=lora_params,
                    grad_ckpt=grad_ckpt, offload=L.offload, static=False)
    dev, host = est.device, est.host
    if rep != 1:
        side = host if L.offload else dev
        for term in ("past K/V", "relayed K/V gradient sums"):
            side[term] = int(side[term] * rep)
        c, r = batch * (min(chunk, seq_len) // L.sp), (8 if b == 8 else 4)
        dev["attention dq + relayed sums of the chunk"] = int(c * (s.heads * s.head_dim
                                                                   + 2 * s.layers * s.kv_heads * s.head_dim * rep) * r)
        if L.offload:
            dev["prefetch buffers (2 past blocks)"] = int(dev["prefetch buffers (2 past blocks)"] * rep)
    if L.sp > 1:
        c = batch * (min(chunk, seq_len) // L.sp)
        dev["Ulysses all-to-all buffers (one attention call)"] = int(
            2 * c * (2 * s.heads + 2 * s.kv_heads * rep) * s.head_dim * b)
    # static and trainable state: replace seco_peak's (static=False left only the gradients in)
    del dev["gradients"]
    full_ft = lora_params is None
    trainable = s.params if full_ft else lora_params
    gb = (b if grad_bytes is None else grad_bytes) if full_ft else 4
    ob = (2 * b if optim_bytes is None else optim_bytes) if full_ft else 12
    state = host if L.state_offload else dev
    state["weights (sharded)" if L.shard > 1 else "weights"] = s.params * b // L.shard
    state["optimizer state"] = trainable * ob // L.shard
    if L.shard == 1:
        dev["gradients"] = trainable * gb
        return est
    state["gradients (sharded)"] = trainable * gb // L.shard
    two_layers = 2 * _layer_params(s) + _root_params(s)
    dev["unsharded parameters"] = (s.params if L.params == "step" else two_layers) * b
    if full_ft:
        dev["unsharded gradients"] = (s.params if L.grads == "step" else two_layers) * gb
    else:  # adapters: tiny; counted whole
        dev["unsharded gradients"] = lora_params * gb
    return est


def longest_parallel_sequence(shape: DecoderShape, layout: Layout, device_bytes: float, host_bytes: float | None,
                              chunk: int, **kwargs) -> int:
    """Largest multiple of `chunk` whose parallel_peak fits device_bytes (and host_bytes per rank, when given).
    0: not even one chunk fits; -1: nothing grows with the length (unbounded)."""
    def fits(n: int) -> bool:
        est = parallel_peak(shape, n * chunk, chunk, layout, **kwargs)
        return est.device_total <= device_bytes and (host_bytes is None or est.host_total <= host_bytes)

    return longest_fitting(fits, chunk)


def predicted_collectives(shape: DecoderShape, seq_len: int, chunk: int, layout: Layout = Layout(), *,
                          batch: int = 1, dtype_bytes: int = 2, lora_params: int | None = None,
                          grad_bytes: int | None = None, recomputed: int | None = None) -> dict:
    """Collectives of one rank in one SeCO step, with seqwrap.parallel.count_collectives' byte conventions
    (all-gather: the gathered output; reduce-scatter and all-reduce: the input; all-to-all: what the rank
    sends, its own block included). recomputed: chunks backpropagated (SeCO: all; SpaCO: the sample).

      shard > 1, params="step"   one all-gather per FSDP group (layers + root), P b bytes in all;
                 grads="step"    one reduce-scatter per group with gradients, trainable x grad_bytes.
                                 (params="layer" / grads="chunk" are not modelled here: FSDP's own hooks.)
      shard = 1, sp > 1          the gradients and the loss sum in one float64 all-reduce
                                 (trainable x 8 + 8 bytes) over the Ulysses group.
      sp > 1                     per attention layer and pass, 4 all-to-alls (q, k, v, output; the backward
                                 sends their gradients back, 4 more): pass 1 (no grad) runs the chunks
                                 before the last, pass 2 runs every recomputed chunk forward and backward.
                                 Bytes per pass: 2 B (C/sp) (Hq + Hkv') D b (Hkv' = Hq when K/V heads are
                                 replicated)."""
    s, L, b = shape, layout, dtype_bytes
    if L.shard > 1 and (L.params, L.grads) != ("step", "step"):
        raise ValueError("predicted_collectives: only FSDPSchedule('step', 'step') is modelled")
    trainable = s.params if lora_params is None else lora_params
    gb = (b if grad_bytes is None else grad_bytes) if lora_params is None else 4
    n = -(-seq_len // chunk)
    recomputed = n if recomputed is None else recomputed
    out = dict(all_gathers=0, all_gather_bytes=0, reduce_scatters=0, reduce_scatter_bytes=0, all_reduces=0,
               all_reduce_bytes=0, all_to_alls=0, all_to_all_bytes=0)
    if L.shard > 1:
        out.update(all_gathers=s.layers + 1, all_gather_bytes=s.params * b,
                   reduce_scatters=(s.layers + 1) if lora_params is None else s.layers,
                   reduce_scatter_bytes=trainable * gb)
    elif L.sp > 1:
        out.update(all_reduces=1, all_reduce_bytes=trainable * 8 + 8)
    if L.sp > 1:
        kv = s.kv_heads if s.kv_heads % L.sp == 0 else s.heads
        per_pass = 2 * batch * (chunk // L.sp) * (s.heads + kv) * s.head_dim * b
        passes = (n - 1) + 2 * recomputed
        out.update(all_to_alls=4 * s.layers * passes, all_to_all_bytes=s.layers * passes * per_pass)
    return out
