"""Packed rows vs a padded batch: 64 documents of Zipf-like lengths (50 to 4,000 tokens), one optimizer
step of SeCO on a small Llama (CPU), each case in a fresh subprocess.

Writes benchmarks/results/packing.md. Run: `pytest benchmarks/bench_packing.py -s` (about 15 minutes on a shared
2-core CPU, most of it the padded case: 5x the tokens of the packed rows).
Environment: SEQWRAP_BENCH_DOCS=64, SEQWRAP_BENCH_ROW=16384, SEQWRAP_BENCH_CHUNK=1024,
SEQWRAP_BENCH_THREADS=1 (torch threads), SEQWRAP_BENCH_MAXLEN=4000.

Cases (the same documents, the same model, SeCO with the same chunk size, one step each):
  padded         every document in its own row, right-padded to the longest (attention_mask, labels -100)
  packed         seqwrap.data.pack_documents into rows of SEQWRAP_BENCH_ROW tokens, one batch, the rows'
                 document boundaries given (cu_seqlens): attention blocks without a shared document skipped
  packed, rows one by one   the same rows, one engine call per row (gradient accumulation; the step's
                 label count as normaliser): blocks are skipped per row, not per batch
  packed, no boundaries     the same rows without their boundaries: what packing costs when the
                 attention reads every earlier token of the row (and trains across documents: wrong)
Memory: peak resident set of the step above the resident set after the model and optimizer state exist
(VmHWM reset through /proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_=131072). Time: a separate fresh process,
one warm-up step on a short input, then the timed step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = ["padded", "packed", "packed_rows", "packed_naive"]
LABELS = {"padded": "padded batch", "packed": "packed rows", "packed_rows": "packed, rows one by one",
          "packed_naive": "packed, no boundaries (wrong)"}


def _env_int(name, default):
    return int(os.environ.get(name, default))


def zipf_lengths(n: int, lo: int = 50, hi: int = 4000, a: float = 1.2, seed: int = 0) -> list[int]:
    """n lengths from a power law p(L) ~ L^-a on [lo, hi] (inverse CDF of the continuous law)."""
    import torch

    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    e = 1.0 - a
    x = (lo ** e + u * (hi ** e - lo ** e)) ** (1.0 / e)
    return [int(v) for v in x.round().tolist()]


def _documents():
    import torch

    lengths = zipf_lengths(_env_int("SEQWRAP_BENCH_DOCS", 64), hi=_env_int("SEQWRAP_BENCH_MAXLEN", 4000))
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


VOCAB = 8192


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _setup(max_len: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(_env_int("SEQWRAP_BENCH_THREADS", 1))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(max_len, 2048))
    model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _batches(case: str, docs, row_len: int):
    """[(engine keyword arguments)] of one optimizer step, and layout facts for the report."""
    import torch

    from seqwrap.data import pack_documents

    if case == "padded":
        width = max(len(d) for d in docs)
        ids = torch.zeros(len(docs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, d in enumerate(docs):
            ids[r, :len(d)], mask[r, :len(d)], labels[r, :len(d)] = d, 1, d
        facts = {"rows": len(docs), "row_len": width}
        return [dict(input_ids=ids, labels=labels, attention_mask=mask)], facts
    batch = pack_documents(docs, row_len)
    inputs = batch.inputs()
    facts = {"rows": batch.input_ids.shape[0], "row_len": row_len, "fill": batch.fill}
    if case == "packed_naive":
        return [dict(input_ids=inputs["input_ids"], labels=inputs["labels"])], facts
    if case == "packed":
        return [inputs], facts
    return [batch.rows(r) for r in range(batch.input_ids.shape[0])], facts


def block_fraction(case: str, docs, row_len: int, chunk: int) -> tuple[int, int]:
    """(attention blocks a causal pass over the step's rows has per layer, of those skipped)."""
    from seqwrap.data import pack_documents
    from seqwrap.ops.documents import Documents

    if case in ("padded", "packed_naive"):
        return 0, 0
    batch = pack_documents(docs, row_len)
    bounds = [(s, min(s + chunk, row_len)) for s in range(0, row_len, chunk)]
    docs_all = Documents.from_cu_seqlens(batch.cu_seqlens, *batch.input_ids.shape)
    if case == "packed":
        return docs_all.block_counts(bounds)
    total = skipped = 0
    for r in range(batch.input_ids.shape[0]):
        t, s = Documents(docs_all.ids[r:r + 1]).block_counts(bounds)
        total, skipped = total + t, skipped + s
    return total, skipped


def run_case(case: str, row_len: int, chunk: int, timing: bool) -> dict:
    """In the fresh subprocess: one optimizer step of `case`; memory (timing=False) or time."""
    import gc

    import torch

    import seqwrap

    docs = _documents()
    model, opt = _setup(max(row_len, max(len(d) for d in docs)))
    engine = seqwrap.SeCO(model, chunk_size=chunk)
    calls, facts = _batches(case, docs, row_len)
    norm = sum(int((c["labels"][:, 1:] != -100).sum()) for c in calls) if case == "packed_rows" else None

    def step():
        for c in calls:
            engine(**c, num_items=norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if timing:  # warm-up on a short input (first-call work), then the timed step
        engine(torch.randint(0, VOCAB, (1, 2 * chunk)))
        opt.zero_grad(set_to_none=True)
    gc.collect()
    base = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    tokens = sum(c["input_ids"].numel() for c in calls)
    return {"case": case, "peak_mb": _rss_mb("VmHWM") - base, "step_s": elapsed, "tokens": tokens,
            "doc_tokens": sum(len(d) for d in docs), "calls": len(calls), **facts}


def _subprocess(*args, memory: bool) -> dict | str:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    if memory:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, cwd=root,
                          env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(lines[-1])


def report(results: dict, row_len: int, chunk: int, out_dir: Path) -> str:
    import torch

    docs = _documents()
    lengths = sorted(len(d) for d in docs)
    pad = results.get("padded")
    lines = ["# Packed rows vs a padded batch (SeCO, CPU)", "",
             f"torch {torch.__version__}, {os.cpu_count()} CPU cores (shared machine), "
             f"{os.environ.get('SEQWRAP_BENCH_THREADS', '1')} torch thread(s). {len(docs)} documents, lengths from "
             f"a power law p(L) ~ L^-1.2 on [50, 4000] (min {lengths[0]}, median {lengths[len(lengths) // 2]}, max "
             f"{lengths[-1]}, {sum(lengths)} tokens in all). Small Llama (hidden 128, 2 layers, 4 heads / 2 KV heads, "
             f"vocab {VOCAB}), float32, AdamW; SeCO with chunks of {chunk} tokens; rows of {row_len} tokens "
             "(seqwrap.data.pack_documents, first-fit decreasing). One optimizer step per case; memory: peak "
             "resident set above the model and optimizer state (fresh process); time: another fresh process, after "
             "a short warm-up. Attention blocks: (query chunk, key chunk) pairs per layer of a causal pass over "
             "the rows, and how many the document boundaries leave empty (never computed).", "",
             "| case | rows x length | tokens computed | attention blocks skipped | peak MiB | time s | "
             "memory vs padded | time vs padded |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for case in CASES:
        r = results.get(case)
        if not isinstance(r, dict) or "error" in r:
            lines.append(f"| {LABELS[case]} | failed: {r if not isinstance(r, dict) else r['error']} | | | | | | |")
            continue
        total, skipped = block_fraction(case, docs, row_len, chunk)
        blocks = f"{skipped} / {total} ({skipped / total:.0%})" if total else "-"
        shape = f"{r['rows']} x {r['row_len']}" + (f" ({r['calls']} calls)" if r["calls"] > 1 else "")
        ratio = lambda k: f"{r[k] / pad[k]:.2f}" if isinstance(pad, dict) and "error" not in pad else "-"  # noqa: E731
        lines.append(f"| {LABELS[case]} | {shape} | {r['tokens']} | {blocks} | {r['peak_mb']:.0f} | "
                     f"{r['step_s']:.1f} | {ratio('peak_mb')} | {ratio('step_s')} |")
    ok = lambda c: isinstance(results.get(c), dict) and "error" not in results[c]  # noqa: E731
    if ok("padded") and ok("packed"):
        p, q = results["padded"], results["packed"]
        lines += ["", f"Packed rows take {p['step_s'] / q['step_s']:.1f}x less time and {p['peak_mb'] / q['peak_mb']:.1f}x "
                  f"less memory than the padded batch ({q['tokens']} vs {p['tokens']} tokens computed; fill of the "
                  f"packed rows {q.get('fill', 0):.1%})."]
    if ok("packed") and ok("packed_naive"):
        q, n = results["packed"], results["packed_naive"]
        lines.append(f"Skipping the blocks without a shared document: the same rows take {n['step_s'] / q['step_s']:.1f}x "
                     "the time when every earlier token of the row is read (the no-boundaries case, which also "
                     "trains across documents).")
    text = "\n".join(lines) + "\n"
    (out_dir / "packing.md").write_text(text)
    return text


def test_packing_time_and_memory(results_dir):
    row_len = _env_int("SEQWRAP_BENCH_ROW", 16384)
    chunk = _env_int("SEQWRAP_BENCH_CHUNK", 1024)
    results = {}
    for case in CASES:
        mem = _subprocess(case, row_len, chunk, 0, memory=True)
        t = _subprocess(case, row_len, chunk, 1, memory=False)
        print(case, mem, t, flush=True)
        if isinstance(mem, dict) and isinstance(t, dict):
            mem["step_s"] = t["step_s"]
            results[case] = mem
        else:
            results[case] = {"error": mem if not isinstance(mem, dict) else t}
    print(report(results, row_len, chunk, results_dir))


if __name__ == "__main__":
    case, row, ch, timing = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4]))
    print(json.dumps(run_case(case, row, ch, timing)), flush=True)
