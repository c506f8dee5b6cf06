"""The README's main job runs end to end (tiny settings), learns, and SeCO matches full backprop."""
from seqwrap import demo

TINY = ["--seq-len", "256", "--chunk-size", "64", "--steps", "12", "--micro-batches", "2", "--layers", "2",
        "--hidden", "64", "--heads", "2", "--lr", "3e-3", "--device", "cpu"]


def test_demo_learns_on_stdlib_text(capsys):
    first, last = demo.main(TINY)
    out = capsys.readouterr().out
    assert "engine seco (chunks of 64)" in out and "step  12/12" in out and "peak mem" in out
    assert last < first - 0.5, f"loss should fall on real text: {first:.3f} -> {last:.3f}"


def test_demo_seco_equals_full_backprop():
    """Same seed, same windows: SeCO's losses track full backprop's step for step (float32)."""
    args = TINY[:TINY.index("--steps")] + ["--steps", "3"] + TINY[TINY.index("--steps") + 2:]
    seco = demo.main(args + ["--engine", "seco"])
    full = demo.main(args + ["--engine", "full"])
    for a, b in zip(seco, full):
        assert abs(a - b) < 1e-4 * abs(b), (seco, full)
