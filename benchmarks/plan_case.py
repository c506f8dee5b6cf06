"""One calibration case of seqwrap.plan, in a fresh process: plan, run what it chose, measure the peak.

    python -m benchmarks.plan_case '{"config": {...LlamaConfig kwargs}, "lora": 8, "seq_len": 2048,
                                     "device_memory": "200MB", "options": {"max_chunk": 1024}}'

prints one JSON line: the plan (chunk_size, checkpointing, predicted total / above-static bytes) and
the measured peaks. measure(case) is the parent side (used by benchmarks/bench_plan.py and
tests/test_plan.py).

Measured (Linux, CPU): "total" is the peak resident set during two training steps (engine call +
AdamW step each) minus the resident set after the imports, before the model exists: weights,
trainable state, gradients and the step's working memory, what the plan's device_peak predicts
(float32 on a CPU: no offload, so the host side is empty). Before that baseline a throwaway model of
the same classes takes one step (_warm_up), so that lazily imported modules and kernel code pages are
not counted as the case's memory. "above static" subtracts the resident set
after the model and the optimizer state exist instead (the plan's peak without weights and optimizer
state). The peak is the kernel's VmHWM, reset through /proc/self/clear_refs; glibc is told to mmap
blocks >= 128 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the resident set.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run(config: dict, seq_len: int, device_memory: str, lora: int | None = None, options: dict | None = None,
        steps: int = 2, threads: int = 1, seed: int = 0) -> dict:
    """In the fresh process: the case above; returns the plan and the measurements (bytes)."""
    import torch
    import transformers

    import seqwrap

    torch.set_num_threads(threads)
    options = dict(options or {}, reserve=0)
    _warm_up(bool(lora))
    gc.collect()
    base = _status_bytes("VmRSS")                      # after the imports and the warm-up, before the model
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, max_position_embeddings=seq_len))
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    p = seqwrap.plan(model, seq_len, device_memory=device_memory, **options)
    if p.checkpointing:
        seqwrap.hf.enable_checkpointing(model)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)  # foreach=False: no parameter-sized temporaries
    for q in params:  # the optimizer state exists before the step, as the plan's static terms assume
        q.grad = torch.zeros_like(q)
    opt.step()
    opt.zero_grad(set_to_none=True)
    # the engine plans again at its first step (chunk_size="auto", checkpointing as just set): same choice
    engine = seqwrap.SeCO(model, chunk_size=seqwrap.AutoChunk(device_memory=device_memory, **options))
    ids = torch.randint(0, config["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(seed + 1))
    gc.collect()
    static = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")      # VmHWM := VmRSS
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", seqwrap.AutoChunkNotice)
        for _ in range(steps):
            engine(ids)
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = _status_bytes("VmHWM")
    if engine.plan.chunk_size != p.chunk_size:
        raise RuntimeError(f"the engine planned chunk {engine.plan.chunk_size}, seqwrap.plan {p.chunk_size}")
    static_predicted = p.device_breakdown.get("weights", 0) + p.device_breakdown.get("optimizer state", 0)
    return {"seq_len": seq_len, "lora": lora, "chunk_size": p.chunk_size, "checkpointing": p.checkpointing,
            "num_chunks": p.num_chunks, "device_memory": p.device_memory,
            "predicted_total": p.device_peak + p.host_peak, "measured_total": peak - base,
            "predicted_dynamic": p.device_peak + p.host_peak - static_predicted, "measured_dynamic": peak - static,
            "static_measured": static - base, "static_predicted": static_predicted}


def _warm_up(lora: bool) -> None:
    """One SeCO step + AdamW step of a throwaway 1-layer model of the same classes: the lazily imported
    modules and the kernels' code pages (oneDNN / BLAS) are resident before the baseline, as the CUDA
    context is before a GPU budget is read. The plan does not count them (on a GPU: its reserve)."""
    import torch
    import transformers

    import seqwrap

    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64))
    if lora:
        import peft

        tiny = peft.get_peft_model(tiny, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([q for q in tiny.parameters() if q.requires_grad], foreach=False)
    for ckpt in (False, True):
        if ckpt:
            seqwrap.hf.enable_checkpointing(tiny)
        seqwrap.SeCO(tiny, chunk_size=16)(torch.randint(0, 64, (1, 48)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    del tiny, opt


def measure(case: dict, timeout: float = 900) -> dict:
    """Parent side: runs the case in a fresh interpreter; its result dict (raises with the child's stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plan_case", json.dumps(case)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmarks.plan_case exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(run(**json.loads(sys.argv[1]))), flush=True)
