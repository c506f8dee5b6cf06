"""The core's float32 -> bfloat16 / float16 rounding equals torch's, bit for bit."""
import pytest
import torch

import seqwrap

pytestmark = pytest.mark.ccore


def interesting_floats():
    bits = torch.randint(-(2**31), 2**31 - 1, (200000,), dtype=torch.int64).to(torch.int32)
    rand = bits.view(torch.float32)
    rand = rand[~torch.isnan(rand)]
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65519.99, 65520.0, 1e-8, 5.96e-8,
                             2.98e-8, 2.9802322e-08, 6.1e-5, 6.103515625e-05, 1.0 + 2**-11, 1.0 + 3 * 2**-11,
                             1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, -1.5e-6, 1e-40])
    # every half value, and the midpoints between neighbours (ties to even)
    halves = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    halves = halves[torch.isfinite(halves)]
    sorted_h = halves.sort().values.double()
    mids = ((sorted_h[1:] + sorted_h[:-1]) / 2).float()
    bf = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf = bf[torch.isfinite(bf)]
    sorted_b = bf.sort().values.double()
    bmids = ((sorted_b[1:] + sorted_b[:-1]) / 2).float()
    return torch.cat([rand, specials, halves, mids, bf, bmids]).contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_matches_torch(dtype):
    src = interesting_floats()
    dst = torch.empty(src.shape, dtype=dtype)
    seqwrap._C._round_to_half(src, dst)
    want = src.to(dtype)
    same = dst.view(torch.int16) == want.view(torch.int16)
    bad = (~same).nonzero().flatten()[:5]
    assert bool(same.all()), f"first mismatches: {[(src[i].item(), dst[i].item(), want[i].item()) for i in bad]}"


def test_nan_stays_nan():
    src = torch.tensor([float("nan"), -float("nan")])
    for dtype in (torch.bfloat16, torch.float16):
        dst = torch.empty(2, dtype=dtype)
        seqwrap._C._round_to_half(src, dst)
        assert torch.isnan(dst.float()).all()
