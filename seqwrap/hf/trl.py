"""TRL: an SFTTrainer whose training step runs a SeCO / SpaCO engine (tested with trl 1.16.0).

    from seqwrap.integrations import SeqwrapSFTTrainer
    trainer = SeqwrapSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok,
                                peft_config=LoraConfig(...), seqwrap_engine="seco", seqwrap_chunk_size=4096)
    trainer.train()

Everything SFTTrainer does before the step stays (dataset preparation and tokenisation, chat
templates, completion_only_loss / assistant_only_loss labels, peft_config -> PeftModel, the
collator, logging); the step is SeqwrapTrainerMixin's: one chunked forward + backward with the
loss of SFT's loss_type="nll" (the sum of the token losses of the labels it built, divided by
num_items_in_batch, times the number of processes with average_tokens_across_devices).

padding_free=True and packing (packing_strategy "bfd" / "bfd_split", which TRL runs padding-free, or
"wrapped"): TRL's collator hands one packed row per batch (position_ids restarting per document,
cu_seq_lens_q/k, seq_idx, labels -100 at each document's first token, no attention mask); the engine
keeps the documents apart (engines/packing.py) and computes the loss stock SFTTrainer computes.

Refused at construction, with the reason (the engine would compute another loss, or cannot take
the batch):
  loss_type="dft", label_smoothing_factor > 0, a compute_loss_func, a MoE router aux loss:
      losses the chunked step does not form;
  activation_offloading: use seqwrap_options={"offload": True} (the engine's own host offload).
The token-accuracy and entropy metrics need the logits, which the chunked step never builds: they
are not logged; num_tokens is.

TRL internals used: SFTTrainer.padding_free, aux_loss_enabled, compute_loss_func, _metrics and
_total_train_tokens (the num_tokens metric), SFTConfig.loss_type / activation_offloading.
"""
from __future__ import annotations

from trl import SFTTrainer

from .trainer import SeqwrapTrainerMixin

_NAME = "seqwrap.integrations.SeqwrapSFTTrainer"


class SeqwrapSFTTrainer(SeqwrapTrainerMixin, SFTTrainer):
    """trl.SFTTrainer with a SeCO / SpaCO training step (see SeqwrapTrainerMixin for the seqwrap_* options)."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if config is not None:  # before SFTTrainer prepares the dataset (and before it fails on its own)
            self._seqwrap_refuse_config(config, kwargs.get("compute_loss_func"))
        super().__init__(*args, **kwargs)
        self._seqwrap_refuse_config(self.args, self.compute_loss_func)
        if self.aux_loss_enabled:
            raise NotImplementedError(f"{_NAME}: the MoE router aux loss (output_router_logits) is not supported")

    @staticmethod
    def _seqwrap_refuse_config(args, compute_loss_func) -> None:
        if args.loss_type != "nll":
            raise NotImplementedError(f"{_NAME}: loss_type={args.loss_type!r} is not supported; the chunked step forms "
                                      "the 'nll' loss")
        if args.label_smoothing_factor > 0:
            raise NotImplementedError(f"{_NAME}: label_smoothing_factor={args.label_smoothing_factor} is not supported")
        if compute_loss_func is not None:
            raise NotImplementedError(f"{_NAME}: a compute_loss_func needs the full logits, which the chunked step "
                                      "never builds")
        if args.activation_offloading:
            raise NotImplementedError(f"{_NAME}: activation_offloading is not supported; use "
                                      "seqwrap_options={'offload': True} (the engine parks K/V and activations on the "
                                      "host itself)")

    def _seqwrap_after_step(self, inputs, out) -> None:
        """SFT's num_tokens metric (tokens seen by all processes, as SFTTrainer.compute_loss counts them)."""
        mask = inputs.get("attention_mask")
        local = mask.sum() if mask is not None else inputs["input_ids"].new_tensor(inputs["input_ids"].numel())
        self._total_train_tokens += int(self.accelerator.gather_for_metrics(local).sum().item())
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
