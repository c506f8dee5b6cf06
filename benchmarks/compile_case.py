"""One torch.compile benchmark case (run in a fresh process by bench_compile.py through benchmarks.child).

case "mst":  a Llama training step with apply_minisequence, the step function eager or torch.compile'd.
case "seco": a SeCO step, the decoder eager or compiled (the chunk loop itself stays Python).
"""
import time

import torch

from benchmarks.child import rss_mb

MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)


def run(case: str, compiled: bool, seq: int, chunk: int = 1024, backend: str = "inductor", steps: int = 3) -> dict:
    import transformers

    import seqwrap

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL, max_position_embeddings=seq))
    ids = torch.randint(0, MODEL["vocab_size"], (1, seq))
    if case == "mst":
        seqwrap.apply_minisequence(model)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
        fn = torch.compile(step, backend=backend) if compiled else step
    else:
        if compiled:
            model.model.compile(backend=backend)
        engine = seqwrap.SeCO(model, chunk_size=chunk)

        def fn():
            engine(ids)
    base = rss_mb()
    t0 = time.perf_counter()
    fn()  # warm-up: compiles when compiled
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps - 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"case": case, "compiled": compiled, "seq": seq, "first_step_s": first, "step_s": min(times),
            "base_rss_mb": base}
