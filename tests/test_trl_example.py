"""examples/trl_sft_lora.py runs end to end on a tiny random byte-level model and saves the adapter."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl", reason="trl is not installed (pip install seqwrap[dev] installs it)")


def test_trl_sft_lora_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("trl_sft_lora", ROOT / "examples" / "trl_sft_lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "adapter"
    loss = mod.main(["--seq-len", "64", "--chunk-size", "16", "--steps", "2", "--docs", "4", "--grad-accum", "1",
                     "--lora-r", "4", "--output", str(out)])
    assert 0 < loss < 10
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert "tok_s=" in capsys.readouterr().err
