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
  - each of them applied in the causal LM's forward as `self.<projection>(self.<child>(hidden_states))`
    (read from the forward's source): they run before the projection, in that order;
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


def head_prefix(causal_lm: nn.Module, decoder: nn.Module, projection: nn.Module, engine: str) -> list[nn.Module]:
    """Modules the causal LM applies to the decoder's hidden states before its output projection (see the
    module docstring); raises UnsupportedModelError for a head it cannot reproduce."""
    extra = [(name, m) for name, m in causal_lm.named_children()
             if m is not decoder and m is not projection and any(True for _ in m.parameters())]
    if not extra:
        return []
    mtype = getattr(causal_lm.config, "model_type", type(causal_lm).__name__)
    proj = _attribute_of(causal_lm, projection)
    try:
        source = inspect.getsource(type(causal_lm).forward)
    except (OSError, TypeError):
        source = None
    if source is not None:  # modules the forward never names take no part in the loss (full backprop too)
        extra = [(name, m) for name, m in extra if re.search(rf"self\.{re.escape(name)}\b", source)]
        if not extra:
            return []
    source = source or ""
    names = [name for name, _ in extra]
    if proj is not None and len(extra) == 1:
        name = names[0]
        if re.search(rf"self\.{re.escape(proj)}\(\s*self\.{re.escape(name)}\(\s*hidden_states\s*\)\s*\)", source):
            return [extra[0][1]]
    raise UnsupportedModelError(
        f"seqwrap.{engine} does not support model_type '{mtype}': its causal LM holds modules with parameters "
        f"beside the decoder and the output projection ({', '.join(names)}) that the chunked loss would not run, "
        "so they would get no gradient and every other gradient would be wrong")
