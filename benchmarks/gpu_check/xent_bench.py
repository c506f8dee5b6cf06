"""Section "cross_entropy": LM head + loss, forward + backward of the mean loss, at the shapes of Liger's
public table (N = 4K / 8K / 16K / 32K rows, H = 4096, V = 128256, bfloat16), hidden and weight requiring
grad. Median time of a few repeats after a warm-up, and torch.cuda.max_memory_allocated above the inputs.

Methods: torch with full logits (upcast to float32, as HF does), torch.nn.functional.linear_cross_entropy
(reference path, and its chunked options), seqwrap.linear_cross_entropy, and Liger's and Apple's CCE fused
losses when they import or pip-install (into build/gpu-check-tools, without dependencies; from
$SEQWRAP_GPU_WHEELS when set); when they cannot, the reason is recorded. Each method's loss and gradients
are compared with the full-logits result of the same inputs."""
from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from .context import Context, log
from .measure import Meter, is_oom, mib, rel_err
from .report import Result

TITLE = "Cross-entropy benchmark"

GPU_SHAPES = dict(rows=[4096, 8192, 16384, 32768], hidden=4096, vocab=128256, repeats=3)
DRY_SHAPES = dict(rows=[64, 128], hidden=32, vocab=1000, repeats=1)
OPTIONAL = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}
# seqwrap against full logits on the same bf16 inputs (the same bf16 logits, float32 softmax): relative
# error of the loss / the worse of the two gradients. Other libraries' differences are reported only.
AGREE = (1e-3, 2e-2)


def optional_module(ctx: Context, key: str):
    """(module or None, what happened)."""
    module, package = OPTIONAL[key]
    tools = ctx.root / "build" / "gpu-check-tools"
    if tools.is_dir() and str(tools) not in sys.path:
        sys.path.append(str(tools))
    try:
        return importlib.import_module(module), "imported"
    except Exception as exc:
        first = f"{type(exc).__name__}: {exc}"
    if ctx.dry:
        return None, f"not installed ({first}); a dry run installs nothing"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(tools), "--retries", "0", "--timeout", "10"]
    if os.environ.get("SEQWRAP_GPU_WHEELS"):
        cmd += ["--no-index", "--find-links", os.environ["SEQWRAP_GPU_WHEELS"]]
    log(" ".join(cmd + [package]))
    try:
        proc = subprocess.run(cmd + [package], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, f"not importable ({first}); pip install {package} timed out"
    if proc.returncode != 0:
        return None, f"not importable ({first}); pip install {package} failed: {proc.stderr.strip()[-200:]}"
    if str(tools) not in sys.path:
        sys.path.append(str(tools))
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module), f"pip-installed {package}"
    except Exception as exc:
        return None, f"pip-installed {package} but import failed: {type(exc).__name__}: {exc}"


def methods(ctx: Context, r: Result) -> dict:
    """name -> loss(h, w, y); optional ones only when available (the reason is recorded either way)."""
    import seqwrap

    out = {"torch, full logits (float32 upcast)": lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)}
    avail = r.table("Fused losses available", ["method", "state"])
    if hasattr(F, "linear_cross_entropy"):
        out["torch F.linear_cross_entropy"] = lambda h, w, y: F.linear_cross_entropy(h, w, y)
        if hasattr(torch.nn, "LinearCrossEntropyOptions"):
            opts = torch.nn.LinearCrossEntropyOptions()
            out["torch F.linear_cross_entropy (chunked options)"] = \
                lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts)
        avail.add("torch F.linear_cross_entropy", f"torch {torch.__version__}")
    else:
        avail.add("torch F.linear_cross_entropy", f"absent in torch {torch.__version__}")
    out["seqwrap.linear_cross_entropy"] = lambda h, w, y: seqwrap.linear_cross_entropy(h, w, y)
    liger, what = optional_module(ctx, "liger")
    avail.add("Liger fused linear cross-entropy", what)
    if liger is not None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss()

        def liger_loss(h, w, y):
            loss = fn(w, h, y)
            return loss[0] if isinstance(loss, tuple) else loss
        out["Liger fused linear cross-entropy"] = liger_loss
    cce, what = optional_module(ctx, "cce")
    avail.add("Apple CCE (cut_cross_entropy)", what)
    if cce is not None:
        out["Apple CCE"] = lambda h, w, y: cce.linear_cross_entropy(h, w, y)
    return out


