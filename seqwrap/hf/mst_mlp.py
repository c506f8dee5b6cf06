"""Mini-sequence MLP (MsT, Luo et al. 2024): a token-wise MLP run over slices of the sequence.

    y = MiniSequenceMLP.apply(x, run, bounds, names, *params)

x is (..., L, H): the MLP input, the sequence on dim -2. `run(x_slice, swap)` runs
the module's original forward on x_slice (..., l, H) -> (..., l, H_out), with the
parameters named in `swap` (name -> tensor) temporarily replaced. `params` are
the module's parameters that require grad (LoRA adapters only, under peft),
passed as explicit inputs so that autograd delivers their gradients itself:
one AccumulateGrad per parameter per step, so DDP / FSDP hooks fire once.

Forward: no grad, slice by slice into one (..., L, H_out) output; only x is saved.
Backward: for each slice, recompute its forward with grad on *detached aliases*
of the parameters (the real parameters, their .grad and their hooks are never
touched), take d/dx_slice and d/dparams with torch.autograd.grad, add the
parameter gradients into local buffers (float32 for half-precision parameters)
and return them once. Only one slice's intermediates exist at a time.

The RNG state (dropout, e.g. LoRA dropout) and the autocast state of the forward
are restored for the recomputation, as torch.utils.checkpoint does.
"""
from __future__ import annotations

import math

import torch

# Auto choice, from memory (not a fixed ratio): one mini-sequence of l tokens holds, at the peak of its
# backward recomputation, about l * bytes_per_token bytes (mlp_shard_bytes_per_token). The shard count is
# the smallest that keeps one shard within a target: by default the bytes of the call's own hidden states
# (tokens * H * dtype bytes), so the MLP's transient never exceeds one more copy of what every layer
# already holds; or an explicit budget (apply_minisequence(mlp_memory=...), e.g. from a planner). With the
# default target, shards keep at least MIN_TOKENS_PER_CHUNK tokens so the matrix products stay efficient.
MIN_TOKENS_PER_CHUNK = 256

# Intermediate (tokens, I) tensors alive at the peak of one shard's backward, by MLP kind:
#   gated (Llama gate_proj/up_proj/down_proj): gate, up, act(gate) saved, then grad of act*up,
#     grad act and grad up formed while they are still alive: 6 x I (act*up itself is freed after
#     the down projection's backward).
#   fused_gated (Phi3 gate_up_proj, a (tokens, 2I) output chunked in two): 2I + act + product saved,
#     then grad product, grad act, grad up and the (tokens, 2I) cat of the two: 8 x I.
#   plain (fc1 -> act -> fc2): fc1 out, act out, grad act, grad fc1 out: 4 x I.
# Plus three (tokens, H) tensors: the shard's input alias, its output and the incoming gradient slice.
INTERMEDIATES_AT_PEAK = {"gated": 6, "fused_gated": 8, "plain": 4}


def mlp_shard_bytes_per_token(hidden_size: int, intermediate_size: int, dtype_bytes: int, kind: str = "gated") -> int:
    """Bytes one token of a mini-sequence holds at the peak of its backward: (n_I * I + 3 * H) * dtype_bytes."""
    if kind not in INTERMEDIATES_AT_PEAK:
        raise ValueError(f"seqwrap: unknown MLP kind {kind!r}; known: {', '.join(INTERMEDIATES_AT_PEAK)}")
    return (INTERMEDIATES_AT_PEAK[kind] * intermediate_size + 3 * hidden_size) * dtype_bytes


