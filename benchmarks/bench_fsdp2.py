"""FSDP2 under the chunked engines: collectives, bytes moved, time and peak memory per training step.

Two gloo processes on CPU, a Llama sharded with fully_shard per decoder layer and at the root; every
case runs in a fresh pair of processes (peak RSS belongs to that case). Counted on rank 0 with
seqwrap.parallel.count_collectives: all-gathers (bytes = the gathered, unsharded parameters) and
reduce-scatters (bytes = the unsharded gradients reduced). Writes benchmarks/results/fsdp2.md.

Run: `pytest benchmarks/bench_fsdp2.py -s` (about 3 minutes on 2 idle CPU cores).
SEQWRAP_BENCH_FSDP2_SEQ=4096 picks another sequence length.
"""
import os
import platform
import resource
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SEQ = int(os.environ.get("SEQWRAP_BENCH_FSDP2_SEQ", "2048"))
CHUNK = 256
MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
# (label, method, FSDPSchedule args, lora)
CASES = [
    ("plain FSDP2 backprop", "plain", None, False),
    ("MsT (apply_minisequence)", "mst", None, False),
    ("SeCO, schedule step/step (default)", "seco", ("step", "step"), False),
    ("SeCO, step/chunk", "seco", ("step", "chunk"), False),
    ("SeCO, layer/step", "seco", ("layer", "step"), False),
    ("SeCO, layer/chunk (naive)", "seco", ("layer", "chunk"), False),
    ("plain FSDP2 backprop, LoRA", "plain", None, True),
    ("SeCO, step/step, LoRA", "seco", ("step", "step"), True),
]


def _model(lora):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(max_position_embeddings=SEQ, **MODEL)
    model = transformers.LlamaForCausalLM(cfg)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in inner.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _case(rank, world, method, schedule, lora):
    import seqwrap
    from seqwrap.parallel import FSDPSchedule, count_collectives

    torch.set_num_threads(1)
    model = _model(lora)
    if method == "mst":
        seqwrap.apply_minisequence(model)
    model = _shard(model)
    gen = torch.Generator().manual_seed(rank)
    engine = seqwrap.SeCO(model, chunk_size=CHUNK, fsdp=FSDPSchedule(*schedule)) if method == "seco" else None
    times, counts = [], None
    for _ in range(2):  # the first step also initialises FSDP; the second is reported
        ids = torch.randint(0, MODEL["vocab_size"], (1, SEQ), generator=gen)
        dist.barrier()
        start = time.perf_counter()
        with count_collectives() as counts:
            if engine is not None:
                engine(ids)
            else:
                model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return dict(counts=counts.__dict__, seconds=times[-1], peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _entry(rank, world, init, out, args):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = _case(rank, world, *args)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_case(method, schedule, lora):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_entry, args=(2, os.path.join(tmp, "store"), out, (method, schedule, lora)), nprocs=2, join=True)
        return torch.load(out)


def write_table(rows, path):
    base = {lora: r for label, m, s, lora, r in rows if m == "plain"}
    lines = [
        "# FSDP2: collectives and bytes per training step, chunked engines vs plain FSDP2 backprop", "",
        f"2 gloo ranks on CPU ({platform.machine()}, 1 thread each), torch {torch.__version__}, float32. "
        f"Llama {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, vocab {MODEL['vocab_size']}, "
        f"fully_shard per layer + root ({MODEL['num_hidden_layers'] + 1} FSDP groups); one sequence of {SEQ} "
        f"tokens per rank per step; SeCO chunks of {CHUNK} tokens ({SEQ // CHUNK} chunk backwards). "
        "Counts and bytes are rank 0's, for the second step: all-gather bytes = the unsharded parameters "
        "gathered, reduce-scatter bytes = the unsharded gradients reduced (a ring moves (world-1)/world of "
        "each). Peak = peak RSS of rank 0 (fresh processes per case). Schedule = FSDPSchedule(params, grads).",
        "",
        "| method | all-gathers | AG MiB | reduce-scatters | RS MiB | total MiB vs plain | s / step | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, method, schedule, lora, r in rows:
        c, b = r["counts"], base[lora]["counts"]
        total = c["all_gather_bytes"] + c["reduce_scatter_bytes"]
        ref = b["all_gather_bytes"] + b["reduce_scatter_bytes"]
        lines.append(f"| {label} | {c['all_gathers']} | {c['all_gather_bytes'] / 2**20:.1f} | {c['reduce_scatters']} | "
                     f"{c['reduce_scatter_bytes'] / 2**20:.1f} | {total / ref:.2f}x | {r['seconds']:.2f} | "
                     f"{r['peak_mib']:.0f} |")
    lines.append(f"\nLoad average while measuring (1 min, at the end): {os.getloadavg()[0]:.1f} on "
                 f"{os.cpu_count()} cores: times are noisy on a shared machine, counts and bytes are not.")
    path.write_text("\n".join(lines) + "\n")


def test_bench_fsdp2(results_dir):
    rows = []
    for label, method, schedule, lora in CASES:
        r = run_case(method, schedule, lora)
        rows.append((label, method, schedule, lora, r))
        print(label, r)
    write_table(rows, results_dir / "fsdp2.md")
    print((results_dir / "fsdp2.md").read_text())
