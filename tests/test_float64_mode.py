"""pure_float64 (seqwrap/hf/float64.py): float32 casts of float64 tensors become no-ops, nothing else changes."""
import torch

from seqwrap.hf.float64 import pure_float64


def test_casts_of_float64_tensors_keep_float64():
    x = torch.randn(3, 5, dtype=torch.float64)
    with pure_float64():
        assert x.float().dtype == torch.float64
        assert x.to(torch.float32).dtype == torch.float64
        assert x.to(dtype=torch.float32).dtype == torch.float64
        assert x.type(torch.float32).dtype == torch.float64
        p = torch.softmax(x, dim=-1, dtype=torch.float32)
        s = x.sum(dtype=torch.float32)
    assert p.dtype == torch.float64 and s.dtype == torch.float64
    torch.testing.assert_close(p, torch.softmax(x, dim=-1), rtol=0, atol=0)


def test_other_dtypes_are_untouched():
    h = torch.randn(4, dtype=torch.bfloat16)
    f = torch.randn(4)
    with pure_float64():
        assert h.float().dtype == torch.float32
        assert f.to(torch.float16).dtype == torch.float16
        assert torch.softmax(h, 0, dtype=torch.float32).dtype == torch.float32
        assert torch.arange(4).float().dtype == torch.float32  # integer tensors: the cast stays


def test_mixed_float32_float64_product_runs_in_float64():
    a = torch.randn(2, 3, dtype=torch.float64)
    b = torch.arange(6).reshape(3, 2).float()  # a float32 value cast from integers
    with pure_float64():
        out = a @ b
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, a @ b.double(), rtol=0, atol=0)
