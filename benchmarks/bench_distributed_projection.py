"""Writes benchmarks/results/distributed_projection.md: the memory model's projection of the longest
trainable Llama-3.1-8B sequence on 1, 8 and 64 H200s (seqwrap.planning.projection; no GPU needed, a
projection, not a measurement). Run: `pytest benchmarks/bench_distributed_projection.py -s`."""
from seqwrap.planning.projection import llama8b_projection


def test_bench_distributed_projection(results_dir):
    text = llama8b_projection()
    (results_dir / "distributed_projection.md").write_text(text)
    print(text)
