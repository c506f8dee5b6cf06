"""examples/fsdp2_seco.py under `torchrun --nproc_per_node 2` (gloo on CPU), tiny sizes: it trains and
reports its collectives (one all-gather and one reduce-scatter per FSDP group per step)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")


@pytest.mark.parametrize("extra", [[], ["--engine", "spaco", "--cpu-offload", "--schedule", "layer"]],
                         ids=["seco", "spaco-offload-layer"])
def test_fsdp2_example_runs_under_torchrun(extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "fsdp2_seco.py"), "--seq-len", "96", "--chunk-size", "32", "--steps", "2",
           "--hidden", "32", "--layers", "2", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    final = re.search(r"final loss (\S+) after 2 steps on 2 ranks", out.stdout)
    assert final and 0 < float(final.group(1)) < 10, out.stdout[-2000:]
    bar = out.stderr  # tqdm writes to stderr
    assert "tok_s=" in bar
    if not extra:  # default schedule: 3 groups (2 layers + root), each gathered and reduced once per step
        assert "ag=3" in bar and "rs=3" in bar, bar[-2000:]
