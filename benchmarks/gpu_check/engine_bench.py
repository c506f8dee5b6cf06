"""Section "engine_bench": one training step (forward + backward, batch 1) of a ~1B-parameter Llama with
random bf16 weights and LoRA (r 16 on q/k/v/o, peft's float32 adapters), HF gradient checkpointing on:
HF full backprop vs SeCO, SpaCO (rate 1/8), SeCO + offload and SeCO + MsT, from 16K tokens up, doubling,
as long as the memory and the time budget allow. Per case: peak torch.cuda.max_memory_allocated (model
included), tokens/s, and seqwrap.memory_model's prediction of the peak beside it.

Budget: a method's next length is skipped when the time its last length took, scaled by
(ratio of lengths)^1.8, exceeds the per-case cap or what is left of the section's time; an out-of-memory
ends that method's climb. Lengths run in turn for all methods, so the short ones are always measured."""
from __future__ import annotations

import os

import torch

from . import models
from .context import Context, log
from .measure import Meter, is_oom
from .report import Result

TITLE = "Engine benchmark"
GiB = 2**30

GPU = dict(config="1b", chunk=8192, lora_rank=16, case_cap_s=75.0,
           lengths=[16384, 32768, 65536, 131072, 262144, 524288, 1048576])
DRY = dict(config="toy", chunk=16, lora_rank=4, case_cap_s=20.0, lengths=[32, 64])
METHODS = {"hf_ckpt": "HF + grad ckpt", "seco": "SeCO", "spaco": "SpaCO 1/8", "seco_offload": "SeCO + offload",
           "seco_mst": "SeCO + MsT"}
GROWTH = 1.8   # time ~ length^1.8 between doublings at these lengths (attention's share grows)


def step_fn(method: str, model, ids, chunk: int):
    """One step of `method` on ids (1, T); returns a note for the table."""
    import seqwrap

    if method == "hf_ckpt":
        model(input_ids=ids, labels=ids).loss.backward()
        return ""
    if method == "seco_mst":
        seqwrap.apply_minisequence(model)
        try:
            seqwrap.SeCO(model, chunk_size=chunk)(ids)
        finally:
            seqwrap.remove_minisequence(model)
        return ""
    if method == "spaco":
        out = seqwrap.SpaCO(model, chunk_size=chunk, rate=1 / 8, seed=0)(ids)
        return f"{out.backward_chunks}/{out.num_chunks} chunks recomputed"
    engine = seqwrap.SeCO(model, chunk_size=chunk, offload=method == "seco_offload")
    engine(ids)
    if method == "seco_offload":
        st = engine.offload_stats
        host = st.get("host_peak_bytes", 0) + st.get("parked_peak_bytes", 0)
        return f"host {host / GiB:.1f} GiB (pool peak + parked)"
    return ""