def fwd_bwd(fn, h, w, y) -> torch.Tensor:
    loss = fn(h, w, y)
    loss.backward()
    return loss.detach()


def run(ctx: Context) -> Result:
    r = Result("cross_entropy", TITLE)
    shapes = DRY_SHAPES if ctx.dry else GPU_SHAPES
    H, V, reps = shapes["hidden"], shapes["vocab"], shapes["repeats"]
    meter = Meter(ctx.device)
    fns = methods(ctx, r)
    t = r.table(f"Forward + backward, bf16, H = {H}, V = {V} (median of {reps} after a warm-up)",
                ["N", "method", "time ms", "peak MiB above inputs", "memory vs full logits",
                 "loss / grad rel. diff vs full logits", "note"])
    for n in shapes["rows"]:
        g = torch.Generator(device=ctx.device).manual_seed(n)
        h = torch.randn(n, H, device=ctx.device, generator=g).to(torch.bfloat16).requires_grad_()
        w = (torch.randn(V, H, device=ctx.device, generator=g) / H**0.5).to(torch.bfloat16).requires_grad_()
        y = torch.randint(0, V, (n,), device=ctx.device, generator=g)
        ref = None
        for name, fn in fns.items():
            if ctx.left() < 5:
                t.add(n, name, None, None, None, None, "not run: time budget spent")
                continue
            try:
                times, peaks = [], []
                for _ in range(reps + 1):
                    h.grad = w.grad = None
                    meter.clean()
                    base = meter.allocated()

                    sec, peak, loss = meter.run(lambda: fwd_bwd(fn, h, w, y))
                    times.append(sec)
                    peaks.append(None if peak is None else peak - base)
                ms = 1000 * statistics.median(times[1:])
                grads = (h.grad.detach().clone(), w.grad.detach().clone())
                if ref is None:
                    ref = (loss.float(), *grads, peaks[-1])
                    agree, mem_ratio = "(reference)", 1.0 if peaks[-1] else None
                else:
                    errs = (rel_err(loss.float(), ref[0]), max(rel_err(grads[0], ref[1]), rel_err(grads[1], ref[2])))
                    agree = f"{errs[0]:.1e} / {errs[1]:.1e}"
                    mem_ratio = peaks[-1] / ref[3] if peaks[-1] is not None and ref[3] else None
                    if name.startswith("seqwrap") and not (errs[0] <= AGREE[0] and errs[1] <= AGREE[1]):
                        r.fail(f"{name} at N={n}: loss / grad differ from full logits by {agree}")
                t.add(n, name, ms, mib(peaks[-1]), mem_ratio, agree, "")
                log(f"N={n} {name}: {ms:.1f} ms, {mib(peaks[-1])} MiB, {agree}")
            except Exception as exc:
                h.grad = w.grad = None
                meter.clean()
                if is_oom(exc):
                    t.add(n, name, None, None, None, None, "out of memory")
                else:
                    t.add(n, name, None, None, None, None, f"ERROR {type(exc).__name__}: {exc}"[:200])
                    if name.startswith(("torch, full", "seqwrap")):
                        r.fail(f"{name} at N={n}: {type(exc).__name__}: {exc}")
                log(f"N={n} {name}: {t.rows[-1][-1]}")
            ctx.checkpoint(r)
        h = w = y = ref = None   # freed before the next size
        meter.clean()
    if ctx.dry:
        t.note = "Dry run on the CPU: times are not GPU numbers and no device memory is measured."
    r.summary = f"{len(t.rows)} cases, methods: {', '.join(fns)}"
    return r
