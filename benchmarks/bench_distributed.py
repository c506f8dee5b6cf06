"""Ulysses, FSDP2 and Ulysses x FSDP2 under SeCO on 2 and 4 gloo ranks: per rank, bytes moved and
collectives per step, peak RSS and tokens/s, beside what seqwrap.planning.distributed predicts.

Every case runs in fresh processes (one per rank; peak RSS belongs to that case), float32, one thread
each. Counted per rank with seqwrap.parallel.count_collectives (all-gathers: bytes of the gathered
parameters; reduce-scatters: the unsharded gradients; all-reduces; all-to-alls: what a rank sends).
Ulysses: every rank holds SEQ/P tokens of one sequence (shard_batch with the chunk); FSDP2: every rank
trains its own sequence of SEQ tokens; Ulysses x FSDP2: one sequence over the ranks, the parameters
sharded over the same ranks (FSDP2's divide factor makes its reduction sum the sequence ranks:
seqwrap/parallel/ulysses_fsdp.py). A configuration SeCO refuses (NotImplementedError) gets a row saying so.
Writes benchmarks/results/distributed.md.

Run: `pytest benchmarks/bench_distributed.py -s` (about 2 minutes on 2 idle CPU cores).
"""
import datetime
import os
import platform
import resource
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SEQ = int(os.environ.get("SEQWRAP_BENCH_DIST_SEQ", "1024"))
CHUNK = 256
STEPS = 2  # the first initialises FSDP / warms up; the last is reported
MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
CASES = [("Ulysses", True, False), ("FSDP2", False, True), ("Ulysses x FSDP2", True, True)]
WORLDS = (2, 4)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _case(rank, world, ulysses, fsdp):
    import transformers

    import seqwrap
    from seqwrap.parallel import apply_ulysses, count_collectives, shard_batch

    torch.set_num_threads(1)
    base_mib = _rss_mib()  # after the imports, before the model: the prediction is compared with the growth
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=SEQ, **MODEL))
    if ulysses:
        apply_ulysses(model, dist.group.WORLD)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    try:
        engine = seqwrap.SeCO(model, chunk_size=CHUNK)
    except NotImplementedError as exc:
        return dict(skipped=str(exc))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0 if ulysses else rank)  # Ulysses: the same sequence on every rank
    for _ in range(STEPS):
        ids = torch.randint(0, MODEL["vocab_size"], (1, SEQ), generator=gen)
        batch = shard_batch({"input_ids": ids, "labels": ids}, dist.group.WORLD, chunk_size=CHUNK) if ulysses \
            else {"input_ids": ids, "labels": ids}
        dist.barrier()
        start = time.perf_counter()
        with count_collectives() as counts:
            engine(**batch)
        seconds = time.perf_counter() - start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tokens = SEQ if ulysses else SEQ * world  # tokens trained per step, all ranks together
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(counts=dict(counts.__dict__), seconds=seconds, tok_s=tokens / seconds, peak_mib=peak,
                growth_mib=peak - base_mib)


def _entry(rank, world, init, out, args):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        torch.save(_case(rank, world, *args), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_case(world, ulysses, fsdp):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_entry, args=(world, os.path.join(tmp, "store"), out, (ulysses, fsdp)), nprocs=world, join=True)
        return [torch.load(f"{out}.{r}") for r in range(world)]


def predict(world, ulysses, fsdp):
    """seqwrap.planning.distributed's numbers for this configuration (float32, full fine-tuning, AdamW
    moments in float32 + float32 gradients: what this run holds)."""
    import transformers

    from seqwrap.memory_model import DecoderShape
    from seqwrap.planning.distributed import Layout, parallel_peak, predicted_collectives

    shape = DecoderShape.from_config(transformers.LlamaConfig(**MODEL))
    layout = Layout(sp=world if ulysses else 1, shard=world if fsdp else 1)
    est = parallel_peak(shape, SEQ, CHUNK, layout, dtype_bytes=4, grad_ckpt=False)
    comm = predicted_collectives(shape, SEQ, CHUNK, layout, dtype_bytes=4)
    return dict(mib=(est.device_total + est.host_total) / 2**20, comm=comm)


