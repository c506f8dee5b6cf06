"""Pins what the hybrid engine relies on in transformers, one test per item (see seqwrap/hf/hybrid.py):
HF's cached multi-token forward continues a sequence exactly for the Mamba-2 / DeltaNet families, and does
not for the Mamba-1 mixers (the reason seqwrap runs its own forward for those); seqwrap's Mamba-2 mixer
forward (on its SSD kernel) equals HF's."""
import contextlib

import pytest
import torch

from seqwrap.hf import mamba1_mixer, mamba2_mixer
from seqwrap.hf.compat import cache_argument
from seqwrap.hf.hybrid import SUPPORTED

from .hybrid_tiny import FAMILIES, VOCAB, pure_float64, tiny_hybrid

MAMBA1 = ("mamba", "jamba")


def two_calls(model, ids, m):
    """Logits of ids through HF's own DynamicCache in two forwards ([0, m) then [m, T)), and in one."""
    from transformers import DynamicCache

    T = ids.shape[1]
    pos = torch.arange(T)[None].expand(ids.shape[0], T)
    cache = DynamicCache(config=model.config)
    kw = {"use_cache": True, cache_argument(type(model)): cache}
    extra = {} if model.config.model_type in MAMBA1 + ("mamba2",) else {"position_ids": pos[:, :m]}
    a = model(ids[:, :m], **kw, **extra).logits
    extra = {} if not extra else {"position_ids": pos[:, m:]}
    b = model(ids[:, m:], **kw, **extra).logits
    return torch.cat([a, b], 1), model(ids).logits


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if f not in MAMBA1))
def test_hf_cached_multi_token_forward_continues_exactly(family):
    model = tiny_hybrid(family).eval()
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pure_float64():
        chunked, whole = two_calls(model, ids, 11)
    assert (chunked - whole).abs().max() <= 1e-10 * whole.abs().max()


@pytest.mark.parametrize("family", MAMBA1)
def test_hf_mamba1_mixers_ignore_the_cached_state(family):
    """If this fails, transformers fixed its Mamba-1 multi-token cached path and mamba1_mixer.py may go."""
    model = tiny_hybrid(family).eval()
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pure_float64():
        chunked, whole = two_calls(model, ids, 11)
        assert torch.allclose(chunked[:, :11], whole[:, :11], rtol=1e-10, atol=1e-10)
        assert (chunked[:, 11:] - whole[:, 11:]).abs().max() > 1e-6 * whole.abs().max()  # exact would be 1e-15
        with mamba1_mixer.patched(model):   # seqwrap's forward continues exactly
            chunked, whole = two_calls(model, ids, 11)
    assert (chunked - whole).abs().max() <= 1e-10 * whole.abs().max()


def test_mamba1_patch_restores_the_instances():
    model = tiny_hybrid("jamba")
    mixers = mamba1_mixer.mixers(model)
    assert len(mixers) == 2 and all("forward" not in m.__dict__ for m in mixers)
    with mamba1_mixer.patched(model):
        assert all(m.forward.__func__ is mamba1_mixer.mamba1_forward for m in mixers)
    assert all("forward" not in m.__dict__ for m in mixers)
    with pytest.raises(RuntimeError, match="inside"):
        with mamba1_mixer.patched(model):
            raise RuntimeError("inside")
    assert all("forward" not in m.__dict__ for m in mixers)


def test_every_supported_family_is_pinned():
    assert sorted(SUPPORTED) == sorted(FAMILIES)


MAMBA2 = ("mamba2", "bamba", "nemotron_h", "granitemoehybrid", "zamba2")


@pytest.mark.parametrize("family", MAMBA2)
def test_seqwrap_mamba2_forward_equals_hf(family):
    """mamba2_mixer.mamba2_forward (seqwrap's SSD scan) equals HF's mixer forward, outputs and gradients; if
    HF changes its Mamba-2 mixer, this names the family."""
    model = tiny_hybrid(family)
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))
    assert len(mamba2_mixer.mixers(model)) >= 1
    outs = []
    with pure_float64():
        for patch in (False, True):
            model.zero_grad(set_to_none=True)
            with mamba2_mixer.patched(model) if patch else contextlib.nullcontext():
                logits = model(ids).logits
                logits.square().mean().backward()
            outs.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = outs
    assert (a - b).abs().max() <= 1e-12 * a.abs().max()
    assert len(ga) == len(gb) and all((x - y).norm() <= 1e-10 * x.norm() for x, y in zip(ga, gb))
    assert all("forward" not in m.__dict__ for m in mamba2_mixer.mixers(model))


def test_the_cache_questions_of_transformers_5_25_are_answered():
    """transformers 5.25's mixers ask the cache get_recurrent_states_to_keep(layer) before the chunked scan (the
    chunked step needs none) and call increase_count(layer, state_idx) on the single-token path (never taken in
    a chunked step: refused). Both are answered by seqwrap's hybrid cache itself, not by HF's base class."""
    import inspect

    import transformers
    from transformers.models.mamba2 import modeling_mamba2

    from seqwrap.hf.hybrid_cache import HybridChunkCache
    from seqwrap.hf.versions import parse_version

    assert "get_recurrent_states_to_keep" in HybridChunkCache.__dict__ and "increase_count" in HybridChunkCache.__dict__
    source = inspect.getsource(modeling_mamba2)
    if parse_version(transformers.__version__) >= (5, 25):
        assert "cache.get_recurrent_states_to_keep(module.layer_idx)" in source
        assert "cache.increase_count(layer_idx, state_idx)" in source
        assert "seq_len == 1" in source  # increase_count only on the single-token path
    cache = HybridChunkCache.__new__(HybridChunkCache)  # the answers need no store
    assert cache.get_recurrent_states_to_keep(3) == 0 and cache.get_recurrent_states_to_keep() == 0
    with pytest.raises(RuntimeError, match="single-token"):
        cache.increase_count(2, 0)
