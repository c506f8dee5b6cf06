"""SeqwrapTrainer under accelerate's FSDP2 path (TrainingArguments fsdp_config version 2), 2 gloo ranks on CPU:
same losses and parameters as the stock Trainer with the same configuration; one all-gather per FSDP
group per micro-batch, and the reduce-scatters only where the stock Trainer does them (accelerate's
no_sync during gradient accumulation holds through the chunked step)."""
import os

import pytest
import torch

from .dist_utils import run_distributed

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STEPS, ACCUM = 2, 2


def accelerate_fsdp_on_cpu():
    """accelerate turns FSDP on only for accelerator backends (MULTI_GPU, ...), never for MULTI_CPU; this
    makes the process state read as one so that Trainer + accelerate take their FSDP2 path
    (fsdp2_prepare_model: fully_shard per decoder layer, embeddings, [norm, lm_head], root) on gloo."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def trainer_run(rank, world, seqwrap_trainer, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from torch.distributed.fsdp import FSDPModule
    from transformers import Trainer, TrainingArguments

    from seqwrap.integrations import SeqwrapTrainer
    from seqwrap.parallel import count_collectives

    from .hf_tiny import tiny_model
    from .test_integrations import dataset

    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.float64)
    args = TrainingArguments(output_dir=f"{out_dir}/{rank}", max_steps=STEPS, per_device_train_batch_size=2,
                             gradient_accumulation_steps=ACCUM, learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, fsdp=True,
                             fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    _ = args.device  # sets up the process state
    accelerate_fsdp_on_cpu()
    extra = dict(seqwrap_engine="seco", seqwrap_chunk_size=6) if seqwrap_trainer else {}
    trainer = (SeqwrapTrainer if seqwrap_trainer else Trainer)(model=model, args=args, train_dataset=dataset(),
                                                              **extra)
    with count_collectives() as counts:
        trainer.train()
    fsdp_model = trainer.model
    states = {id(m._get_fsdp_state()) for m in fsdp_model.modules() if isinstance(m, FSDPModule)
              and m._get_fsdp_state()._fsdp_param_groups}
    return dict(losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                is_fsdp2=isinstance(fsdp_model, FSDPModule), groups=len(states), counts=counts,
                params={n: p.detach().full_tensor() for n, p in fsdp_model.named_parameters()})


def test_seqwrap_trainer_under_accelerate_fsdp2(tmp_path):
    from .hf_tiny import tiny_model

    ref = run_distributed(trainer_run, 2, False, str(tmp_path / "ref"))
    got = run_distributed(trainer_run, 2, True, str(tmp_path / "seco"))
    start = dict(tiny_model("llama", dtype=torch.float64).named_parameters())
    for r, g in zip(ref, got):
        assert r["is_fsdp2"] and g["is_fsdp2"], "accelerate must have sharded the model with fully_shard"
        assert len(g["losses"]) == len(r["losses"]) == STEPS
        assert g["losses"] == pytest.approx(r["losses"], rel=1e-6)  # logged values are rounded
        # the stock Trainer's loss upcasts logits with .float(): float32 accuracy for this float64 model
        for n, p in g["params"].items():
            moved = (r["params"][n] - start[n]).norm()
            assert moved > 0, n
            assert (p - r["params"][n]).norm() <= 1e-5 * moved, n
        micro_batches = STEPS * ACCUM
        assert g["counts"].all_gathers == g["groups"] * micro_batches, g["counts"]
        assert g["counts"].all_gathers < r["counts"].all_gathers
        # accelerate's no_sync on the first micro-batch of each step: one reduce-scatter per group per step
        assert g["counts"].reduce_scatters == r["counts"].reduce_scatters == g["groups"] * STEPS, \
            (g["counts"], r["counts"])
