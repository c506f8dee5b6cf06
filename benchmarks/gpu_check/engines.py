"""Section "engines": SeCO, SeCO + offload (side stream, events, pinned pool, prefetch), SeCO + MsT and
SpaCO on a small random Llama on the device, float32 and bfloat16, full fine-tuning and LoRA with HF
gradient checkpointing, each step against float64 full backprop of the same (rounded) weights.

Batch 2, the second row padded at the end. The error of HF's own full backprop in the same dtype is
reported beside each engine's, as the yardstick of what that dtype allows."""
from __future__ import annotations

import copy

import torch

from . import models
from .context import Context, log
from .measure import rel_err
from .report import Result

TITLE = "Engines on the device"

# dtype -> (loss, gradients): relative error against float64 full backprop (gradients: largest
# ||g - g64|| / ||g64|| over the trained tensors). float32 leaves room for TF32-like arithmetic inside
# fused attention kernels; bf16 for bf16 activations and weights (HF's own bf16 step lands near it).
# An engine also passes within HF_FACTOR times the error of HF's own step in the same dtype on the
# same device: that much is the dtype's and the device kernels', not the engine's (a bug is O(1)).
TOL = {torch.float32: (1e-5, 1e-3), torch.bfloat16: (2e-2, 1e-1)}
HF_FACTOR = 4.0
SPACO_SAME_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}   # SpaCO with vs without offload


def sizes(dry: bool) -> tuple[str, int, int]:
    """(model config, tokens per row, chunk)."""
    return ("toy", 24, 8) if dry else ("small", 384, 96)


def make_batch(T: int, vocab: int, device: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    mask[1, -T // 6:] = 0
    labels[1, -T // 6:] = -100
    return ids.to(device), labels.to(device), mask.to(device)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in models.trainable(model).items() if p.grad is not None}


def hf_step(model, batch):
    ids, labels, mask = batch
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, attention_mask=mask).loss
    loss.backward()
    return loss.detach(), grads_of(model)


def worst(grads: dict, ref: dict) -> tuple[float, str]:
    missing = sorted(set(ref) - set(grads))
    if missing:
        return float("inf"), f"no gradient for {missing[0]}"
    errs = {n: rel_err(grads[n], ref[n]) for n in ref}
    name = max(errs, key=errs.get)
    return errs[name], name


OFFLOAD = {"offload": True, "offload_min_bytes": 0}
CASES_FULL = [("SeCO", {}), ("SeCO + offload", OFFLOAD), ("SeCO + MsT", {"mst": True})]
CASES_LORA = [("SeCO", {}), ("SeCO + offload (activations parked)", OFFLOAD)]


def engine_case(model, kw, chunk, batch, loss64, g64, tol, lora) -> tuple[bool, tuple]:
    """One engine step against the float64 reference: (ok, (loss err, grad err text, verdict));
    tol = (loss, gradients) relative errors allowed."""
    import seqwrap

    mst = kw.pop("mst", False)
    model.zero_grad(set_to_none=True)
    try:
        if mst:
            seqwrap.apply_minisequence(model)
        engine = seqwrap.SeCO(model, chunk_size=chunk, **kw)
        out = engine(batch[0], labels=batch[1], attention_mask=batch[2])
        loss_err = rel_err(out.loss, loss64)
        grad_err, where = worst(grads_of(model), g64)
        verdict = (f"FAIL: loss err {loss_err:.2e}, grad err {grad_err:.2e} at {where}"
                   if not (loss_err <= tol[0] and grad_err <= tol[1]) else "pass")
        if verdict == "pass" and kw.get("offload") and lora and not engine.offload_stats.get("parked_bytes", 0) > 0:
            verdict = "FAIL: no activation was parked on the host"
        return verdict == "pass", (loss_err, f"{grad_err:.2e} ({where})", verdict)
    except Exception as exc:  # recorded per case; the other cases still run
        return False, (None, None, f"ERROR {type(exc).__name__}: {exc}"[:300])
    finally:
        if mst:
            seqwrap.remove_minisequence(model)


def make_model(cfg, device, dtype, lora: bool):
    base = models.build_llama(cfg, device, torch.float32, seed=0).to(dtype)
    if not lora:
        return base
    model = models.add_lora(base)   # peft keeps the adapters in float32 on a bf16 model, as in training
    models.enable_checkpointing(model)
    return model


def run(ctx: Context) -> Result:
    torch.set_float32_matmul_precision("highest")   # no TF32 in float32 matrix products
    r = Result("engines", TITLE)
    name, T, chunk = sizes(ctx.dry)
    cfg = models.llama_config(name, T)
    batch = make_batch(T, cfg.vocab_size, ctx.device)
    t = r.table(f"Against float64 full backprop ({name} Llama: {cfg.num_hidden_layers} layers, hidden "
                f"{cfg.hidden_size}, vocab {cfg.vocab_size}; batch 2 x {T} tokens, one row padded; chunk {chunk})",
                ["dtype", "engine", "trained", "loss rel. err", "grad rel. err (worst tensor)",
                 "HF same dtype: loss / grad err", "tolerance loss / grad", "check"],
                note="grad rel. err = max over trained tensors of ||g - g64|| / ||g64||. 'HF same dtype' is "
                     "HF's own full backprop in that dtype against float64: what the dtype allows. Tolerance: "
                     "float32 1e-5 / 1e-3, bf16 2e-2 / 1e-1, or 4x HF's own error when that is larger.")
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).replace("torch.", "")
        for lora in (False, True):
            trained = "LoRA + grad ckpt" if lora else "full"
            model = make_model(cfg, ctx.device, dtype, lora)
            ref_model = copy.deepcopy(model).double()
            loss64, g64 = hf_step(ref_model, batch)
            del ref_model
            hf_loss, hf_grads = hf_step(model, batch)
            hf_errs = (rel_err(hf_loss, loss64), worst(hf_grads, g64)[0])
            hf = f"{hf_errs[0]:.1e} / {hf_errs[1]:.1e}"
            tol = tuple(max(fixed, HF_FACTOR * e) for fixed, e in zip(TOL[dtype], hf_errs))
            for label, kw in (CASES_LORA if lora else CASES_FULL):
                ok, msg = engine_case(model, dict(kw), chunk, batch, loss64, g64, tol, lora)
                t.add(dname, label, trained, *msg[:2], hf, f"{tol[0]:.0e} / {tol[1]:.0e}", "pass" if ok else msg[2])
                if not ok:
                    r.fail(f"{dname} {label} ({trained}): {msg[2]}")
                log(f"{dname} {label} ({trained}): {t.rows[-1][-1]} (loss err {t.rows[-1][3]}, grad err {t.rows[-1][4]})")
            del model
            ctx.checkpoint(r)
        spaco_case(ctx, r, cfg, dtype, batch, chunk)
    failed = sum(1 for t_ in r.tables for row in t_.rows if row[-1] != "pass")
    r.summary = f"{sum(len(t_.rows) for t_ in r.tables) - failed} cases passed, {failed} failed"
    return r


