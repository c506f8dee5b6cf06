"""The causal-LM forward with the LM head and loss fused (MsT): no (tokens, V) logits in training.

Mirrors, for Llama / Mistral / Qwen2 / Qwen3 / Gemma2 / Phi3 in transformers 5.x,

    hidden = slice_logits_to_keep(model(...).last_hidden_state, logits_to_keep)
    logits = lm_head(hidden)                      # Gemma2: softcap * tanh(logits / softcap)
    loss   = ForCausalLMLoss(logits, labels, V, **kwargs)

with `seqwrap.linear_cross_entropy` in place of the last two lines when labels are
given. The loss follows transformers/loss/loss_utils.py ForCausalLMLoss: labels
shifted by one (padded with ignore_index at the end) unless `shift_labels` is
passed; reduction "mean" over non-ignored labels, or "sum" / num_items_in_batch
when num_items_in_batch is given. Differences, all on purpose: the returned
logits are None; the loss keeps the float64 dtype of a float64 model (HF casts
logits to float32 first); with every label ignored the loss is 0 (HF: nan).

Packed rows (position_ids restarting per document, or cu_seq_lens_q / seq_idx / cu_seqlens in the
kwargs, as DataCollatorWithFlattening gives them): the call is made one in which HF's own attention
keeps the documents apart (hf/packing.py: no cache, no mask, restarting positions) or refused, and
the fused loss ignores the target of every document's last token.
"""
from __future__ import annotations

import inspect
import warnings

import torch

from ..labels import shift_labels as shift
from ..ops.cross_entropy import linear_cross_entropy
from ..parallel.deepspeed import unheld_zero3
from .compat import causal_lm_loss_function, causal_lm_output, slice_to_keep
from .packing import prepare_call as prepare_packed_call

def causal_lm_loss(hidden, lm_head, labels, *, softcap=None, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, documents=None, **_unused):
    """ForCausalLMLoss(lm_head(hidden) [softcapped], labels) without the logits.

    hidden (B, T, H) (or (N, H) after a boolean logits_to_keep); labels shaped like
    hidden[..., 0] (before the shift). lm_head: an nn.Linear (V, H).
    documents: the Documents of packed rows (hf/packing.py) or None: the target of a document's
    last token (the next document's first token) is ignored."""
    if shift_labels is None:
        shift_labels = shift(labels, ignore_index)  # token t predicts label t+1; the last one is ignored
    if documents is not None:
        shift_labels = shift_labels.masked_fill(documents.ends().to(shift_labels.device), ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = shift_labels.reshape(-1).to(h.device)  # (N,)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    # under autocast, linear_cross_entropy casts as autocast would cast lm_head(hidden)
    loss = linear_cross_entropy(h, lm_head.weight, y, lm_head.bias, ignore_index=ignore_index, reduction=reduction,
                                softcap=softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss



def _why_not_fused(model) -> str | None:
    """None when the fused loss reproduces this model's forward; else the reason it does not."""
    if not isinstance(model.lm_head, torch.nn.Linear):
        return f"lm_head is a {type(model.lm_head).__name__} (e.g. a LoRA adapter on lm_head), not an nn.Linear"
    if model.loss_function is not causal_lm_loss_function():
        return "the model's loss_function is not transformers' ForCausalLMLoss"
    if unheld_zero3(model.lm_head.parameters()):
        return ("lm_head's weight is partitioned by DeepSpeed ZeRO-3, whose hooks gather it only for a call of "
                "lm_head (inside seqwrap.SeCO(engine) the step holds it gathered)")
    return None


def forward_signature(lm) -> inspect.Signature:
    """The signature of type(lm).forward without self; raises TypeError if it lacks what the fused
    forward needs (labels, logits_to_keep and **kwargs)."""
    sig = inspect.signature(type(lm).forward)
    params = list(sig.parameters.values())[1:]
    names = {p.name for p in params}
    missing = [n for n in ("labels", "logits_to_keep") if n not in names]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        missing.append("**kwargs")
    if missing:
        raise TypeError(f"seqwrap.apply_minisequence: {type(lm).__name__}.forward takes {[p.name for p in params]}; "
                        f"the fused loss needs labels, logits_to_keep and **kwargs (missing: {missing})")
    return sig.replace(parameters=params)


def named_parameters(sig: inspect.Signature) -> list[str]:
    """The names the forward takes positionally or by keyword, in order (not its **kwargs)."""
    return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _bind(names: list[str], args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """(named arguments, the rest of kwargs), as binding to a forward(names..., **kwargs) would
    (plain code, so torch.compile traces it)."""
    if len(args) > len(names):
        raise TypeError(f"forward takes {len(names)} positional arguments but {len(args)} were given")
    named = dict(zip(names, args))
    extra = {}
    for k, v in kwargs.items():
        if k in names:
            if k in named:
                raise TypeError(f"forward got multiple values for argument {k!r}")
            named[k] = v
        else:
            extra[k] = v
    return named, extra


def mst_causal_lm_forward(self, *args, **kwargs):
    """Bound to a *ForCausalLM instance by apply_minisequence. Arguments are those of the class's
    forward, bound by name (whatever their order, or the name of the cache argument). Without
    labels (inference, generation) it is the original forward, unchanged."""
    state = self._seqwrap_mst
    original = state["forward"] or type(self).forward.__get__(self)
    named, extra = _bind(state["param_names"], args, kwargs)  # extra: the **kwargs HF hands to decoder and loss
    labels = named.pop("labels", None)
    reason = None if labels is None else _why_not_fused(self)
    if labels is None or reason is not None:
        if reason is not None and not state.get("warned"):
            state["warned"] = True
            warnings.warn(f"seqwrap.apply_minisequence: computing full logits for the loss because {reason}",
                          stacklevel=2)
        return original(*args, **kwargs)
    documents = prepare_packed_call(named, extra, "seqwrap.apply_minisequence")
    logits_to_keep = named.pop("logits_to_keep", 0)
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    outputs = self.model(**named, **extra)
    hidden = slice_to_keep(outputs.last_hidden_state, logits_to_keep)  # (B, T, H)
    softcap = getattr(self.config, state["softcap_attr"]) if state["softcap_attr"] else None
    loss = causal_lm_loss(hidden, self.lm_head, labels, softcap=softcap, documents=documents, **extra)
    field = state["cache_field"]
    out = causal_lm_output(field, loss=loss, logits=None, cache=getattr(outputs, field, None),
                           hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()
