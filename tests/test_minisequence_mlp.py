"""The mini-sequence MLP Function on its own: slicing, chunk choice, saved tensors, RNG replay, dtypes."""
import pytest
import torch
from torch import nn

from seqwrap.hf.minisequence import _swapped_parameters, _trainable
from math import ceil

from seqwrap.hf.mst_mlp import (
    MIN_TOKENS_PER_CHUNK,
    MiniSequenceMLP,
    alst_mlp_shards,
    auto_mlp_chunks,
    chunk_bounds,
    mlp_shard_bytes_per_token,
)


class GatedMLP(nn.Module):
    """Llama-style H -> I -> H MLP with optional dropout on the input (like LoRA dropout)."""

    def __init__(self, h=8, i=20, p=0.0, dtype=torch.float64):
        super().__init__()
        self.gate = nn.Linear(h, i, bias=True, dtype=dtype)
        self.up = nn.Linear(h, i, bias=False, dtype=dtype)
        self.down = nn.Linear(i, h, bias=True, dtype=dtype)
        self.drop = nn.Dropout(p)

    def forward(self, x):  # x (B, L, H) -> (B, L, H)
        x = self.drop(x)
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def mst(module, x, chunks):
    params, names = _trainable(module)

    def run(xs, swap):
        if not swap:
            return module.forward(xs)
        with _swapped_parameters(module, swap):
            return module.forward(xs)

    return MiniSequenceMLP.apply(x, run, chunk_bounds(x.shape[-2], chunks), names, *params)


@pytest.mark.parametrize("length", [1, 2, 7, 13, 64])
@pytest.mark.parametrize("chunks", [1, 3, 4, 100])
def test_chunk_bounds_cover_every_token(length, chunks):
    b = chunk_bounds(length, chunks)
    assert b[0][0] == 0 and b[-1][1] == length
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(b, b[1:]))
    sizes = [e - s for s, e in b]
    assert len(b) == min(chunks, length) and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_auto_chunks():
    # Llama-3-8B MLP (H 4096, I 14336), bf16: (6 * 14336 + 3 * 4096) * 2 = 196608 bytes per token; the
    # default target (the hidden states, tokens * 4096 * 2) gives ceil(196608 / 8192) = 24 shards.
    assert mlp_shard_bytes_per_token(4096, 14336, 2) == 196608
    assert auto_mlp_chunks(16384, 4096, 14336, dtype_bytes=2) == 24
    assert auto_mlp_chunks(131072, 4096, 14336, dtype_bytes=2) == 24  # same ratio at any length
    assert auto_mlp_chunks(255, 4096, 14336) == 1  # short: plain forward
    assert auto_mlp_chunks(3 * MIN_TOKENS_PER_CHUNK, 4096, 14336) == 3  # capped by tokens per shard
    # float32 doubles bytes and target alike: same count
    assert auto_mlp_chunks(16384, 4096, 14336, dtype_bytes=4) == 24
    # kinds: plain (4 I + 3 H) and fused gate_up (8 I + 3 H), H 512, I 1376: ceil(7040/512) = 14, ceil(12544/512) = 25
    assert auto_mlp_chunks(16384, 512, 1376, kind="plain") == 14
    assert auto_mlp_chunks(16384, 512, 1376, kind="fused_gated") == 25
    assert auto_mlp_chunks(16384, 512, 1376) == ceil((6 * 1376 + 3 * 512) / 512) == 20
    # an explicit budget: ceil(16384 * 196608 / 2**30) = 3 shards; 1 when everything fits; at most one per token
    assert auto_mlp_chunks(16384, 4096, 14336, dtype_bytes=2, target_bytes=2**30) == 3
    assert auto_mlp_chunks(16384, 4096, 14336, dtype_bytes=2, target_bytes=2**40) == 1
    assert auto_mlp_chunks(100, 4096, 14336, dtype_bytes=2, target_bytes=1) == 100
    # ALST's rule for comparison: ceil(seqlen / H)
    assert alst_mlp_shards(16384, 512) == 32 and alst_mlp_shards(16385, 4096) == 5


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1"])
def test_auto_chunks_bad_target(bad):
    with pytest.raises(ValueError, match="MLP memory target"):
        auto_mlp_chunks(1024, 64, 128, target_bytes=bad)
    with pytest.raises(ValueError, match="unknown MLP kind"):
        mlp_shard_bytes_per_token(64, 128, 4, kind="moe")