def auto_mlp_chunks(tokens: int, hidden_size: int, intermediate_size: int, *, dtype_bytes: int = 4,
                    kind: str = "gated", target_bytes: int | None = None) -> int:
    """Number of mini-sequences for `tokens` tokens (batch x length) through an H -> I -> H MLP.

    shards = ceil(tokens * bytes_per_token / target), target = tokens * H * dtype_bytes (the hidden
    states) unless `target_bytes` is given; with the default target at most tokens // MIN_TOKENS_PER_CHUNK
    shards; always between 1 and `tokens`. 1 means: run the plain forward."""
    if target_bytes is not None and (isinstance(target_bytes, bool) or not isinstance(target_bytes, int)
                                     or target_bytes < 1):
        raise ValueError(f"seqwrap: the MLP memory target must be a positive int (bytes), got {target_bytes!r}")
    if tokens <= 1:
        return 1
    per_token = mlp_shard_bytes_per_token(hidden_size, intermediate_size, dtype_bytes, kind)
    if target_bytes is None:
        target = tokens * max(1, hidden_size) * dtype_bytes
        cap = max(1, tokens // MIN_TOKENS_PER_CHUNK)
    else:
        target, cap = target_bytes, tokens
    shards = -(-tokens * per_token // target)  # ceil
    return max(1, min(shards, cap))


def alst_mlp_shards(seqlen: int, hidden_size: int) -> int:
    """DeepSpeed ALST's TiledMLP rule, for comparison (benchmarks, tests): ceil(seqlen / hidden_size)."""
    return max(1, math.ceil(seqlen / hidden_size))


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """Split [0, length) into min(chunks, length) contiguous slices whose sizes differ
    by at most one; every index is covered (no dropped tail)."""
    k = max(1, min(chunks, length))
    edges = [i * length // k for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def _device_type(x: torch.Tensor) -> str:
    return x.device.type


class _ForwardState:
    """What the recomputation must reproduce: RNG and autocast state at forward time."""

    __slots__ = ("cpu_rng", "dev_rng", "device_type", "autocast", "autocast_dtype", "cpu_autocast", "cpu_dtype")

    def __init__(self, x: torch.Tensor):
        dt = _device_type(x)
        self.device_type = dt
        self.cpu_rng = torch.get_rng_state()
        self.dev_rng = torch.cuda.get_rng_state(x.device) if dt == "cuda" else None
        self.autocast = torch.is_autocast_enabled(dt)
        self.autocast_dtype = torch.get_autocast_dtype(dt)
        self.cpu_autocast = torch.is_autocast_enabled("cpu")
        self.cpu_dtype = torch.get_autocast_dtype("cpu")

    def replay(self, x: torch.Tensor):
        """Context: fork the RNG, set it to the forward's state, re-enter the forward's autocast."""
        import contextlib

        stack = contextlib.ExitStack()
        devices = [x.device] if self.device_type == "cuda" else []
        stack.enter_context(torch.random.fork_rng(devices=devices, device_type="cuda"))
        torch.set_rng_state(self.cpu_rng)
        if self.dev_rng is not None:
            torch.cuda.set_rng_state(self.dev_rng, x.device)
        if self.device_type != "cpu":
            stack.enter_context(torch.autocast(self.device_type, self.autocast_dtype, enabled=self.autocast))
        stack.enter_context(torch.autocast("cpu", self.cpu_dtype, enabled=self.cpu_autocast))
        return stack


class MiniSequenceMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, run, bounds, names, *params):
        # x (..., L, H); bounds: [(start, end)] over L; params[i] is the module's parameter names[i].
        ctx.state = _ForwardState(x)
        out = None
        for s, e in bounds:
            y = run(x[..., s:e, :], None)  # (..., l, H_out)
            if out is None:
                out = y.new_empty(y.shape[:-2] + (x.shape[-2], y.shape[-1]))  # (..., L, H_out)
            out[..., s:e, :] = y
            del y
        ctx.run, ctx.bounds, ctx.names, ctx.params = run, bounds, names, params
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # grad_out (..., L, H_out) -> grad_x (..., L, H) and one gradient per parameter input.
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        slots = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        grad_x = torch.empty_like(x) if need_x else None
        acc: list = [None] * len(ctx.params)  # summed parameter gradients
        owned = [False] * len(ctx.params)  # acc[i] is our own buffer (safe to add into in place)
        with ctx.state.replay(x), torch.enable_grad():
            for s, e in ctx.bounds:  # forward order, so the replayed RNG draws match the forward's
                xs = x[..., s:e, :].detach().requires_grad_(need_x)  # (..., l, H)
                aliases = {ctx.names[i]: ctx.params[i].detach().requires_grad_(True) for i in slots}
                ys = ctx.run(xs, aliases)  # (..., l, H_out), graph over xs and the aliases only
                inputs = ([xs] if need_x else []) + list(aliases.values())
                if not inputs:
                    break
                grads = torch.autograd.grad(ys, inputs, grad_out[..., s:e, :], allow_unused=True)
                del ys, aliases
                if need_x:
                    grad_x[..., s:e, :] = grads[0]
                    grads = grads[1:]
                for i, g in zip(slots, grads):
                    if g is None:
                        continue
                    if g.dtype in (torch.float16, torch.bfloat16):
                        g = g.float()  # accumulate half-precision gradients in float32
                    if acc[i] is None:
                        acc[i] = g
                    elif owned[i]:
                        acc[i].add_(g)
                    else:
                        acc[i], owned[i] = acc[i] + g, True
                del grads
        out = [None if g is None else g.to(p.dtype) for g, p in zip(acc, ctx.params)]
        ctx.params = ctx.run = None
        return (grad_x, None, None, None, *out)
