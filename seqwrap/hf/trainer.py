"""Hugging Face Trainer whose training step runs a SeCO / SpaCO engine.

Trainer internals used (see compat.py): training_step(model, inputs, num_items_in_batch), prediction_step,
_prepare_inputs, compute_loss_context_manager, current_gradient_accumulation_steps,
args.average_tokens_across_devices, accelerator.num_processes and accelerator.scaler.

    from seqwrap.integrations import SeqwrapTrainer
    trainer = SeqwrapTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                             seqwrap_engine="seco", seqwrap_chunk_size=4096)
    trainer.train()

Everything else is the stock Trainer: TrainingArguments keep their meaning
(gradient accumulation through num_items_in_batch, logging, bf16 autocast,
fp16 loss scaling, DDP with one gradient all-reduce per optimizer step, FSDP2 through accelerate
(`fsdp=True, fsdp_config={"version": 2, ...}`): each FSDP group all-gathered once per micro-batch and
reduce-scattered once per optimizer step, accelerate's no_sync kept; pick another schedule with
seqwrap_options={"fsdp": seqwrap.parallel.FSDPSchedule(...)}), DeepSpeed ZeRO-2/3 through accelerate
(`deepspeed=ds_config`): the training step hands the DeepSpeedEngine accelerate built (the `model` the
Trainer passes, its model_wrapped) to the engine, and calls engine.step() where accelerate's
DeepSpeedEngineWrapper.backward would (the Trainer's optimizer.step() is a no-op under DeepSpeed);
gradient_accumulation_steps must be 1 there (refuse_deepspeed_accumulation), and evaluation runs the
stock prediction_step.
Or mix SeqwrapTrainerMixin into your own Trainer subclass, before Trainer.

Not served: a model patched by seqwrap.parallel.apply_ulysses (alone or with FSDP2) is refused when the
trainer is built and at its first step (`refuse_ulysses`): the Trainer's data loader gives every rank its
own batch, and its num_items_in_batch counts labels over all processes, while the ranks of a Ulysses group
must hold the shards of one sequence (seqwrap.parallel.shard_batch) and count its labels once. Train such
a model with the engine directly (examples/ulysses_fsdp2.py).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer
from transformers.utils import logging

from ..engines import SeCO, SpaCO
from .versions import check_version

logger = logging.get_logger(__name__)
_ENGINES = {"seco": SeCO, "spaco": SpaCO}
_KNOWN_INPUTS = {"input_ids", "labels", "attention_mask"}
# packed rows (DataCollatorWithFlattening, TRL padding_free, seqwrap.data.pack_documents): passed on as they are
_PACKED_INPUTS = {"position_ids", "cu_seqlens", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                  "max_length_k"}
_IGNORED_INPUTS = {"token_type_ids", "num_items_in_batch"}


def refuse_ulysses(model) -> None:
    """Raises NotImplementedError naming what is missing when `model` was patched by apply_ulysses."""
    from .ulysses import ulysses_group

    if not isinstance(model, torch.nn.Module) or ulysses_group(model) is None:
        return
    raise NotImplementedError(
        "seqwrap.SeqwrapTrainer: the model is patched for Ulysses sequence parallelism (apply_ulysses), which the "
        "trainer does not serve yet: its data loader gives every rank its own batch and num_items_in_batch counts "
        "labels over all processes, while the ranks of a Ulysses group must hold the shards of one sequence "
        "(seqwrap.parallel.shard_batch) and count its labels once (accelerate's ParallelismConfig(sp_size=...) "
        "data path is not wired to seqwrap). Train it with the engine directly: "
        "seqwrap.SeCO(model, chunk_size)(**seqwrap.parallel.shard_batch(batch, group, chunk_size=chunk_size)), "
        "as examples/ulysses_fsdp2.py does; or remove_ulysses(model) and train with FSDP2 alone")


def refuse_deepspeed_accumulation(model, accumulation_steps: int) -> None:
    """Raises ValueError when `model` is a DeepSpeedEngine and the Trainer accumulates gradients over several
    micro-batches: DeepSpeed's coalesced reduction (engine.coalesce_grad_reduction, which the chunked step
    runs in) covers one engine call per optimizer step, its flush overwrites what an earlier one reduced."""
    from ..parallel.deepspeed import is_deepspeed_engine

    if accumulation_steps > 1 and is_deepspeed_engine(model):
        raise ValueError(
            f"seqwrap.SeqwrapTrainer: gradient_accumulation_steps={accumulation_steps} is not supported under "
            "accelerate's DeepSpeed plugin: the chunked step runs in DeepSpeed's coalesced gradient reduction, "
            "which covers one micro-batch per optimizer step; set gradient_accumulation_steps=1 and raise "
            "per_device_train_batch_size instead (the engine takes every row of the batch in one step)")


class SeqwrapTrainerMixin:
    """training_step = one chunked forward + backward (the engine) instead of compute_loss + backward.

    seqwrap_engine: "seco" (exact) or "spaco" (sparse, unbiased); seqwrap_chunk_size: tokens per chunk;
    seqwrap_options: extra engine options (e.g. {"rate": 0.125, "seed": 0} for SpaCO).
    """

    def __init__(self, *args, seqwrap_engine: str = "seco", seqwrap_chunk_size: int = 2048,
                 seqwrap_options: dict | None = None, **kwargs):
        if seqwrap_engine not in _ENGINES:
            raise ValueError(f"seqwrap: seqwrap_engine must be one of {sorted(_ENGINES)}, not {seqwrap_engine!r}")
        self.seqwrap_engine = seqwrap_engine
        self.seqwrap_chunk_size = seqwrap_chunk_size
        self.seqwrap_options = dict(seqwrap_options or {})
        self._seqwrap_engines: dict[int, SeCO] = {}
        check_version("transformers", "seqwrap.integrations.SeqwrapTrainer")
        refuse_ulysses(kwargs.get("model", args[0] if args else None))
        super().__init__(*args, **kwargs)

    def _seqwrap_engine_for(self, model: torch.nn.Module) -> SeCO:
        engine = self._seqwrap_engines.get(id(model))
        if engine is None or (engine.model is not model and getattr(engine._deepspeed, "engine", None) is not model):
            refuse_ulysses(model)
            refuse_deepspeed_accumulation(model, self.args.gradient_accumulation_steps)
            engine = _ENGINES[self.seqwrap_engine](model, self.seqwrap_chunk_size, **self.seqwrap_options)
            self._seqwrap_engines[id(model)] = engine
        return engine

    def _seqwrap_train_mode(self, model: torch.nn.Module) -> None:
        """What Trainer.training_step does first: the model (and a schedule-free optimizer) in train mode."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()

    def _seqwrap_grad_scale(self, scale: float) -> float:
        """The factor on the gradients of a loss scaled by `scale`: with fp16 it also carries the loss scale,
        as backward() of the scaled loss would."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return scale * float(scaler.get_scale())
        return scale

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        self._seqwrap_train_mode(model)
        inputs = self._prepare_inputs(inputs)
        args, packed = self._seqwrap_engine_inputs(inputs)
        # Same scaling as Trainer.compute_loss + training_step: a loss normalised by the global
        # label count is multiplied by the number of processes (DDP averages); otherwise each
        # micro-batch's mean loss is divided by the accumulation steps.
        scale = 1.0
        if num_items_in_batch is None:
            scale /= self.current_gradient_accumulation_steps
        elif self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            scale *= self.accelerator.num_processes
        grad_scale = self._seqwrap_grad_scale(scale)
        engine = self._seqwrap_engine_for(model)
        with self.compute_loss_context_manager():  # bf16/fp16 autocast
            out = engine(**args, num_items=num_items_in_batch, loss_scale=grad_scale, **packed)
        if engine._deepspeed is not None and self.accelerator.sync_gradients:
            # what accelerate's DeepSpeedEngineWrapper.backward does after engine.backward at the boundary
            # (the Trainer's optimizer.step() is accelerate's no-op under DeepSpeed): DeepSpeed's step
            engine._deepspeed.engine.step()
        self._seqwrap_after_step(inputs, out)
        return (out.loss * scale).detach().to(self.args.device)

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation: the loss of each batch from the engine's forward-only path (chunk by chunk, no full-length
        logits), when only the loss is asked for. Logits for metrics (prediction_loss_only=False) need the full
        forward: the stock prediction_step runs for that call, as does an FSDP2 model's (no forward-only path)."""
        engine = self._seqwrap_engine_for(model)
        stock = None
        if not prediction_loss_only:
            stock = "the evaluation asks for logits (compute_metrics / prediction_loss_only=False)"
        elif engine._fsdp is not None:
            stock = "the model is FSDP2-sharded"
        elif engine._deepspeed is not None:
            stock = "the model is a DeepSpeed engine"
        if stock is not None:
            if not getattr(self, "_seqwrap_said_stock_eval", False):
                logger.warning("seqwrap: %s: evaluation runs the stock full-sequence forward", stock)
                self._seqwrap_said_stock_eval = True
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        args, packed = self._seqwrap_engine_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            out = engine.evaluate(**args, **packed)
        return out.loss.detach().to(self.args.device), None, None

    def _seqwrap_engine_inputs(self, inputs: dict[str, Any]) -> tuple[dict, dict]:
        """(input_ids / labels / attention_mask, the packed-row keys) of a batch; other keys refused."""
        unknown = sorted(k for k in inputs if k not in _KNOWN_INPUTS | _IGNORED_INPUTS | _PACKED_INPUTS)
        if unknown:
            raise ValueError(f"seqwrap: the chunked training step takes input_ids, labels, attention_mask and the "
                             f"packed-row keys {sorted(_PACKED_INPUTS)}; the batch also has {unknown}")
        packed = {k: inputs[k] for k in _PACKED_INPUTS if inputs.get(k) is not None}
        return {"input_ids": inputs["input_ids"], "labels": inputs.get("labels"),
                "attention_mask": inputs.get("attention_mask")}, packed

    def _seqwrap_after_step(self, inputs: dict[str, Any], out) -> None:
        """Called after each engine step with its inputs and StepResult (SeqwrapSFTTrainer logs metrics)."""


class SeqwrapTrainer(SeqwrapTrainerMixin, Trainer):
    """transformers.Trainer with a SeCO / SpaCO training step (see SeqwrapTrainerMixin)."""
