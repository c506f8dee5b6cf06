"""examples/lora_finetune.py runs end to end on a tiny random model and saves the adapter."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    spec = importlib.util.spec_from_file_location("lora_finetune", ROOT / "examples" / "lora_finetune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("engine, extra", [("seco", []), ("spaco", []), ("seco", ["--offload", "--gradient-checkpointing"])],
                         ids=["seco", "spaco", "seco-offload-ckpt"])
def test_lora_finetune_example(tmp_path, engine, extra):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    cfg.save_pretrained(tmp_path / "cfg")
    text = tmp_path / "a.txt"
    text.write_text("long context training, chunk by chunk. " * 40)
    out = tmp_path / "adapter"
    loss = load_example().main(["--model", str(tmp_path / "cfg" / "config.json"), "--text", str(text),
                                "--engine", engine, "--chunk-size", "16", "--seq-len", "64", "--steps", "2",
                                "--grad-accum", "2", "--lr", "1e-3", "--output", str(out), *extra])
    assert loss > 0
    assert (out / "adapter_config.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_lora_finetune_example_packed(tmp_path):
    """--pack: several text files of different sizes become documents packed into rows (one longer than a
    row is split), trained with their boundaries."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    cfg.save_pretrained(tmp_path / "cfg")
    for i, n in enumerate([5, 12, 30, 2, 9]):
        (tmp_path / f"doc{i}.txt").write_text("packed document %d. " % i * n)
    out = tmp_path / "adapter"
    mod = load_example()
    loss = mod.main(["--model", str(tmp_path / "cfg" / "config.json"), "--text", str(tmp_path / "doc*.txt"),
                     "--pack", "--chunk-size", "16", "--seq-len", "128", "--steps", "2", "--grad-accum", "2",
                     "--lr", "1e-3", "--output", str(out)])
    assert loss > 0
    assert (out / "adapter_config.json").exists()