def _ratio(measured, predicted):
    return f"{measured / predicted:.2f}" if predicted else ("1.00" if not measured else "inf")


def write_table(rows, path):
    lines = [
        "# Ulysses, FSDP2 and Ulysses x FSDP2 under SeCO: measured per rank, beside the memory model", "",
        f"Measured {datetime.date.today().isoformat()}: gloo ranks on CPU ({platform.machine()}, "
        f"{os.cpu_count()} cores shared by all ranks, 1 thread each), torch {torch.__version__}, float32, "
        f"full fine-tuning with AdamW. Llama {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_attention_heads']} heads / {MODEL['num_key_value_heads']} K/V heads, vocab "
        f"{MODEL['vocab_size']}; SeCO chunk {CHUNK}, {SEQ} tokens per sequence. Ulysses: one sequence split over "
        f"the P ranks; FSDP2: fully_shard per layer + root, default FSDPSchedule (one all-gather and one "
        f"reduce-scatter per group per step), every rank its own sequence; Ulysses x FSDP2: one sequence split "
        f"over the P ranks and the parameters sharded over the same P ranks. Per rank, the step after a warm-up "
        f"step (the largest over the ranks). AG / RS / AR / A2A = all-gathers / reduce-scatters / all-reduces "
        f"/ all-to-alls; MiB moved = gathered + reduced + all-reduced + sent bytes. Peak = peak RSS of a rank "
        f"process; 'growth' = peak minus the RSS after imports (Python + torch + transformers). 'pred' = "
        f"seqwrap.planning.distributed (parallel_peak, predicted_collectives) for the same configuration; "
        f"ratio = measured / predicted.", "",
        "| ranks | mode | AG | RS | AR | A2A | MiB moved | pred MiB moved | ratio | peak RSS MiB | growth MiB "
        "| pred MiB | ratio | tokens/s (all ranks) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world, label, res, pred in rows:
        if "skipped" in res[0]:
            lines.append(f"| {world} | {label} | skipped: {res[0]['skipped'].splitlines()[0]} |" + " |" * 11)
            continue
        c = max(res, key=lambda r: r["counts"]["all_to_all_bytes"] + r["counts"]["all_gather_bytes"])["counts"]
        moved = c["all_gather_bytes"] + c["reduce_scatter_bytes"] + c["all_reduce_bytes"] + c["all_to_all_bytes"]
        p = pred["comm"]
        pmoved = p["all_gather_bytes"] + p["reduce_scatter_bytes"] + p["all_reduce_bytes"] + p["all_to_all_bytes"]
        peak = max(r["peak_mib"] for r in res)
        growth = max(r["growth_mib"] for r in res)
        tok_s = min(r["tok_s"] for r in res)
        lines.append(f"| {world} | {label} | {c['all_gathers']} | {c['reduce_scatters']} | {c['all_reduces']} | "
                     f"{c['all_to_alls']} | {moved / 2**20:.2f} | {pmoved / 2**20:.2f} | {_ratio(moved, pmoved)} | "
                     f"{peak:.0f} | {growth:.0f} | {pred['mib']:.0f} | {_ratio(growth, pred['mib'])} | {tok_s:,.0f} |")
    lines.append(f"\nLoad average (1 min, at the end): {os.getloadavg()[0]:.1f}: tokens/s are noisy on a shared "
                 "machine and 4 ranks share 2 cores; counts and bytes are not noisy. The memory prediction counts "
                 "tensors only; RSS growth also holds allocator slack and per-process library state, so the ratio "
                 "is above 1 on this small model.")
    path.write_text("\n".join(lines) + "\n")


def test_bench_distributed(results_dir):
    rows = []
    for world in WORLDS:
        for label, ulysses, fsdp in CASES:
            res = run_case(world, ulysses, fsdp)
            rows.append((world, label, res, predict(world, ulysses, fsdp)))
            print(world, label, res[0])
    write_table(rows, results_dir / "distributed.md")
    print((results_dir / "distributed.md").read_text())
