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
    model.config._attn_implementation = "sdpa"
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


def bad_calls():
    import seqwrap.parallel as sp

    errors = []
    model = tiny_model("llama")
    for call in (lambda: sp.shard_batch({"input_ids": torch.zeros(1, 7, dtype=torch.long)}),
                 lambda: sp.shard_batch({"input_ids": torch.zeros(1, 8, dtype=torch.long),
                                         "attention_mask": torch.tensor([[1] * 7 + [0]])}),
                 lambda: sp.apply_ulysses(model, chunk_size=0)):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def worker(rank, world):
    """Everything a rank does, in one spawn per world size (starting processes is the slow part)."""
    return {"steps": {kind: ulysses_step(kind, chunk) for kind, chunk in CASES}, "errors": bad_calls()}


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


def test_bad_inputs():
    errors = distributed_results(2)[0]["errors"]
    assert "not a multiple of the 2 ranks" in errors[0]
    assert "padded batches are not supported" in errors[1]
    assert "chunk_size must be a positive int" in errors[2]


def test_requires_distributed():
    import seqwrap.parallel as sp

    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        sp.apply_ulysses(tiny_model("llama"))