def predicted_peak(method: str, shape, T: int, chunk: int, lora_params: int) -> float | None:
    """seqwrap.memory_model's device peak for this case, bytes, without the optimizer state (no optimizer
    here). HF has no model; SpaCO's peak is SeCO's (its recomputed chunks are a subset); MsT is not modelled
    (SeCO's figure is shown)."""
    from seqwrap.memory_model import seco_peak

    if method == "hf_ckpt":
        return None
    est = seco_peak(shape, T, chunk, dtype_bytes=2, lora_params=lora_params, grad_ckpt=True,
                    offload=method == "seco_offload")
    return est.device_total - est.device.get("optimizer state", 0)


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def run(ctx: Context) -> Result:
    from seqwrap.memory_model import DecoderShape, longest_sequence

    r = Result("engine_bench", TITLE)
    p = DRY if ctx.dry else GPU
    chunk = p["chunk"]
    meter = Meter(ctx.device)
    cfg = models.llama_config(p["config"], p["lengths"][-1])
    base = models.build_llama(cfg, ctx.device, torch.bfloat16)
    n_params = models.count(base.parameters())
    model = models.add_lora(base, p["lora_rank"])
    models.enable_checkpointing(model)
    n_lora = models.count(models.trainable(model).values())
    static = meter.allocated()
    shape = DecoderShape.from_config(cfg, params=n_params)
    r.data.update(params=n_params, lora_params=n_lora, static_bytes=static)
    notes = [f"Llama config {p['config']}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab "
             f"{cfg.vocab_size}, {n_params / 1e9:.2f}e9 parameters (bf16), LoRA {n_lora / 1e6:.2f}M; chunk {chunk}; "
             f"model + adapters on the device: {static / GiB:.2f} GiB" if static is not None else
             f"Llama config {p['config']}: {n_params / 1e6:.2f}M parameters, LoRA {n_lora / 1e3:.1f}K; chunk {chunk}"]
    if meter.cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        kw = dict(dtype_bytes=2, lora_params=n_lora, grad_ckpt=True)
        fits = longest_sequence(shape, total * 0.95, None, chunk, **kw)
        fits_off = longest_sequence(shape, total * 0.95, host_memory_bytes() * 0.8, chunk, offload=True, **kw)
        notes.append(f"memory model, 95% of the device's {total / GiB:.0f} GiB: SeCO fits up to {fits:,} tokens; "
                     f"with offload and 80% of the host's {host_memory_bytes() / GiB:.0f} GiB, {fits_off:,}")
    r.notes += notes
    for n in notes:
        log(n)
    t = r.table("One training step per case (batch 1, bf16, LoRA, gradient checkpointing)",
                ["tokens", "method", "peak GiB", "memory model GiB", "measured / model", "tokens/s", "step s",
                 "note"],
                note="peak: torch.cuda.max_memory_allocated during the step, model and adapters included. memory "
                     "model: seqwrap.memory_model.seco_peak without the optimizer state (no optimizer here); HF is "
                     "not modelled, SpaCO is bounded by SeCO's peak, MsT is not modelled (SeCO's figure). "
                     "One timed step per case, after one warm-up step per method at one chunk.")
    state = {m: {"last": None, "stopped": ""} for m in METHODS}
    for m in METHODS:   # warm-up: kernels loaded, allocator and handles ready
        try:
            ids = torch.randint(0, cfg.vocab_size, (1, chunk), device=ctx.device)
            step_fn(m, model, ids, chunk)
        except Exception as exc:
            state[m]["stopped"] = f"warm-up failed: {type(exc).__name__}: {exc}"[:200]
            if not is_oom(exc):
                r.fail(f"{METHODS[m]} warm-up: {type(exc).__name__}: {exc}")
        model.zero_grad(set_to_none=True)
        meter.clean()
    for T in p["lengths"]:
        for m, label in METHODS.items():
            st = state[m]
            if st["stopped"]:
                t.add(T, label, None, None, None, None, None, st["stopped"])
                continue
            if st["last"] is not None:
                t_prev, T_prev = st["last"]
                guess = t_prev * (T / T_prev) ** GROWTH
                room = min(p["case_cap_s"], ctx.left() - 10)
                if guess > room:
                    t.add(T, label, None, None, None, None, None,
                          f"not run: about {guess:.0f} s expected, {max(room, 0):.0f} s available")
                    continue
            pred = predicted_peak(m, shape, T, chunk, n_lora)
            ids = torch.randint(0, cfg.vocab_size, (1, T), device=ctx.device)
            try:
                sec, peak, note = meter.run(lambda: step_fn(m, model, ids, chunk))
                st["last"] = (sec, T)
                ratio = peak / pred if peak is not None and pred else None
                t.add(T, label, None if peak is None else peak / GiB, None if pred is None else pred / GiB, ratio,
                      T / sec, sec, note)
            except Exception as exc:
                if is_oom(exc):
                    st["stopped"] = f"out of memory at {T:,} tokens"
                    t.add(T, label, None, None if pred is None else pred / GiB, None, None, None, "out of memory")
                else:
                    st["stopped"] = f"error at {T:,} tokens"
                    t.add(T, label, None, None, None, None, None, f"ERROR {type(exc).__name__}: {exc}"[:200])
                    r.fail(f"{label} at {T} tokens: {type(exc).__name__}: {exc}")
            finally:
                model.zero_grad(set_to_none=True)
                ids = None
                meter.clean()
            log(f"{T} tokens, {label}: " + ", ".join(map(str, t.rows[-1][2:])))
            ctx.checkpoint(r)
    longest = {METHODS[m]: max((row[0] for row in t.rows if row[1] == METHODS[m] and row[6] != "-"),
                               key=lambda x: int(x), default="none") for m in METHODS}
    r.data["longest"] = longest
    r.summary = "longest measured: " + ", ".join(f"{k} {v}" for k, v in longest.items())
    if ctx.dry:
        t.note += " Dry run on the CPU: no device memory is measured and the times are not GPU numbers."
    return r
