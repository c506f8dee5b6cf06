"""examples/dpo_long_lora.py runs end to end on a tiny random byte-level model and saves the adapter."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl", reason="trl is not installed (pip install seqwrap[dev] installs it)")


def test_dpo_long_lora_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("dpo_long_lora", ROOT / "examples" / "dpo_long_lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "adapter"
    loss = mod.main(["--seq-len", "96", "--completion", "16", "--chunk-size", "32", "--steps", "2", "--pairs", "2",
                     "--grad-accum", "1", "--lora-r", "4", "--output", str(out)])
    # the adapter starts as the reference (LoRA B = 0): the first loss is log 2, the second has moved
    assert math.isfinite(loss) and loss != pytest.approx(math.log(2), abs=1e-9) and 0 < loss < 2
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    err = capsys.readouterr().err
    assert "tok_s=" in err and "margin=" in err
