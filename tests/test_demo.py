"""The README's main job runs end to end (tiny settings) and learns."""
from seqwrap import demo


def test_demo_learns_on_stdlib_text(capsys):
    first, last = demo.main(["--seq-len", "256", "--steps", "12", "--micro-batches", "2", "--layers", "2",
                             "--hidden", "64", "--heads", "2", "--lr", "3e-3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "step  12/12" in out and "peak mem" in out
    assert last < first - 0.5, f"loss should fall on real text: {first:.3f} -> {last:.3f}"
