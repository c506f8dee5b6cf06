"""TRL: a DPOTrainer whose training step is one exact chunked SeCO step (tested with trl 1.16.0).

    from seqwrap.integrations import SeqwrapDPOTrainer
    trainer = SeqwrapDPOTrainer(model=model, args=DPOConfig(...), train_dataset=pairs, processing_class=tok,
                                peft_config=LoraConfig(...), seqwrap_chunk_size=4096)
    trainer.train()

Everything DPOTrainer does before the step stays: dataset preparation (prompt extraction, EOS, tokenisation), the
preference collator (one batch of 2B rows: the B chosen sequences, then the B rejected ones, with a completion_mask
that leaves the prompt tokens out), peft_config -> PeftModel, the reference (ref_model; with peft and no ref_model
the same model with its adapter disabled, or its frozen "ref" adapter; precompute_ref_log_probs), and logging.

Every loss type of DPOTrainer is a function of the four per-sequence sums of completion-token log-probabilities
(policy and reference, chosen and rejected), and of the completion lengths, which the batch holds:
  sigmoid (default), hinge, ipo and sigmoid_norm (divided by the completion lengths), exo_pair, nca_pair,
  robust, bco_pair, sppo_hard, aot / aot_unpaired (sorted over the batch), apo_zero, apo_down, discopop,
  sft (the mean completion-token NLL of the chosen rows: minus their summed log-probs over their token count),
  any weighted mix (loss_weights), with f_divergence_type reverse_kl, forward_kl or js_divergence.
So the step is SeCO(..., objective=fn) (seqwrap/engines/objective.py): the reference sums are computed chunked
without grad (the engine's sequence_logps, on ref_model or on the policy with its adapter swapped as TRL does),
the policy sums S in pass 1, c = dL/dS, then pass 2. fn is TRL's own DPOTrainer._compute_loss, run on a stand-in
model whose per-token log-probs hold each row's sum at its first completion position (zeros elsewhere): TRL
forms the loss, its rewards/* and logps/* metrics and num_tokens from the sums exactly as from real per-token
log-probs. Its entropy, logits/* and mean_token_accuracy metrics need the logits, which the chunked step never
builds: they are not logged. Precomputed reference log-probs (and the reference of each step) come from the
chunked pass too (compute_ref_log_probs is overridden).

Refused at construction, with the reason: use_weighting (WPO needs per-token probabilities), ld_alpha (LD-DPO
splits each completion by token position), f_divergence_type="alpha_divergence" (TRL clamps by a dtype table
without float64, the dtype of the sums), a MoE router aux loss, activation_offloading, vision datasets,
seqwrap_engine="spaco". Evaluation (prediction_step) with prediction_loss_only runs the chunked forward; with
logits it runs the stock full forward.

TRL internals used (pinned in tests/test_hf_compat.py, listed in compat.py): DPOTrainer._compute_loss(model,
inputs, return_outputs) calling model(..., labels=labels, fused_lm_head=True) and reading .log_probs (summed
per row), .entropy, .mean_logits, .is_top1, inputs["ref_chosen_logps"/"ref_rejected_logps"] when
self.precompute_ref_logps, inputs["completion_mask"] / ["attention_mask"], self._metrics and
_total_train_tokens; DPOTrainer.compute_ref_log_probs(model, inputs) -> (chosen, rejected); DPOTrainer's
ref_model, loss_types, use_weighting, ld_alpha, f_divergence_type, aux_loss_enabled, _is_vision_dataset,
loss_is_scaled_for_ga (False: the loss is divided by the accumulation steps); trl.trainer.utils.use_adapter.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.trainer.utils import use_adapter

from .trainer import SeqwrapTrainerMixin

_NAME = "seqwrap.integrations.SeqwrapDPOTrainer"
# metrics DPOTrainer computes from per-token logits: not formed by the chunked step
_LOGIT_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
_BATCH_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class _SumsOnly:
    """Stand-in for the policy in DPOTrainer._compute_loss: its 'per-token' log-probs (2B, T-1) hold each row's
    sum S[b] at the row's first completion position and zeros elsewhere (row sums and completion means are
    those of the real per-token log-probs); the logit metrics' fields are zeros."""

    def __init__(self, S: torch.Tensor, shift_completion_mask: torch.Tensor):
        counted = shift_completion_mask.bool()  # (2B, T-1)
        first = counted.int().argmax(dim=1, keepdim=True)  # (2B, 1); a row without completion has S = 0
        zeros = torch.zeros(counted.shape, dtype=S.dtype, device=S.device)
        self.outputs = SimpleNamespace(log_probs=zeros.scatter(1, first, S.unsqueeze(1)), entropy=zeros.detach(),
                                       mean_logits=zeros.detach(), is_top1=torch.zeros_like(counted),
                                       log_sum_sq_probs=None, aux_loss=None)

    def __call__(self, *args, **kwargs):
        return self.outputs


