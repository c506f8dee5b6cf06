"""SeqwrapTrainer with a Ulysses-patched (and FSDP2-sharded) model: refused with the reason, at construction
and, for a model patched afterwards, at the step's engine; nothing trained (seqwrap/hf/trainer.py)."""
import pytest
import torch

from .dist_utils import run_distributed

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def refusal_worker(rank, world, out_dir):
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainingArguments

    import seqwrap.parallel as sp
    from seqwrap.integrations import SeqwrapTrainer

    from .test_ulysses import tiny_model

    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=out_dir, max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    out = {}
    model = tiny_model("llama")
    sp.apply_ulysses(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        SeqwrapTrainer(model=model, args=args, seqwrap_chunk_size=8)
        out["init"] = None
    except NotImplementedError as e:
        out["init"] = str(e)
    plain = tiny_model("llama")
    trainer = SeqwrapTrainer(model=plain, args=args, seqwrap_chunk_size=8)  # not patched: accepted
    sp.apply_ulysses(plain)  # patched after the trainer was built: refused at the first step's engine
    try:
        trainer._seqwrap_engine_for(plain)
        out["step"] = None
    except NotImplementedError as e:
        out["step"] = str(e)
    out["grads"] = [p.grad for p in plain.parameters() if p.grad is not None]
    return out


def test_seqwrap_trainer_refuses_a_ulysses_model_naming_what_is_missing(tmp_path):
    (r,) = run_distributed(refusal_worker, 1, str(tmp_path), timeout_s=30)
    for where in ("init", "step"):
        assert r[where] is not None, where
        assert "patched for Ulysses sequence parallelism" in r[where]
        assert "shard_batch" in r[where] and "examples/ulysses_fsdp2.py" in r[where]
    assert r["grads"] == []