def spaco_case(ctx: Context, r: Result, cfg, dtype, batch, chunk: int) -> None:
    """SpaCO (rate 1/2, fixed seed): recomputes exactly the chunks its sampler draws, and gives the same
    gradient with and without offload."""
    import seqwrap

    dname = str(dtype).replace("torch.", "")
    title = "SpaCO rate 1/2: the draw, and offload changes nothing"
    t = next((x for x in r.tables if x.title == title), None) or r.table(
        title, ["dtype", "chunks", "recomputed", "sampler draw", "grad rel. diff offload vs not", "tolerance",
                "check"])
    try:
        grads, outs = [], []
        for off in (False, True):
            model = make_model(cfg, ctx.device, dtype, lora=False)
            outs.append(seqwrap.SpaCO(model, chunk_size=chunk, rate=0.5, seed=3, offload=off,
                                      offload_min_bytes=0)(batch[0], labels=batch[1], attention_mask=batch[2]))
            grads.append(grads_of(model))
            del model
        k = outs[0].num_chunks
        draw = int((seqwrap.sample_chunks(k, probs=[0.5] * k, seed=3, step=0) != 0).sum())
        diff, where = worst(grads[1], grads[0])
        ok = outs[0].backward_chunks == outs[1].backward_chunks == draw and diff <= SPACO_SAME_TOL[dtype]
        t.add(dname, k, f"{outs[0].backward_chunks} / {outs[1].backward_chunks}", draw, f"{diff:.2e} ({where})",
              SPACO_SAME_TOL[dtype], "pass" if ok else "FAIL")
        if not ok:
            r.fail(f"SpaCO {dname}: recomputed {outs[0].backward_chunks}/{outs[1].backward_chunks}, draw {draw}, "
                   f"offload diff {diff:.2e}")
    except Exception as exc:
        t.add(dname, None, None, None, None, None, f"ERROR {type(exc).__name__}: {exc}"[:300])
        r.fail(f"SpaCO {dname}: {type(exc).__name__}: {exc}")
    log(f"SpaCO {dname}: {t.rows[-1][-1]}")