class SeqwrapDPOTrainer(SeqwrapTrainerMixin, DPOTrainer):
    """trl.DPOTrainer with an exact chunked (SeCO) training step; seqwrap_chunk_size / seqwrap_options as in
    SeqwrapTrainerMixin."""

    def __init__(self, *args, seqwrap_engine: str = "seco", **kwargs):
        if seqwrap_engine != "seco":
            raise NotImplementedError(f"{_NAME}: seqwrap_engine={seqwrap_engine!r} is not supported; the DPO step "
                                      "needs every chunk's gradient (SeCO) to be exact")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # before DPOTrainer prepares the dataset
            self._seqwrap_refuse_config(config)
        super().__init__(*args, seqwrap_engine=seqwrap_engine, **kwargs)
        self._seqwrap_refuse_config(self.args)
        if self.aux_loss_enabled:
            raise NotImplementedError(f"{_NAME}: the MoE router aux loss (output_router_logits) is not supported: "
                                      "the chunked DPO step forms the DPO loss of the sequence sums only")
        if self._is_vision_dataset:
            raise NotImplementedError(f"{_NAME}: vision datasets are not supported")

    @staticmethod
    def _seqwrap_refuse_config(args) -> None:
        if args.use_weighting:
            raise NotImplementedError(f"{_NAME}: use_weighting=True (WPO) is not supported: its weights need each "
                                      "token's sum of squared probabilities, which the chunked step does not form")
        if args.ld_alpha is not None:
            raise NotImplementedError(f"{_NAME}: ld_alpha={args.ld_alpha} (LD-DPO) is not supported: it weighs each "
                                      "completion token by its position relative to the other completion's length")
        if args.f_divergence_type == "alpha_divergence":
            raise NotImplementedError(f"{_NAME}: f_divergence_type='alpha_divergence' is not supported: TRL clamps "
                                      "it with a table of float16/bfloat16/float32 limits, and the chunked sums are "
                                      "float64")
        if args.activation_offloading:
            raise NotImplementedError(f"{_NAME}: activation_offloading is not supported; use "
                                      "seqwrap_options={'offload': True} (the engine parks K/V and activations on the "
                                      "host itself)")

    # -- the reference --------------------------------------------------------------
    def compute_ref_log_probs(self, model, inputs):
        """(ref chosen, ref rejected) summed completion log-probs (B,) each, float64, chunk by chunk without grad;
        the reference as DPOTrainer picks it: `model` (ref_model, or the policy before training), with peft and no
        ref_model the policy with its "ref" adapter or with adapters disabled."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), adapter_context, self.accelerator.autocast():
            S = self._seqwrap_engine_for(model).sequence_logps(inputs["input_ids"], labels,
                                                               attention_mask=inputs["attention_mask"])
        return S.chunk(2, dim=0)

    def _seqwrap_reference(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, inputs)

    # -- the objective -----------------------------------------------------------------
    def _seqwrap_objective(self, inputs, ref_chosen, ref_rejected, record: dict):
        """fn(S) -> DPOTrainer's loss of the policy sums S (2B,) = [chosen ; rejected] with these reference sums.
        Its metrics go to record (the last call's), not to self._metrics (a retried chunk pass calls fn again)."""
        batch = {k: v for k, v in inputs.items() if k in _BATCH_KEYS}
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen, ref_rejected
        shift_completion_mask = inputs["completion_mask"][:, 1:]

        def fn(S: torch.Tensor) -> torch.Tensor:
            metrics, tokens, precompute = self._metrics, self._total_train_tokens, self.precompute_ref_logps
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
            self.precompute_ref_logps = True  # the reference sums come from `batch`
            try:
                loss = DPOTrainer._compute_loss(self, _SumsOnly(S, shift_completion_mask), batch, return_outputs=False)
                record["metrics"], record["tokens"] = self._metrics, self._total_train_tokens
            finally:
                self._metrics, self._total_train_tokens, self.precompute_ref_logps = metrics, tokens, precompute
            return loss

        return fn

    def _seqwrap_keep_metrics(self, record: dict) -> None:
        """Appends the metrics of the step's last objective call (num_tokens is a running total: replaced)."""
        for mode, values in record["metrics"].items():
            for key, v in values.items():
                if key == "num_tokens":
                    self._metrics[mode][key] = v
                elif key not in _LOGIT_METRICS:
                    self._metrics[mode][key].extend(v)
        self._total_train_tokens = record["tokens"]

    def _seqwrap_batch(self, inputs) -> dict:
        unknown = sorted(set(inputs) - _BATCH_KEYS)
        if unknown:
            raise ValueError(f"{_NAME}: the chunked DPO step takes {sorted(_BATCH_KEYS)}; the batch also has {unknown}")
        return inputs

    # -- the step ------------------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        self._seqwrap_train_mode(model)
        inputs = self._seqwrap_batch(self._prepare_inputs(inputs))
        # DPOTrainer.loss_is_scaled_for_ga is False: Trainer divides its loss by the accumulation steps
        scale = 1.0 / self.current_gradient_accumulation_steps
        grad_scale = self._seqwrap_grad_scale(scale)
        engine = self._seqwrap_engine_for(model)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        record: dict = {}
        with self.compute_loss_context_manager():
            ref_chosen, ref_rejected = self._seqwrap_reference(inputs)
            fn = self._seqwrap_objective(inputs, ref_chosen, ref_rejected, record)
            out = engine(inputs["input_ids"], labels=labels, attention_mask=inputs["attention_mask"], objective=fn,
                         loss_scale=grad_scale)
        self._seqwrap_keep_metrics(record)
        return (out.loss * scale).detach().to(self.args.device)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss of each evaluation batch chunk by chunk (policy and reference sums without grad, then TRL's
        loss of them); with logits asked for (prediction_loss_only=False), the stock full forward."""
        if not prediction_loss_only:
            return DPOTrainer.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._seqwrap_batch(self._prepare_inputs(inputs))
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        record: dict = {}
        with torch.no_grad(), self.compute_loss_context_manager():
            ref_chosen, ref_rejected = self._seqwrap_reference(inputs)
            S = self._seqwrap_engine_for(model).sequence_logps(inputs["input_ids"], labels,
                                                               attention_mask=inputs["attention_mask"])
            loss = self._seqwrap_objective(inputs, ref_chosen, ref_rejected, record)(S)
        self._seqwrap_keep_metrics(record)
        return loss.detach().to(self.args.device), None, None
