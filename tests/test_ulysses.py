"""Ulysses sequence parallelism on 2 and 4 gloo processes equals single-process training (float64)."""
import functools

import pytest
import torch
import torch.distributed as dist

from .dist_utils import run_distributed

transformers = pytest.importorskip("transformers")


def tiny_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":  # sliding-window attention
        cfg = transformers.MistralConfig(**common, sliding_window=5)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "qwen2_mqa":  # one K/V head: replicated over the ranks
        cfg = transformers.Qwen2Config(**{**common, "num_key_value_heads": 1})
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.set_attn_implementation("sdpa")
    return model.double()


def batch(seq=24, b=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (b, seq), generator=g)
    labels = ids.clone()
    labels[0, 3:6] = -100
    return {"input_ids": ids, "labels": labels}


def single_process(kind):
    model = tiny_model(kind)
    out = model(**batch())
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def full_backprop_f64(kind):
    """Full backprop with the loss formed in float64 (HF's own loss upcasts logits to float32)."""
    model = tiny_model(kind)
    data = batch()
    logits = model(data["input_ids"]).logits
    shift = torch.nn.functional.pad(data["labels"][:, 1:], (0, 1), value=-100)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift.flatten(), reduction="sum") / (shift != -100).sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


CASES = [("llama", None), ("mistral", None), ("qwen2_mqa", 5)]


def ulysses_step(kind, chunk_size):
    import seqwrap.parallel as sp

    model = tiny_model(kind)
    sp.apply_ulysses(model, chunk_size=chunk_size)
    shard = sp.shard_batch(batch(), None)
    loss = model(**shard).loss
    loss.backward()
    sp.allreduce_gradients(model)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def engine_step(kind, world, engine="seco", offload=False, single=False):
    """SeCO / SpaCO over a Ulysses-patched model on this rank's interleaved shard (single=True: the same
    engine in one process over the whole sequence, the reference)."""
    import seqwrap
    import seqwrap.parallel as sp

    chunk = 20 if world == 4 else 10  # chunks of 20+4 / 10+10+4 tokens: the last one shorter
    model = tiny_model(kind)
    kw = dict(rate=0.5, seed=3) if engine == "spaco" else {}
    cls = seqwrap.SpaCO if engine == "spaco" else seqwrap.SeCO
    if single:
        out = cls(model, chunk_size=chunk, **kw)(**batch())
    else:
        sp.apply_ulysses(model)
        out = cls(model, chunk_size=chunk, offload=offload, offload_min_bytes=0, **kw)(
            **sp.shard_batch(batch(), None, chunk_size=chunk))
    return out.loss.item(), out.backward_chunks, {n: p.grad.clone() for n, p in model.named_parameters()}


ENGINE_CASES = [("llama", "seco", False), ("mistral", "seco", True), ("qwen2_mqa", "seco", False),
                ("llama", "spaco", False)]


def bad_calls():
    import seqwrap.parallel as sp

    errors = []
    model = tiny_model("llama")
    for call in (lambda: sp.shard_batch({"input_ids": torch.zeros(1, 7, dtype=torch.long)}),
                 lambda: sp.shard_batch({"input_ids": torch.zeros(1, 8, dtype=torch.long),
                                         "attention_mask": torch.tensor([[1] * 7 + [0]])}),
                 lambda: sp.apply_ulysses(model, chunk_size=0),
                 lambda: sp.shard_batch({"input_ids": torch.zeros(1, 8, dtype=torch.long)}, chunk_size=3)):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def worker(rank, world):
    """Everything a rank does, in one spawn per world size (starting processes is the slow part)."""
    return {"steps": {kind: ulysses_step(kind, chunk) for kind, chunk in CASES}, "errors": bad_calls(),
            "engines": [engine_step(kind, world, engine, offload) for kind, engine, offload in ENGINE_CASES]}


@functools.lru_cache(maxsize=None)
def distributed_results(world):
    return run_distributed(worker, world)


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world):
    results = distributed_results(world)
    for kind, _ in CASES:
        ref_loss, ref_grads = single_process(kind)
        for rank, res in enumerate(results):
            loss, grads = res["steps"][kind]
            # HF computes the loss from float32-upcast logits, so the loss carries float32 rounding
            assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (kind, rank, loss, ref_loss)
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"{kind} rank {rank} {name}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_seco_and_spaco_over_ulysses(world):
    """Each rank chunks its interleaved shard; every rank ends with the whole sequence's loss and
    gradients: those of full backprop (SeCO) or of the same SpaCO draw in one process."""
    results = distributed_results(world)
    for n, (kind, engine, offload) in enumerate(ENGINE_CASES):
        if engine == "seco":
            ref_loss, ref_grads = full_backprop_f64(kind)
            ref_chunks = None
        else:
            ref_loss, ref_chunks, ref_grads = engine_step(kind, world, engine, single=True)
            assert 0 < ref_chunks < 3  # the draw skips a chunk: a real sparse step
        for rank, res in enumerate(results):
            loss, chunks, grads = res["engines"][n]
            assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss), (kind, engine, rank, loss, ref_loss)
            if ref_chunks is not None:
                assert chunks == ref_chunks
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"{kind} {engine} rank {rank} {name}: {m}")


def test_bad_inputs():
    errors = distributed_results(2)[0]["errors"]
    assert "not a multiple of the 2 ranks" in errors[0]
    assert "padded batches are not supported" in errors[1]
    assert "chunk_size must be a positive int" in errors[2]
    assert "chunk_size must be a positive multiple of the 2 ranks" in errors[3]


def test_requires_distributed():
    import seqwrap.parallel as sp

    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        sp.apply_ulysses(tiny_model("llama"))
