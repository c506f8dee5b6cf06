"""Adapter for Hugging Face decoder-only causal LMs driven through the Cache API.

Finds, behind any wrappers (DistributedDataParallel, peft's PeftModel), the
causal LM itself, its decoder stack (`base_model`: LlamaModel, GPTNeoXModel...),
its output projection and the per-layer attention kinds (full or sliding
window), and refuses clearly what the chunked engines cannot drive.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Layer kinds whose attention reads K/V through `past_key_values.update`.
_ATTENTION_KINDS = {"full_attention", "sliding_attention"}


class UnsupportedModelError(NotImplementedError):
    """The model cannot be trained chunk-wise through the HF Cache API."""


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(inner module, the DDP wrapper or None)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model
    return model, None


def refuse_sharded(model: nn.Module, engine: str) -> None:
    """FSDP (1 or 2) reshards parameters around each forward/backward; not supported."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    for m in model.modules():
        if isinstance(m, (FSDPModule, FullyShardedDataParallel)):
            raise NotImplementedError(
                f"seqwrap.{engine} does not support FSDP / FSDP2 (`fully_shard`) models yet: the chunk-wise "
                "backward would all-gather and reduce-scatter the parameters once per chunk. Use "
                "DistributedDataParallel (gradients are reduced once per step) or a single device."
            )


@dataclass
class HFDecoderAdapter:
    """The parts of a HF causal LM a chunked engine needs.

    causal_lm: the *ForCausalLM module (LoRA layers, if any, are injected in it)
    decoder:   its base model; decoder(input_ids, attention_mask, past_key_values, use_cache)
               returns last_hidden_state (B, L, hidden), after the final norm
    lm_head:   the output projection (hidden -> vocab)
    layer_kinds: per decoder layer, "full_attention" or "sliding_attention"
    sliding_window: the window of the sliding layers (None if there are none)
    """

    causal_lm: nn.Module
    decoder: nn.Module
    lm_head: nn.Module
    layer_kinds: list[str]
    sliding_window: int | None

    @classmethod
    def from_model(cls, model: nn.Module, engine: str = "SeCO") -> "HFDecoderAdapter":
        inner, _ = unwrap_ddp(model)
        refuse_sharded(inner, engine)
        if hasattr(inner, "get_base_model") and callable(inner.get_base_model):  # peft.PeftModel
            inner = inner.get_base_model()
        config = getattr(inner, "config", None)
        mtype = _model_type(inner)
        if config is None or not hasattr(inner, "get_output_embeddings"):
            raise UnsupportedModelError(
                f"seqwrap.{engine} needs a Hugging Face causal LM (a PreTrainedModel such as LlamaForCausalLM); "
                f"got {type(inner).__name__} (model_type '{mtype}')"
            )
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"seqwrap.{engine} supports decoder-only causal LMs; model_type '{mtype}' is an encoder-decoder"
            )
        lm_head = inner.get_output_embeddings()
        decoder = getattr(inner, "base_model", None)
        if lm_head is None or decoder is None or decoder is inner:
            raise UnsupportedModelError(
                f"seqwrap.{engine}: model_type '{mtype}' ({type(inner).__name__}) has no separate decoder "
                "and output projection; only *ForCausalLM models are supported"
            )
        kinds, window = _layer_kinds(config, mtype, engine)
        return cls(inner, decoder, lm_head, kinds, window)

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def model_type(self) -> str:
        return _model_type(self.causal_lm)

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def max_positions(self) -> int | None:
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder's layer modules (for gradient checkpointing set-up), if it lists them."""
        for name in ("layers", "h", "blocks"):
            layers = getattr(self.decoder, name, None)
            if isinstance(layers, nn.ModuleList):
                return list(layers)
        return []

    def ulysses_group(self):
        """The process group of seqwrap.parallel.apply_ulysses, if the model was patched, else None."""
        for m in self.causal_lm.modules():
            state = getattr(m, "_seqwrap_ulysses", None)
            if state is not None:
                return state[0]
        return None

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, L, hidden) of one chunk, its past held by `cache`."""
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                           **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _layer_kinds(config, mtype: str, engine: str) -> tuple[list[str], int | None]:
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise UnsupportedModelError(f"seqwrap.{engine}: model_type '{mtype}' has no num_hidden_layers in its config")
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        kinds, kwargs = get_layer_types_and_kwargs(config)
    except Exception:  # older/odd configs: treat every layer as full attention
        kinds, kwargs = ["full_attention"] * n, [{}] * n
    kinds = list(kinds)[:n]
    bad = sorted({k for k in kinds if k not in _ATTENTION_KINDS})
    if bad:
        raise UnsupportedModelError(
            f"seqwrap.{engine} does not support model_type '{mtype}': it has layers of type {bad}; only full and "
            "sliding-window attention layers that go through the HF Cache API can be chunked"
        )
    windows = {kw.get("sliding_window") for k, kw in zip(kinds, kwargs) if k == "sliding_attention"}
    windows.discard(None)
    if len(windows) > 1:
        raise UnsupportedModelError(
            f"seqwrap.{engine}: model_type '{mtype}' has sliding layers with different windows {sorted(windows)}"
        )
    window = windows.pop() if windows else None
    if window is None:
        kinds = ["full_attention"] * len(kinds)
    return kinds, window
