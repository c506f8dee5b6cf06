"""SeqwrapTrainer under accelerate's DeepSpeed plugin (TrainingArguments(deepspeed=config)), 2 gloo ranks on CPU,
ZeRO-2 and ZeRO-3: the same losses and parameters as the stock Trainer with the same configuration (the
training step hands the DeepSpeedEngine that accelerate built to SeCO, then runs engine.step() where
accelerate's backward would). gradient_accumulation_steps > 1 is refused by name.

One spawned 2-rank job per trainer kind runs every case (process start and `import deepspeed` cost seconds)."""
import faulthandler
import os

import pytest
import torch

from .dist_utils import run_distributed
from .test_deepspeed_zero import _deepspeed_on_cpu

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed", reason="DeepSpeed does not import here: the ZeRO tests need it")

STEPS = 2
STAGES = (2, 3)


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": "auto", "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def train(rank, out_dir, seqwrap_trainer, stage, accum=1):
    import deepspeed
    from transformers import Trainer, TrainingArguments

    from seqwrap.integrations import SeqwrapTrainer

    from .hf_tiny import tiny_model
    from .test_integrations import dataset

    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.float64)
    args = TrainingArguments(output_dir=f"{out_dir}/{stage}/{rank}", max_steps=STEPS, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accum, learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, optim="sgd",
                             deepspeed=ds_config(stage))
    extra = dict(seqwrap_engine="seco", seqwrap_chunk_size=6) if seqwrap_trainer else {}
    trainer = (SeqwrapTrainer if seqwrap_trainer else Trainer)(model=model, args=args, train_dataset=dataset(),
                                                              **extra)
    trainer.train()
    engine = trainer.model_wrapped
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        final = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    built = getattr(trainer, "_seqwrap_engines", {}).values()  # the SeCO engines the trainer built
    return dict(losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                engine=type(engine).__name__, params=final,
                seco=[e._deepspeed is not None and e._deepspeed.engine is engine for e in built])


def job(rank, world, out_dir, seqwrap_trainer):
    faulthandler.dump_traceback_later(200, exit=True)
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        _deepspeed_on_cpu(rank, world)
        out = {stage: train(rank, out_dir, seqwrap_trainer, stage) for stage in STAGES}
        if seqwrap_trainer:
            try:
                train(rank, out_dir + "/accum", True, 2, accum=2)
                out["accum"] = None
            except ValueError as e:
                out["accum"] = str(e)
        return out
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds_trainer")
    ref = run_distributed(job, 2, str(tmp / "ref"), False, timeout_s=30)
    got = run_distributed(job, 2, str(tmp / "seco"), True, timeout_s=30)
    return ref, got


@pytest.mark.parametrize("stage", STAGES)
def test_seqwrap_trainer_under_accelerate_deepspeed(runs, stage):
    from .hf_tiny import tiny_model

    ref, got = runs
    start = dict(tiny_model("llama", dtype=torch.float64).named_parameters())
    for r, g in zip(ref, got):
        r, g = r[stage], g[stage]
        assert r["engine"] == g["engine"] == "DeepSpeedEngine"
        assert g["seco"] == [True], g["seco"]   # one SeCO, built on accelerate's engine, kept for every step
        assert len(g["losses"]) == len(r["losses"]) == STEPS
        assert g["losses"] == pytest.approx(r["losses"], rel=1e-6)  # logged values are rounded
        for n, p in g["params"].items():
            moved = (r["params"][n] - start[n]).norm()
            assert moved > 0, n
            # ZeRO's float32 gradient partitions and the stock loss's float32 logits: float32 accuracy
            assert (p - r["params"][n]).norm() <= 1e-5 * moved, n


def test_gradient_accumulation_refused(runs):
    for g in runs[1]:
        assert g["accum"] is not None and "gradient_accumulation_steps=2 is not supported under accelerate's DeepSpeed" in g["accum"], \
            g["accum"]
