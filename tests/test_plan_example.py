"""examples/plan_llama.py prints the Llama-3.1-8B plans for 128K / 512K / 1M tokens on 24 / 80 / 141 GB."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    spec = importlib.util.spec_from_file_location("plan_llama", ROOT / "examples" / "plan_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_example(capsys):
    import seqwrap

    results = load_example().main(["--detail", "80GB:1M"])
    out = capsys.readouterr().out
    assert len(results) == 9 and all(isinstance(p, seqwrap.Plan) for p in results.values())  # 1 TB of host: all fit
    for memory, p in ((m, results[m, "1M"]) for m in ("24GB", "80GB", "141GB")):
        assert p.offload and p.device_peak <= p.device_budget  # 1M tokens: the sequence lives in host memory
        assert f"| {memory} | 1M | {p.chunk_size:,} | on |" in out
    assert "engine                  seqwrap.SeCO(model, chunk_size=" in out  # the --detail table


def test_plan_example_without_host_memory(capsys):
    import seqwrap

    results = load_example().main(["--host-memory", "none"])
    out = capsys.readouterr().out
    refused = [k for k, p in results.items() if isinstance(p, seqwrap.PlanError)]
    assert ("80GB", "1M") in refused and ("141GB", "128K") not in refused
    err = results["80GB", "1M"]
    assert err.needed_device_memory > 80e9 and 0 < err.longest_seq < 1 << 20
    assert "| 80GB | 1M | does not fit (needs" in out
