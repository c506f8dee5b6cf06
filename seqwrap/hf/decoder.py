"""Adapter for Hugging Face decoder-only causal LMs driven through the Cache API.

Finds, behind any wrappers (DistributedDataParallel, peft's PeftModel), the
causal LM itself, its decoder stack (`base_model`: LlamaModel, GPTNeoXModel...),
its output projection and the per-layer attention kinds (full or sliding
window), and refuses clearly what the chunked engines cannot drive.
"""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import attention, hybrid, hybrid_cache, mamba1_mixer, mamba2_mixer
from .cache import ChunkCache
from .checkpointing import CheckpointWithCache
from .compat import NOT_CAUSAL_BEFORE, REFUSED, ModelCompat, UnsupportedModelError, resolve
from .head import resolve_head
from .positions import rotary_modules, whole_sequence_rotary
from .ulysses import split_recurrent_layers, ulysses_group
from .versions import check_model_versions, installed, parse_version


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(inner module, the DDP wrapper or None)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model
    return model, None


def refuse_sharded(model: nn.Module, engine: str) -> None:
    """FSDP1 (FullyShardedDataParallel) flattens the parameters behind its own forward: refused.
    FSDP2 (`fully_shard`) models are driven by seqwrap.parallel.fsdp (the engine's `fsdp` option)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    for m in model.modules():
        if isinstance(m, FullyShardedDataParallel):
            raise NotImplementedError(
                f"seqwrap.{engine} does not support FSDP1 (FullyShardedDataParallel) models: shard with FSDP2 "
                "(torch.distributed.fsdp.fully_shard on each decoder layer, then on the model), use "
                "DistributedDataParallel, or a single device."
            )


@dataclass
class HFDecoderAdapter:
    """The parts of a HF causal LM a chunked engine needs.

    causal_lm: the *ForCausalLM module (LoRA layers, if any, are injected in it)
    decoder:   its base model; decoder(input_ids, attention_mask, <cache>, use_cache) returns
               last_hidden_state (B, L, hidden), after the final norm
    lm_head:   the output projection (hidden -> vocab)
    compat:    what this transformers version calls things for this model (compat.ModelCompat)
    """

    causal_lm: nn.Module
    decoder: nn.Module
    lm_head: nn.Module
    compat: ModelCompat

    @classmethod
    def from_model(cls, model: nn.Module, engine: str = "SeCO") -> "HFDecoderAdapter":
        inner, _ = unwrap_ddp(model)
        refuse_sharded(inner, engine)
        check_model_versions(inner, f"seqwrap.{engine}")
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
        if decoder is inner:  # base_model_prefix names no child (Llama4ForCausalLM: 'language_model', held as .model)
            child = inner._modules.get("model")
            decoder = child if child is not None and hasattr(child, "config") else decoder
        if lm_head is None or decoder is None or decoder is inner:
            raise UnsupportedModelError(
                f"seqwrap.{engine}: model_type '{mtype}' ({type(inner).__name__}) has no separate decoder "
                "and output projection; only *ForCausalLM models are supported"
            )
        return cls(inner, decoder, lm_head, resolve(inner, decoder, engine))

    def check_structure(self, engine: str) -> None:
        """Refuses, at wrap time, layouts a chunked step would get wrong: attention that is not causal (BERT-style
        models with is_decoder=False), a model with no layer that goes through the HF cache, and the families
        compat.REFUSED lists with their reason."""
        mtype = self.model_type
        floor = NOT_CAUSAL_BEFORE.get((mtype, self.config._attn_implementation))
        if floor is not None and parse_version(installed("transformers") or "0") < parse_version(floor[0]):
            raise UnsupportedModelError(f"seqwrap.{engine} does not support model_type '{mtype}' with this "
                                        f"transformers ({installed('transformers')}): {floor[1]}")
        if mtype in REFUSED:
            raise UnsupportedModelError(f"seqwrap.{engine} does not support model_type '{mtype}': {REFUSED[mtype]}")
        both_ways = sorted({type(m).__name__ for m in self.causal_lm.modules()
                            if isinstance(getattr(m, "layer_idx", None), int) and getattr(m, "is_causal", None) is False})
        if both_ways:
            raise UnsupportedModelError(
                f"seqwrap.{engine} does not support model_type '{mtype}' as configured: its attention ({', '.join(both_ways)}) "
                "is not causal (for BERT-style models set is_decoder=True), so a chunk would need keys after it")
        if self.num_attention_layers == 0 and not self.recurrent_layers:
            raise UnsupportedModelError(
                f"seqwrap.{engine} does not support model_type '{mtype}': none of its layers keeps keys/values or a "
                "recurrent state through the HF Cache API, so nothing would carry one chunk into the next")

    def check_head(self, engine: str) -> None:
        """Resolves the model's whole LM head (head.py): head_prefix, the modules run on the decoder's hidden
        states first, and loss_head, the module that then gives the logits (the projection, or a module
        holding it)."""
        self.head_prefix, self.loss_head = resolve_head(self.causal_lm, self.decoder, self.lm_head, engine)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, hidden) -> what loss_head takes: the head's modules before it applied."""
        for module in getattr(self, "head_prefix", ()):
            hidden = module(hidden)
        return hidden

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def model_type(self) -> str:
        return _model_type(self.causal_lm)

    @property
    def layer_kinds(self) -> list[str]:
        """Per decoder layer, "full_attention" or "sliding_attention"."""
        return list(self.compat.layer_kinds)

    @property
    def sliding_window(self) -> int | None:
        return self.compat.sliding_window

    @property
    def num_layers(self) -> int:
        return len(self.compat.layer_kinds)

    # -- hybrid / SSM models (seqwrap/hf/hybrid.py) ------------------------------------------
    @property
    def recurrent_layers(self) -> list[int]:
        """Indices of the layers that carry a recurrent state (Mamba-2 mixers, linear attention)."""
        return [i for i, k in enumerate(self.compat.layer_kinds) if k in hybrid.STATE_KINDS]

    @property
    def num_attention_layers(self) -> int:
        """Layers whose attention keeps K/V in the cache (hybrid layers count: they have both)."""
        return sum(k not in hybrid.STATELESS_KINDS and k != "linear_attention" for k in self.compat.layer_kinds)

    def check_recurrent(self, engine: str, attention: str, chunk_size: int, ulysses: bool) -> None:
        """Refuses what a chunked step cannot do with this model's recurrent layers (none: no check)."""
        if not self.recurrent_layers:
            return
        hybrid.check_model(self.causal_lm, attention, engine)
        if ulysses and split_recurrent_layers(self.causal_lm) != len(self.recurrent_layers):
            raise UnsupportedModelError(
                f"seqwrap.{engine}: Ulysses sequence parallelism is not supported for model_type "
                f"'{self.model_type}': only Mamba-2-family mixers are split over heads (seqwrap/hf/mamba2_ulysses.py); "
                "its other recurrent layers would each see only this rank's part of a chunk")
        if chunk_size < 2:
            raise ValueError(f"seqwrap.{engine}: chunk_size must be >= 2 for model_type '{self.model_type}' (HF's "
                             "recurrent mixers take a single-token path that updates their cached state in place)")

    @property
    def logit_transforms(self) -> tuple[float | None, float | None]:
        """(multiplier or None, softcap or None) of the model's head: Cohere's `logit_scale`, Granite's
        `logits_scaling`, Gemma2's `final_logit_softcapping` (config fields)."""
        config = self.config
        mult = None
        scale = getattr(config, "logit_scale", None)
        if isinstance(scale, (int, float)) and str(getattr(config, "model_type", "")).startswith("cohere"):
            mult = float(scale)
        scaling = getattr(config, "logits_scaling", None)
        if isinstance(scaling, (int, float)) and scaling != 1:
            mult = (mult or 1.0) / float(scaling)
        return mult, getattr(config, "final_logit_softcapping", None)

    @property
    def max_positions(self) -> int | None:
        """The longest input the model takes: max_position_embeddings for models with learned absolute
        positions; None (no limit, as for HF's own forward) for rotary models, whose embedding is computed
        for any position (dynamic NTK and LongRoPE rescale past it; positions.py keeps that exact)."""
        if rotary_modules(self.causal_lm):
            return None
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
        return ulysses_group(self.causal_lm)

    def checkpointing(self, name: str) -> CheckpointWithCache:
        """Context for a step: checkpointed decoder layers keep the chunk cache."""
        return CheckpointWithCache(self.decoder_layers(), name)

    @contextmanager
    def step_context(self, name: str, store=None, positions: torch.Tensor | None = None, chunked: bool = False):
        """Context for a chunked step over `store` (its ChunkKVStore / hybrid store):
          - checkpointing(): checkpointed decoder layers keep the chunk cache;
          - seqwrap's forward on the recurrent mixers that need one: Mamba-1 (mamba1_mixer.py: HF's ignores
            the cached SSM state in multi-token calls) and Mamba-2 (mamba2_mixer.py: HF's torch SSD keeps
            (chunk x chunk) tensors per head for backward);
          - positions.whole_sequence_rotary: every chunk gets its slice of the rotary embedding of the whole
            sequence (positions (B or 1, T); None: 0..T-1), checked per call;
          - chunked: attention through seqwrap's registry entry, the store bound to the attention modules
            (attention.bound_store: it reaches them whatever the decoder layers forward)."""
        if positions is None and store is not None:
            total = store.bounds[-1][1]
            positions = torch.arange(total, device=self.lm_head.weight.device)[None]
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.checkpointing(name))
            stack.enter_context(mamba1_mixer.patched(self.causal_lm))
            stack.enter_context(mamba2_mixer.patched(self.causal_lm))
            if store is not None:
                stack.enter_context(whole_sequence_rotary(self.causal_lm, store, positions, name))
            if chunked:
                stack.enter_context(attention.chunked_attention(self.causal_lm))
                stack.enter_context(attention.bound_store(self.causal_lm, store))
            yield

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, store,
               position_ids: torch.Tensor | None = None, router_logits: bool = False):
        """Last hidden states (B, L, hidden) of one chunk, its past held by `store` (a ChunkKVStore), inside
        step_context(). With router_logits: (hidden, the decoder's router_logits, one tensor per MoE layer)."""
        recurrent = self.recurrent_layers
        cache = hybrid_cache.HybridChunkCache(store) if recurrent else ChunkCache(store)
        kwargs = {self.compat.cache_arg: cache, "use_cache": True}
        if position_ids is None and recurrent and self.num_attention_layers:
            # some hybrid decoders (Bamba) default to positions 0..L-1 whatever the cache holds
            start = store.query_offset
            position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if router_logits:
            kwargs["output_router_logits"] = True
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if router_logits:
            return out.last_hidden_state, getattr(out, "router_logits", None)
        return out.last_hidden_state
