"""The memory model on P ranks (seqwrap.planning.distributed): the one-rank case is the single-device
model, the terms match hand computations, and more ranks / offload never shorten the longest sequence."""
import pytest
import torch

from seqwrap.memory_model import DecoderShape, seco_peak
from seqwrap.planning.distributed import (Layout, longest_parallel_sequence, parallel_peak,
                                          predicted_collectives)

S = DecoderShape.llama_3_1_8b()
LORA = S.lora_params(16)
KIB = 1024


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("offload, ckpt", [(False, True), (True, True), (False, False), (True, False)])
def test_one_rank_is_the_single_device_model(lora, offload, ckpt):
    for seq, chunk in ((1 << 16, 8192), (3 * 4096, 4096), (1000, 4096)):
        one = parallel_peak(S, seq, chunk, Layout(offload=offload), lora_params=lora, grad_ckpt=ckpt)
        ref = seco_peak(S, seq, chunk, lora_params=lora, grad_ckpt=ckpt, offload=offload)
        assert one.device == ref.device and one.host == ref.host


def test_ulysses_splits_the_sequence_terms_by_sp():
    T, C = 1 << 20, 16384
    for sp in (2, 8):
        est = parallel_peak(S, T, C, Layout(sp=sp), lora_params=LORA)
        # (T - C) / sp past tokens per rank, 128 KiB of bf16 K/V each (32 layers x 2 x 8 heads x 128 x 2 B)
        assert est.device["past K/V"] == (T - C) // sp * 128 * KIB
        # bf16 relay sums: the 63 past chunks' sums in bf16; the compensations of the 31 chunks that get more
        # than 32 additions (kv_store.RELAY_PLAIN_MAX_ADDS) start late (relay_plain_adds): the peak of the
        # schedule (tests/test_memory_model.py relay_schedule_peak: 64 chunks' worth at 64 chunks) / 63
        assert est.device["relayed K/V gradient sums"] == est.device["past K/V"] * 64 // 63
        # q, k, v, out: send + receive, C/sp tokens, (2 x 32 + 2 x 8) heads of 128, bf16
        assert est.device["Ulysses all-to-all buffers (one attention call)"] == 2 * (C // sp) * (64 + 16) * 128 * 2
    # sp = 32 does not divide the 8 K/V heads: they are replicated to the 32 query heads (4x the K/V per token)
    est = parallel_peak(S, T, C, Layout(sp=32), lora_params=LORA)
    assert est.device["past K/V"] == (T - C) // 32 * 128 * KIB * 4
    assert est.device["Ulysses all-to-all buffers (one attention call)"] == 2 * (C // 32) * (64 + 64) * 128 * 2


def test_sharding_divides_the_state_and_counts_the_unsharded_parameters():
    T, C, P = 1 << 16, 8192, S.params
    root = S.vocab * S.hidden * 2 + S.hidden
    layer = (P - root) // 32
    assert layer == 218_112_000  # Llama-3.1-8B's decoder layer: 4 x 4096^2 / ... (attention + MLP + 2 norms)
    step = parallel_peak(S, T, C, Layout(shard=8), grad_bytes=4, optim_bytes=12)
    assert step.device["weights (sharded)"] == P * 2 // 8
    assert step.device["optimizer state"] == P * 12 // 8
    assert step.device["gradients (sharded)"] == P * 4 // 8
    assert step.device["unsharded parameters"] == P * 2
    assert step.device["unsharded gradients"] == P * 4
    lay = parallel_peak(S, T, C, Layout(shard=8, params="layer", grads="chunk", state_offload=True),
                        grad_bytes=4, optim_bytes=12)
    assert lay.device["unsharded parameters"] == (2 * layer + root) * 2
    assert lay.device["unsharded gradients"] == (2 * layer + root) * 4
    assert lay.host == {"weights (sharded)": P * 2 // 8, "optimizer state": P * 12 // 8,
                        "gradients (sharded)": P * 4 // 8}
    assert "optimizer state" not in lay.device


def test_longest_sequence_grows_with_sp_and_with_offload():
    kw = dict(lora_params=LORA, chunk=16384)
    budget, host = 135e9, 250e9
    plain = [longest_parallel_sequence(S, Layout(sp=sp), budget, None, **kw) for sp in (1, 2, 4, 8)]
    assert all(b > a for a, b in zip(plain, plain[1:])), plain
    assert plain[0] == longest_parallel_sequence(S, Layout(), budget, None, **kw)
    off = [longest_parallel_sequence(S, Layout(sp=sp, offload=True), budget, host, **kw) for sp in (1, 2, 4, 8)]
    assert all(o > p for o, p in zip(off, plain)), (off, plain)
    assert all(b > a for a, b in zip(off, off[1:])), off


def test_full_finetune_fits_only_when_sharded_per_layer():
    kw = dict(chunk=16384, grad_bytes=4, optim_bytes=12)
    budget = 135e9
    assert longest_parallel_sequence(S, Layout(), budget, None, **kw) == 0  # 16 B x 8.03e9 > 135 GB
    lay = longest_parallel_sequence(S, Layout(shard=8, params="layer", grads="chunk"), budget, None, **kw)
    step = longest_parallel_sequence(S, Layout(shard=8), budget, None, **kw)
    assert lay > step > 0


@pytest.mark.parametrize("layout, seq, chunk, match", [
    (Layout(sp=3), 3 * 4096, 3 * 1024, "32 query heads cannot be split over sp=3"),
    (Layout(sp=8), 1001, 4096, "multiples of sp=8"),
])
def test_bad_layouts_are_refused(layout, seq, chunk, match):
    with pytest.raises(ValueError, match=match):
        parallel_peak(S, seq, chunk, layout)


@pytest.mark.parametrize("kw, match", [(dict(sp=0), "sp must be a positive integer"),
                                       (dict(shard=True), "shard must be a positive integer"),
                                       (dict(params="chunk"), "params must be one of"),
                                       (dict(grads="layer"), "grads must be one of")])
def test_layout_checks_its_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        Layout(**kw)


def test_predicted_collectives_by_hand():
    tiny = DecoderShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=100,
                        params=50_000)
    fsdp = predicted_collectives(tiny, 512, 128, Layout(shard=2), dtype_bytes=4)
    assert (fsdp["all_gathers"], fsdp["all_gather_bytes"]) == (3, 200_000)
    assert (fsdp["reduce_scatters"], fsdp["reduce_scatter_bytes"], fsdp["all_to_alls"]) == (3, 200_000, 0)
    uly = predicted_collectives(tiny, 512, 128, Layout(sp=2), dtype_bytes=4)
    # 4 chunks: pass 1 on 3, pass 2 forward + backward on 4: 11 passes x 2 layers x 4 all-to-alls
    assert uly["all_to_alls"] == 88
    assert uly["all_to_all_bytes"] == 11 * 2 * (2 * 64 * (4 + 2) * 16 * 4)
    assert (uly["all_reduces"], uly["all_reduce_bytes"]) == (1, 50_000 * 8 + 8)
    four = predicted_collectives(tiny, 512, 128, Layout(sp=4), dtype_bytes=4)  # 2 K/V heads -> 4 (replicated)
    assert four["all_to_all_bytes"] == 11 * 2 * (2 * 32 * (4 + 4) * 16 * 4)
    with pytest.raises(ValueError, match="only FSDPSchedule"):
        predicted_collectives(tiny, 512, 128, Layout(shard=2, params="layer"))


def _count_all_to_all(rank, world):
    import torch.distributed as dist

    from seqwrap.parallel import count_collectives
    from seqwrap.parallel.all_to_all import SeqToHeads

    x = torch.randn(1, 4, 8, 3, dtype=torch.float64)
    with count_collectives() as c:
        SeqToHeads.apply(x, dist.group.WORLD)
    return c.all_to_alls, c.all_to_all_bytes


def test_count_collectives_counts_all_to_all():
    from tests.dist_utils import run_distributed

    assert run_distributed(_count_all_to_all, 2) == [(1, 4 * 8 * 3 * 8)] * 2