@pytest.mark.parametrize("chunks", [1, 3, 5])
def test_matches_autograd_and_saves_only_the_input(chunks):
    torch.manual_seed(0)
    mlp = GatedMLP()
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 11, 8, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = mst(mlp, x, chunks)
    assert saved == [x.shape]  # nothing of size (.., I) kept for backward
    params = list(mlp.parameters())
    got = torch.autograd.grad(y, [x, *params], gy)
    want_y = mlp(x)
    want = torch.autograd.grad(want_y, [x, *params], gy)
    torch.testing.assert_close(y, want_y, rtol=1e-13, atol=1e-14)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in params)  # .grad never touched by the Function itself


def test_frozen_parameters_and_no_input_grad():
    torch.manual_seed(1)
    mlp = GatedMLP()
    mlp.gate.requires_grad_(False)
    x = torch.randn(1, 9, 8, dtype=torch.float64)  # does not require grad
    y = mst(mlp, x, 4)
    y.square().sum().backward()
    ref = GatedMLP()
    ref.load_state_dict(mlp.state_dict())
    ref.gate.requires_grad_(False)
    ref(x).square().sum().backward()
    assert mlp.gate.weight.grad is None
    for p, q in zip(mlp.parameters(), ref.parameters()):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_dropout_masks_replayed_in_backward():
    """With dropout, backward recomputes each slice with the forward's RNG draws."""
    mlp = GatedMLP(p=0.3)
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 10, 8, dtype=torch.float64)
    torch.manual_seed(5)
    y = mst(mlp, x, 3)
    after_forward = torch.get_rng_state()
    got = torch.autograd.grad(y, [x, *mlp.parameters()], gy)
    assert torch.equal(torch.get_rng_state(), after_forward)  # the replay does not move the global RNG
    torch.manual_seed(5)  # reference: the same slices, same order, plain autograd
    want_y = torch.cat([mlp(x[:, s:e]) for s, e in chunk_bounds(10, 3)], dim=1)
    want = torch.autograd.grad(want_y, [x, *mlp.parameters()], gy)
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_bfloat16_gradients_accumulate_in_float32():
    torch.manual_seed(2)
    mlp64 = GatedMLP(h=16, i=48)
    mlp = GatedMLP(h=16, i=48, dtype=torch.bfloat16)
    mlp.load_state_dict(mlp64.state_dict())
    x = torch.randn(1, 64, 16, dtype=torch.float64)
    gy = torch.randn(1, 64, 16, dtype=torch.float64)
    got = torch.autograd.grad(mst(mlp, x.bfloat16(), 8), list(mlp.parameters()), gy.bfloat16())
    want = torch.autograd.grad(mlp64(x), list(mlp64.parameters()), gy)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        err = (g.double() - w).abs().max() / w.abs().max()
        assert err < 3e-2, err


def test_autocast_state_replayed_in_backward():
    """Under torch.autocast the recomputation in backward runs in the forward's autocast dtype."""
    torch.manual_seed(3)
    mlp = GatedMLP(dtype=torch.float32)
    seen = []
    mlp.gate.register_forward_hook(lambda _m, _i, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    x = torch.randn(1, 12, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mst(mlp, x, 3)
    y.float().sum().backward()  # outside autocast
    assert seen[:3] == [(False, torch.bfloat16)] * 3  # forward, no grad
    assert seen[3:] == [(True, torch.bfloat16)] * 3  # recomputation, grad enabled, same dtype
    assert x.grad.dtype == torch.float32 and mlp.gate.weight.grad.dtype == torch.float32
