"""apply_minisequence / remove_minisequence: MsT (Luo et al. 2024) for Hugging Face decoder LMs.

    seqwrap.apply_minisequence(model)          # in place; also accepts a peft or DDP wrapper
    loss = model(input_ids, labels=labels).loss  # .logits is None: no (tokens, V) logits
    seqwrap.remove_minisequence(model)         # original forwards back, exactly

Patches, as instance attributes (the classes are untouched):
  - every decoder layer's `mlp.forward`: when grad is enabled and something needs a
    gradient, the MLP runs over mini-sequences with recomputation (mst_mlp.py);
    under torch.no_grad it is the original forward, so inference is unchanged.
  - the *ForCausalLM `forward` (loss=True): with labels, the LM head and loss go
    through seqwrap.linear_cross_entropy and the returned logits are None
    (mst_lm.py); without labels it is the original forward.

mlp_chunks=None picks the number of mini-sequences per call from memory
(mst_mlp.auto_mlp_chunks): the bytes one mini-sequence holds at the peak of its
backward (from the config's intermediate and hidden sizes, the MLP's kind and the
input's dtype) against a target, by default the bytes of the call's hidden states
(at least 256 tokens per mini-sequence), or mlp_memory= bytes when given; the plain
forward when that is 1. An int forces that many (at most the sequence length) at
every length.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch.utils.checkpoint import checkpoint

from ..parallel.deepspeed import unheld_zero3
from .compat import output_cache_field
from .mst_lm import forward_signature, mst_causal_lm_forward, named_parameters
from .mst_mlp import MiniSequenceMLP, auto_mlp_chunks, chunk_bounds
from .versions import check_model_versions

# model_type -> config attribute holding the final-logit softcap (None: no softcap).
FAMILIES = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "phi3": None,
    "gemma2": "final_logit_softcapping",
}


def _unwrap(model):
    """DDP / FSDP wrapper -> module; peft PeftModel -> the transformers model inside."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return model


@contextlib.contextmanager
def _swapped_parameters(module, swap):
    """Temporarily replace parameters: swap maps a tuple of names (all the names of one
    parameter inside `module`) to the tensor to use instead."""
    saved = []
    try:
        for names, tensor in swap.items():
            for name in names:
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                saved.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = tensor
        yield
    finally:
        for owner, leaf, param in reversed(saved):
            owner._parameters[leaf] = param


def _trainable(module):
    """The parameters of `module` that require grad, each with all its names: ([p], [(names)])."""
    by_id: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            by_id.setdefault(id(p), (p, []))[1].append(name)
    return [p for p, _ in by_id.values()], [tuple(n) for _, n in by_id.values()]


def mlp_kind(mlp) -> str:
    """Which mst_mlp.INTERMEDIATES_AT_PEAK entry describes this decoder MLP."""
    if hasattr(mlp, "gate_up_proj"):
        return "fused_gated"
    if hasattr(mlp, "gate_proj"):
        return "gated"
    return "plain"


def _activation_bytes(x) -> int:
    """Bytes per element of the MLP's intermediates: the autocast dtype when autocast is on, else x's."""
    dt = x.device.type
    if torch.is_autocast_enabled(dt):
        return torch.empty((), dtype=torch.get_autocast_dtype(dt)).element_size()
    return x.element_size()


def _original(module):
    saved = module._seqwrap_mst["forward"]
    return saved if saved is not None else type(module).forward.__get__(module)


def mst_mlp_forward(self, x, *args, **kwargs):
    """Bound to each decoder MLP. x (B, L, H) -> (B, L, H)."""
    state = self._seqwrap_mst
    original = _original(self)
    if args or kwargs or not torch.is_grad_enabled() or x.dim() < 2 or x.shape[-2] == 0:
        return original(x, *args, **kwargs)
    params, names = _trainable(self)
    if not params and not x.requires_grad:
        return original(x)
    chunks = state["chunks"]
    if chunks is None:
        chunks = auto_mlp_chunks(x.numel() // x.shape[-1], state["hidden_size"], state["intermediate_size"],
                                 dtype_bytes=_activation_bytes(x), kind=state["kind"], target_bytes=state["memory"])
        if chunks <= 1:
            return original(x)

    bounds = chunk_bounds(x.shape[-2], chunks)
    if torch.compiler.is_compiling() or unheld_zero3(self.parameters()):
        # torch.compile cannot trace MiniSequenceMLP's backward (it recomputes with swapped parameter
        # aliases); the same schedule through torch.utils.checkpoint, which it traces: each slice keeps
        # only its input, and its (l, I) intermediates exist again one slice at a time in backward.
        # DeepSpeed ZeRO-3's own forward/backward: the aliases would bypass its module hooks, which fetch
        # a partitioned parameter only for a call of its module; the checkpointed calls go through them.
        return torch.cat([checkpoint(original, x[..., s:e, :], use_reentrant=False) for s, e in bounds], dim=-2)

    def run(xs, swap):  # xs (B, l, H) -> (B, l, H); swap: {names: alias} or None
        if not swap:
            return original(xs)
        with _swapped_parameters(self, swap):
            return original(xs)

    return MiniSequenceMLP.apply(x, run, bounds, names, *params)


