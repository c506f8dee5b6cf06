"""examples/ulysses_fsdp2.py under `torchrun --nproc_per_node 2` (gloo on CPU), tiny sizes: the Ulysses-only
and FSDP2-only modes train on real text with a progress bar and tokens/s; and the combined mode
(Ulysses x FSDP2) trains too."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")


def _run(mode):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "ulysses_fsdp2.py"), "--mode", mode, "--seq-len", "128", "--chunk-size", "32",
           "--steps", "2", "--hidden", "32", "--layers", "2", "--heads", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("mode", ["ulysses", "fsdp2"])
def test_example_halves_train_under_torchrun(mode):
    out = _run(mode)
    assert out.returncode == 0, out.stderr[-4000:]
    final = re.search(rf"final loss (\S+) after 2 steps on 2 ranks \({mode}\)", out.stdout)
    assert final and 0 < float(final.group(1)) < 10, out.stdout[-2000:]
    bar = out.stderr  # tqdm writes to stderr
    assert "tok_s=" in bar, bar[-2000:]
    if mode == "ulysses":  # 4 chunks, 2 layers: pass 1 on 3 chunks + pass 2 forward and backward on 4 = 11 x 2 x 4
        assert "a2a=88" in bar and "ag=0" in bar, bar[-2000:]
    else:                  # 3 FSDP groups (2 layers + root), each gathered and reduced once per step
        assert "ag=3" in bar and "rs=3" in bar and "a2a=0" in bar, bar[-2000:]


def test_example_combined_mode_trains():
    # Ulysses x FSDP2 on the same 2 ranks: one all-gather and one reduce-scatter per group per step
    out = _run("both")
    assert out.returncode == 0, out.stderr[-4000:]
    final = re.search(r"final loss (\S+) after 2 steps on 2 ranks \(both\)", out.stdout)
    assert final and 0 < float(final.group(1)) < 10, out.stdout[-2000:]
    assert "ag=3" in out.stderr and "rs=3" in out.stderr, out.stderr[-2000:]
