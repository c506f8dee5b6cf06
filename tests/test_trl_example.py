"""examples/trl_sft_lora.py runs end to end on a tiny random byte-level model and saves the adapter."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl", reason="trl is not installed (pip install seqwrap[dev] installs it)")


@pytest.mark.parametrize("pack", [False, True])
def test_trl_sft_lora_example(tmp_path, capsys, pack):
    spec = importlib.util.spec_from_file_location("trl_sft_lora", ROOT / "examples" / "trl_sft_lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "adapter"
    if pack:  # the engine must see padding-free rows of several documents
        from seqwrap.hf.trl import SeqwrapSFTTrainer

        seen = []
        real = SeqwrapSFTTrainer._seqwrap_after_step
        SeqwrapSFTTrainer._seqwrap_after_step = lambda self, inputs, res: (
            seen.append(int((inputs["position_ids"] == 0).sum())), real(self, inputs, res))
    try:
        loss = mod.main(["--seq-len", "64", "--chunk-size", "16", "--steps", "2", "--docs", "4", "--grad-accum", "1",
                         "--lora-r", "4", "--output", str(out)] + (["--pack"] if pack else []))
    finally:
        if pack:
            SeqwrapSFTTrainer._seqwrap_after_step = real
    assert 0 < loss < 10
    if pack:
        assert seen and all(n >= 2 for n in seen), seen  # document starts per packed row
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    captured = capsys.readouterr()
    assert "tok_s=" in captured.err and ("padding-free" in captured.out) == pack
