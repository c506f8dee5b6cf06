"""The model's whole LM head: what runs between the decoder's last hidden states and the logits.

The chunked engines form each chunk's loss from the decoder's hidden states and the output projection
(`get_output_embeddings()`). Most causal LMs have nothing else there; some run more modules first
(ModernBERT-decoder: `logits = self.decoder(self.lm_head(hidden_states))`, where `lm_head` is dense ->
activation -> norm and `decoder` the projection). A parameter of the causal LM that is neither in the
decoder nor in the projection would get no gradient from a chunked step while full backprop reaches it,
and every other gradient would be wrong. So, at wrap time:

  - the causal LM's direct children other than the decoder and the projection that hold parameters and
    that its forward uses (`self.<child>` in its source) are listed;
  - none: the head is the projection;
  - one applied in the causal LM's forward as `self.<projection>(self.<child>(x))` (read from the forward's
    source): it runs before the projection (ModernBERT-decoder, Electra);
  - the projection inside a child applied as `self.<child>(x)` (BERT-style `cls`: transform, then the
    projection): the chunk loss runs that child whole, unfused;
  - anything else: refused, naming the modules.
"""
from __future__ import annotations

import inspect
import re

from torch import nn

from .compat import UnsupportedModelError


def _attribute_of(parent: nn.Module, child: nn.Module) -> str | None:
    for name, module in parent.named_children():
        if module is child:
            return name
    return None


def _names_in_forward(causal_lm: nn.Module) -> str | None:
    try:
        return inspect.getsource(type(causal_lm).forward)
    except (OSError, TypeError):
        return None


def resolve_head(causal_lm: nn.Module, decoder: nn.Module, projection: nn.Module,
                 engine: str) -> tuple[list[nn.Module], nn.Module]:
    """(prefix, logits_module): the chunk loss computes logits as logits_module(prefix[-1](...prefix[0](h))).

    - the projection is a child of the causal LM: prefix = the modules applied before it (none, or one
      applied as `self.<projection>(self.<module>(x))`), logits_module = the projection;
    - the projection sits inside another child (BERT's `cls.predictions.decoder`, after its `transform`):
      prefix = [], logits_module = that child, run whole (`self.<child>(x)` in the forward).
    Anything else is refused (UnsupportedModelError naming the modules)."""
    extra = [(name, m) for name, m in causal_lm.named_children()
             if m is not decoder and m is not projection and any(True for _ in m.parameters())]
    source = _names_in_forward(causal_lm)
    if source is not None:  # modules the forward never names take no part in the loss (full backprop too)
        extra = [(name, m) for name, m in extra if re.search(rf"self\.{re.escape(name)}\b", source)]
    if not extra:
        return [], projection
    source = source or ""
    mtype = getattr(causal_lm.config, "model_type", type(causal_lm).__name__)
    names = [name for name, _ in extra]
    proj = _attribute_of(causal_lm, projection)
    if len(extra) == 1:
        name, module = extra[0]
        call = rf"self\.{re.escape(name)}\(\s*\w+\s*\)"
        if proj is not None and re.search(rf"self\.{re.escape(proj)}\(\s*{call}\s*\)", source):
            return [module], projection
        if proj is None and any(m is projection for m in module.modules()) and re.search(call, source):
            return [], module
    raise UnsupportedModelError(
        f"seqwrap.{engine} does not support model_type '{mtype}': its causal LM holds modules with parameters "
        f"beside the decoder and the output projection ({', '.join(names)}) that the chunked loss would not run, "
        "so they would get no gradient and every other gradient would be wrong")
