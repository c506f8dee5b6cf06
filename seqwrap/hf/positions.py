"""Every chunk gets the rotary embedding the whole sequence gets: computed once per step, sliced per chunk.

HF's rotary modules (`*RotaryEmbedding`, called as rotary(x, position_ids, [layer_type]) and returning
(cos, sin), each (B or 1, L, rotary_dim)) may decide per call what they compute: LongRoPE picks its long
or short factors from max(position_ids) + 1 of the call, dynamic NTK rescales its frequencies to the
call's length (`dynamic_rope_update`). A chunk sees only its own positions, so the same module called
chunk by chunk can compute something else than it does for the whole sequence (LongRoPE: the short
factors for early chunks, the long ones in full backprop).

`whole_sequence_rotary(model, store, positions)` patches, for the duration of a step, the forward of
every rotary module of the model (the instance, restored afterwards): the first call with a given
set of extra arguments (layer_type, ...) runs the module's own forward once over the whole
sequence's positions (B or 1, T) under no_grad, exactly the call full backprop makes, and keeps
(cos, sin); every call of a chunk then gets their slice [start, start + L) of the current chunk
(`store.query_offset`). Each call checks, before anything else runs, that the positions it is given
are that slice of the whole sequence's positions: a chunk whose positional input is not the slice
is refused (run-time invariant).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .compat import UnsupportedModelError

# rope types whose output depends on the whole call, not only on each position
DYNAMIC_ROPE_TYPES = ("longrope", "dynamic")


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The model's rotary-embedding modules (HF names them *RotaryEmbedding)."""
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]


def rope_types(model: nn.Module) -> set[str]:
    """rope_type of every rotary module (a dict per layer type for models with several)."""
    out: set[str] = set()
    for m in rotary_modules(model):
        kind = getattr(m, "rope_type", None)
        if isinstance(kind, dict):
            out.update(str(v) for v in kind.values())
        elif kind is not None:
            out.add(str(kind))
    return out


def has_dynamic_rope(model: nn.Module) -> bool:
    return any(t.startswith(DYNAMIC_ROPE_TYPES) for t in rope_types(model))


class _WholeSequence:
    """The patched forward of one rotary module for one step."""

    def __init__(self, module: nn.Module, store, positions: torch.Tensor, engine: str):
        self.module = module
        self.original = module.forward          # bound method of the class (or an earlier instance patch)
        self.had_instance_forward = "forward" in module.__dict__
        self.store = store
        self.positions = positions               # (B or 1, T) the whole (local) sequence's positions
        self.engine = engine
        self.full: dict = {}                     # extra-args key -> tuple of (B or 1, T, d) outputs

    def __call__(self, x, position_ids=None, *args, **kwargs):
        if position_ids is None:
            raise UnsupportedModelError(f"seqwrap.{self.engine}: {type(self.module).__name__} was called without "
                                        "position_ids; the chunked step cannot tell which positions it embeds")
        start = self.store.query_offset
        length = position_ids.shape[-1]
        expected = self.positions[..., start:start + length].to(position_ids.device)
        try:
            same = expected.shape[-1] == length and torch.equal(*torch.broadcast_tensors(position_ids, expected))
        except RuntimeError:  # shapes that do not broadcast
            same = False
        if not same:
            raise UnsupportedModelError(
                f"seqwrap.{self.engine}: chunk at {start} called {type(self.module).__name__} with positions that "
                f"are not the slice [{start}, {start + length}) of the whole sequence's positions; the chunked "
                "step cannot give it the embedding full backprop would")
        key = (tuple(repr(a) for a in args), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        full = self.full.get(key)
        if full is None:
            with torch.no_grad():
                out = self.original(x, self.positions.to(position_ids.device), *args, **kwargs)
            full = out if isinstance(out, tuple) else (out,)
            total = self.positions.shape[-1]
            for t in full:
                if not torch.is_tensor(t) or t.dim() < 2 or t.shape[-2] != total:
                    raise UnsupportedModelError(
                        f"seqwrap.{self.engine}: {type(self.module).__name__} returned "
                        f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__} for {total} positions; "
                        "expected per-position tensors (..., positions, dim) that a chunk can slice")
            self.full[key] = full
        sliced = tuple(t[..., start:start + length, :] for t in full)
        return sliced if len(sliced) > 1 else sliced[0]

    def restore(self) -> None:
        if self.had_instance_forward:
            self.module.forward = self.original
        else:
            self.module.__dict__.pop("forward", None)


@contextmanager
def whole_sequence_rotary(model: nn.Module, store, positions: torch.Tensor, engine: str):
    """Within the block every rotary module of `model` returns the slice of the whole sequence's embedding
    (see the module docstring). positions: (B or 1, T) int64, the (local) sequence's positions."""
    patches = []
    for m in rotary_modules(model):
        if any(p.requires_grad for p in m.parameters()):
            raise UnsupportedModelError(f"seqwrap.{engine}: {type(m).__name__} has trainable parameters; the "
                                        "chunked step computes rotary embeddings once per step without grad")
        patch = _WholeSequence(m, store, positions, engine)
        m.forward = patch  # an instance attribute: nn.Module.__call__ calls it
        patches.append(patch)
    try:
        yield patches
    finally:
        for patch in patches:
            patch.restore()
