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
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..ops.cross_entropy import linear_cross_entropy

# The positional parameters every supported family's forward takes, in order.
FORWARD_PARAMS = (
    "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
    "labels", "use_cache", "logits_to_keep",
)


def _slice_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """hidden (B, T, H) -> the rows HF would project (transformers' slice_logits_to_keep)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # older transformers: int or 1-D index only
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def causal_lm_loss(hidden, lm_head, labels, *, softcap=None, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **_unused):
    """ForCausalLMLoss(lm_head(hidden) [softcapped], labels) without the logits.

    hidden (B, T, H) (or (N, H) after a boolean logits_to_keep); labels shaped like
    hidden[..., 0] (before the shift). lm_head: an nn.Linear (V, H)."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]  # token t predicts label t+1; the last one is ignored
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = shift_labels.reshape(-1).to(h.device)  # (N,)
    weight, bias = lm_head.weight, lm_head.bias  # (V, H), (V,) or None
    dev = h.device.type
    if torch.is_autocast_enabled(dev):  # what autocast would do to lm_head(hidden)
        dt = torch.get_autocast_dtype(dev)
        h, weight = h.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    reduction = "sum" if num_items_in_batch is not None else "mean"
    with torch.autocast(dev, enabled=False):
        loss = linear_cross_entropy(h, weight, y, bias, ignore_index=ignore_index, reduction=reduction,
                                    softcap=softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _why_not_fused(model) -> str | None:
    """None when the fused loss reproduces this model's forward; else the reason it does not."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if not isinstance(model.lm_head, torch.nn.Linear):
        return f"lm_head is a {type(model.lm_head).__name__} (e.g. a LoRA adapter on lm_head), not an nn.Linear"
    if model.loss_function is not ForCausalLMLoss:
        return "the model's loss_function is not transformers' ForCausalLMLoss"
    return None


def mst_causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                          inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """Bound to a *ForCausalLM instance by apply_minisequence. Without labels (inference,
    generation) it is the original forward, unchanged."""
    state = self._seqwrap_mst
    original = state["forward"] or type(self).forward.__get__(self)
    reason = None if labels is None else _why_not_fused(self)
    if labels is None or reason is not None:
        if reason is not None and not state.get("warned"):
            state["warned"] = True
            warnings.warn(f"seqwrap.apply_minisequence: computing full logits for the loss because {reason}",
                          stacklevel=2)
        return original(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels,
                        use_cache, logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    hidden = _slice_to_keep(outputs.last_hidden_state, logits_to_keep)  # (B, T, H)
    softcap = getattr(self.config, state["softcap_attr"]) if state["softcap_attr"] else None
    loss = causal_lm_loss(hidden, self.lm_head, labels, softcap=softcap, **kwargs)
    out = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()