def _patch(module, function, **state):
    """module.forward = function bound to module. With state["signature"], the bound forward shows that
    signature (the class forward's): callers that read it (the Trainer keeps only the dataset
    columns the forward names) see the same parameters as without the patch."""
    state["forward"] = module.__dict__.get("forward")  # an instance-level forward someone set, or None
    module._seqwrap_mst = state
    bound = types.MethodType(function, module)
    if state.get("signature") is not None:
        bound = functools.wraps(bound, assigned=("__doc__",))(functools.partial(bound))
        bound.__signature__ = state["signature"]
    module.forward = bound


def _unpatch(module):
    saved = module.__dict__.pop("_seqwrap_mst")["forward"]
    if saved is None:
        del module.__dict__["forward"]
    else:
        module.forward = saved


def apply_minisequence(model, *, mlp_chunks: int | None = None, mlp_memory: int | None = None, loss: bool = True):
    """Patch a Hugging Face decoder LM in place for mini-sequence training; returns `model`.

    model: a Llama / Mistral / Qwen2 / Qwen3 / Gemma2 / Phi3 *ForCausalLM, possibly
    inside a peft PeftModel or DDP. mlp_chunks: mini-sequences per MLP call (None: auto).
    mlp_memory: bytes one MLP mini-sequence may hold (None: the call's hidden-state bytes); only
    with mlp_chunks=None.
    loss: fuse the LM head and loss when labels are given (logits are then None).
    Applying again replaces the previous settings."""
    lm = _unwrap(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"seqwrap.apply_minisequence: model type {model_type!r} ({type(lm).__name__}) is not supported; "
            f"supported model types: {', '.join(sorted(FAMILIES))}"
        )
    if mlp_chunks is not None and (isinstance(mlp_chunks, bool) or not isinstance(mlp_chunks, int) or mlp_chunks < 1):
        raise ValueError(f"seqwrap.apply_minisequence: mlp_chunks must be a positive int or None, got {mlp_chunks!r}")
    if mlp_memory is not None:
        if isinstance(mlp_memory, bool) or not isinstance(mlp_memory, int) or mlp_memory < 1:
            raise ValueError(f"seqwrap.apply_minisequence: mlp_memory must be a positive int (bytes) or None, "
                             f"got {mlp_memory!r}")
        if mlp_chunks is not None:
            raise ValueError("seqwrap.apply_minisequence: give mlp_chunks or mlp_memory, not both "
                             f"(got mlp_chunks={mlp_chunks}, mlp_memory={mlp_memory})")
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None or not isinstance(getattr(lm, "lm_head", None), torch.nn.Module):
        raise TypeError(
            f"seqwrap.apply_minisequence: expected a {model_type} *ForCausalLM (with .model.layers and .lm_head), "
            f"got {type(lm).__name__}"
        )
    signature = forward_signature(lm) if loss else None
    check_model_versions(lm, "seqwrap.apply_minisequence")
    mlps = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise TypeError(f"seqwrap.apply_minisequence: layer {i} ({type(layer).__name__}) has no .mlp")
        mlps.append(mlp)
    remove_minisequence(lm)
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    try:  # all or nothing: a failure part way leaves the model as it was
        for mlp in mlps:
            _patch(mlp, mst_mlp_forward, chunks=mlp_chunks, hidden_size=hidden, intermediate_size=inter,
                   kind=mlp_kind(mlp), memory=mlp_memory)
        if loss:
            _patch(lm, mst_causal_lm_forward, softcap_attr=FAMILIES[model_type], signature=signature,
                   param_names=named_parameters(signature), cache_field=output_cache_field())
    except BaseException:
        remove_minisequence(lm)
        raise
    lm._seqwrap_mst_applied = True
    return model


def remove_minisequence(model):
    """Undo apply_minisequence: every patched forward gets back exactly what it was. Returns `model`."""
    lm = _unwrap(model)
    for module in lm.modules():
        if "_seqwrap_mst" in module.__dict__:
            _unpatch(module)
    lm.__dict__.pop("_seqwrap_mst_applied", None)
    return model


def is_minisequence_applied(model) -> bool:
    return bool(_unwrap(model).__dict__.get("_seqwrap_mst_applied"))
