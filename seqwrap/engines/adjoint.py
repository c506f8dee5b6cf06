"""Adjoint sharding for HF Mamba (Xu et al. 2025), exact and truncated, on one process or many.

    engine = seqwrap.AdjointSharding(model, chunk_size=2048)
    out = engine(input_ids, labels=None, num_items=None)   # forward + backward; .grad filled
    optimizer.step()

mode="exact" (the default). Pass 1, no grad: run chunk after chunk, keeping each layer's state (conv
state + SSM state) at every chunk boundary. Pass 2, chunks in reverse: recompute a chunk from its
boundary states with grad, backpropagate its own loss plus <final states, adjoint> where the adjoint is
the gradient of the next chunk's boundary states, then hand the gradient of this chunk's boundary states
to the chunk before. Gradients equal full backprop; memory is one chunk of activations plus the
boundary states.

mode="sharded": the paper's formulation. The gradient v_t of the loss w.r.t. the top of the residual
stream is computed first (pass 1, with the final norm + LM head). Every layer k then gets v_t as the
cotangent of its own output (paper, Prop. 3) and runs its own adjoint, independently of the other
layers: the paths through the Jacobians of the layers above k are dropped (the residual path alone is
kept). That is exact for one layer and an approximation for more (see the tests and the benchmark
notes). truncation=T keeps, for the loss of step t, only steps t-T+1..t of every layer's adjoint
(truncated adjoint sharding): each chunk then runs its scan over a window of T-1 look-ahead tokens
and needs no SSM adjoint from later chunks.

group: the chunks are split into contiguous ranges across the ranks of a torch.distributed process
group. Every rank calls the engine with the same full input_ids; boundary states travel forward rank to
rank in pass 1, adjoints travel back in pass 2 (sharded + truncation: the look-ahead cotangents of the
next rank's first chunks travel back too), and the parameter gradients of the step are all-reduced
once (one flat buffer). Before any of that the ranks agree (parallel/agreement.py: one all-reduce of
3 world + 4 int64): an input refused on one rank raises the same error on every rank, and ranks given
different inputs (a different chunk count or different tokens, labels, num_items) are refused on every
rank, since their sends and receives would pair wrongly. With FSDP2 (each rank its own batch) the same
agreement runs before the step's all-gather.

Loss semantics follow HF causal-LM training: labels aligned with input_ids (default: input_ids),
shifted inside, -100 ignored; the loss is the sum of token losses divided by the number of counted
labels of the whole sequence, or by num_items when given.

Packed rows (several documents each: position_ids restarting per document, cu_seqlens, seq_idx or
DataCollatorWithFlattening's cu_seq_lens_q / cu_seq_lens_k, as for SeCO): the SSM state is reset at
every document start inside the scan kernels and the conv state is cut there, also where a chunk
starts a document, so no state or gradient crosses documents; the target of a document's last token is
ignored. Exact mode then equals training every document on its own.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..hf.mamba import IGNORE_INDEX, MambaAdapter, shifted_targets
from ..ops import documents as docs_mod
from ..parallel.agreement import agree_step, agreement_group
from ..parallel.fsdp import fsdp_step_for
from ..parallel.grad_sync import reduce_step, restore_grads, stash_grads, unstash_grads
from .packing import BOUNDARY_KEYS, scan_segment


@dataclass
class AdjointOutput:
    loss: torch.Tensor      # scalar, detached: the step's loss (HF normalisation)
    num_tokens: int         # labels that counted (not -100) in the whole sequence
    num_chunks: int         # chunks of the whole sequence (all ranks together)


def _leaf(t):
    return t.detach().requires_grad_()


def _no_segment(start, end):
    return None


class AdjointSharding:
    def __init__(self, model, chunk_size=2048, *, mode="exact", truncation=None, group=None, fsdp=None):
        self.adapter = MambaAdapter(model)
        self.model = model
        # FSDP2 (fully_shard): every group is all-gathered once per step and reduce-scattered once at its
        # end (seqwrap/parallel/fsdp.py); the mixer runs outside module calls, so no other schedule applies
        self._fsdp = fsdp_step_for(model, fsdp, "AdjointSharding", hooks=False)
        if self._fsdp is not None and group is not None:
            raise NotImplementedError("seqwrap.AdjointSharding: group= (chunks split over ranks) on an FSDP2 model "
                                      "is not supported; FSDP2 ranks each train on their own batch")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"seqwrap.AdjointSharding: chunk_size must be a positive int, got {chunk_size!r}")
        if mode not in ("exact", "sharded"):
            raise ValueError(f"seqwrap.AdjointSharding: mode must be 'exact' or 'sharded', got {mode!r}")
        if truncation is not None:
            if mode != "sharded":
                raise ValueError("seqwrap.AdjointSharding: truncation applies to mode='sharded' only")
            if isinstance(truncation, bool) or not isinstance(truncation, int) or truncation < 1:
                raise ValueError(f"seqwrap.AdjointSharding: truncation must be a positive int, got {truncation!r}")
        self.chunk_size, self.mode, self.truncation, self.group = chunk_size, mode, truncation, group
        self._seg = _no_segment   # (start, end) -> the document segment of a packed step's tokens, or None

    # ---------------------------------------------------------------------------------------------
    def __call__(self, input_ids, labels=None, *, num_items=None, position_ids=None, **boundaries):
        """Forward + backward of the whole sequence (under torch.no_grad / inference_mode: evaluate).

        boundaries: cu_seqlens, seq_idx, cu_seq_lens_q, cu_seq_lens_k (max_length_q / max_length_k are
        accepted and not needed) for packed rows; position_ids only mark document starts (Mamba has no
        positions)."""
        if not torch.is_grad_enabled():
            return self.evaluate(input_ids, labels, num_items=num_items, position_ids=position_ids, **boundaries)
        return self._train_step(input_ids, labels, num_items=num_items, position_ids=position_ids, **boundaries)

    def evaluate(self, input_ids, labels=None, *, num_items=None, position_ids=None, **boundaries):
        """Forward only: the loss of the whole sequence (HF normalisation), chunk by chunk with the recurrent
        states handed on (from rank to rank with group=); writes no gradient."""
        if self._fsdp is not None:
            raise NotImplementedError("seqwrap.AdjointSharding: forward-only evaluation of an FSDP2 model is not "
                                      "supported yet; evaluate with the model itself")
        targets, divisor, bounds, num_tokens, seg = self._agreed_prepare(input_ids, labels, num_items, position_ids,
                                                                         boundaries)
        ad = self.adapter
        rank, world, lo, hi = self._split(bounds)
        states = ad.zero_states(input_ids.shape[0], input_ids.device)
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            if rank > 0:
                self._recv_states(states, rank - 1)
            for s, e in bounds[lo:hi]:
                x, states = ad.stack(ad.embeddings(input_ids[:, s:e]), states, seg(s, e))
                total += ad.loss_sum(x, targets[:, s:e]).double().cpu()
            if rank < world - 1:
                self._send_states(states, rank + 1)
            if self.group is not None:
                dist.all_reduce(total, group=self.group)
        return AdjointOutput(loss=(total / divisor).to(torch.float32), num_tokens=num_tokens, num_chunks=len(bounds))

    def _agreed_prepare(self, input_ids, labels, num_items, position_ids, boundaries):
        """_prepare and the split checks on this rank, then the ranks' agreement (one small all-reduce)
        before any other collective: every rank raises when one rank's input was refused, and under
        group= when the ranks were not given the same input (module docstring)."""
        prep = error = None
        try:
            prep = self._prepare(input_ids, labels, num_items, position_ids, boundaries)
            self._check_split(prep[2])
        except Exception as e:  # noqa: BLE001 - re-raised by agree_step, on every rank
            error = e
        group = self.group if self.group is not None else agreement_group(fsdp=self._fsdp)
        agreed = agree_step("AdjointSharding", group, error=error, num_chunks=0 if prep is None else len(prep[2]),
                            fingerprint=0 if prep is None or self.group is None else
                            _input_fingerprint(input_ids, prep[0], prep[1]))
        if self.group is not None and not agreed.uniform:
            raise ValueError(f"seqwrap.AdjointSharding: the ranks of group= were given different inputs ("
                             f"{agreed.min_chunks} to {agreed.max_chunks} chunks, or different tokens, labels or "
                             "num_items); every rank must call the engine with the same full input_ids (each "
                             "computes its own range of chunks), so no rank ran this step (every rank raises this)")
        return prep

    def _check_split(self, bounds):
        """The refusals of the chunk split over group= (before the agreement, so every rank raises them)."""
        self._split(bounds)
        T = self.truncation or 0
        reach = -(-(T - 1) // self.chunk_size) if T else 0   # later chunks a look-ahead window touches
        world = 1 if self.group is None else dist.get_world_size(self.group)
        if world > 1 and reach > 0 and any(self._split(bounds, r)[3] - self._split(bounds, r)[2] < reach
                                           for r in range(1, world)):
            raise ValueError(f"seqwrap.AdjointSharding: truncation={T} reaches {reach} chunks ahead; every rank "
                             f"but the first must hold at least {reach} chunks of {self.chunk_size} tokens")

    def _prepare(self, input_ids, labels, num_items, position_ids, boundaries):
        """(shifted targets (B, T), the loss divisor, chunk bounds, counted labels, the segment function)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("seqwrap.AdjointSharding: input_ids must be a (batch, length) tensor")
        unknown = sorted(set(boundaries) - set(BOUNDARY_KEYS))
        if unknown:
            raise TypeError(f"seqwrap.AdjointSharding: unexpected keyword argument(s) {unknown}")
        explicit = {k: v for k, v in boundaries.items() if v is not None and not k.startswith("max_length")}
        if position_ids is not None and (not torch.is_tensor(position_ids) or position_ids.shape != input_ids.shape):
            raise ValueError(f"seqwrap.AdjointSharding: position_ids must be a tensor shaped like input_ids "
                             f"{tuple(input_ids.shape)}")
        docs = docs_mod.resolve(tuple(input_ids.shape), position_ids=position_ids, what="seqwrap.AdjointSharding",
                                **explicit)
        docs = None if docs is None else docs.to(input_ids.device)
        targets = shifted_targets(input_ids, labels)
        if docs is not None:  # a document's last token does not predict the next document's first
            targets = targets.masked_fill(docs.ends(), IGNORE_INDEX)
        counted = targets[targets != IGNORE_INDEX]
        vocab = self.adapter.lm_head.weight.shape[0]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= vocab):
            bad = int(counted.min()) if int(counted.min()) < 0 else int(counted.max())
            raise ValueError(f"seqwrap.AdjointSharding: labels hold {bad}, outside [0, {vocab}) (the vocabulary) "
                             f"and not {IGNORE_INDEX}")
        num_tokens = counted.numel()
        divisor = num_items if num_items is not None else num_tokens
        if isinstance(divisor, torch.Tensor):
            divisor = divisor.item()
        if num_items is not None and (isinstance(divisor, bool) or not isinstance(divisor, (int, float))
                                      or not math.isfinite(divisor) or divisor <= 0):
            raise ValueError(f"seqwrap.AdjointSharding: num_items must be a finite number > 0, got {num_items!r}")
        divisor = divisor or 1  # no counted label: loss 0, no gradient
        length = input_ids.shape[1]
        bounds = [(s, min(s + self.chunk_size, length)) for s in range(0, length, self.chunk_size)]
        kconv = self.adapter.kconv
        seg = (lambda s, e: None) if docs is None else (lambda s, e: scan_segment(docs, s, e, kconv))
        return targets, divisor, bounds, num_tokens, seg

    def _train_step(self, input_ids, labels=None, *, num_items=None, position_ids=None, **boundaries):
        prep = self._agreed_prepare(input_ids, labels, num_items, position_ids, boundaries)
        if self._fsdp is None:
            return self._run_step(input_ids, *prep)
        with self._fsdp.step():   # one all-gather per group now, one reduce-scatter at the end
            return self._run_step(input_ids, *prep)

    def _run_step(self, input_ids, targets, divisor, bounds, num_tokens, seg):
        self._seg = seg
        params = self._params()
        stash = stash_grads(params)   # a failed step leaves .grad as it was before it
        self.adapter.begin_step()
        try:
            if self.mode == "exact":
                loss = self._exact(input_ids, targets, divisor, bounds)
            else:
                loss = self._sharded(input_ids, targets, divisor, bounds)
            self.adapter.end_step()
        except BaseException:
            restore_grads(params, stash)
            raise
        finally:
            self.adapter.discard_step()
            self._seg = _no_segment
        unstash_grads(params, stash)
        return AdjointOutput(loss=loss, num_tokens=num_tokens, num_chunks=len(bounds))

    # ---- exact -----------------------------------------------------------------------------------
    def _chunk_loss(self, ids, targets, states, divisor, seg=None):
        """Forward of one chunk with grad: (its loss / divisor, the states after it)."""
        x = self.adapter.embeddings(ids)
        x, new = self.adapter.stack(x, states, seg)
        return self.adapter.loss_sum(x, targets) / divisor, new

    def _exact(self, ids, targets, divisor, bounds):
        ad = self.adapter
        rank, world, lo, hi = self._split(bounds)
        mine = bounds[lo:hi]   # this rank's contiguous chunks
        first_rank, last_rank = rank == 0, rank == world - 1
        states = ad.zero_states(ids.shape[0], ids.device)

        # pass 1: boundary states of my chunks (the first ones arrive from the previous rank)
        if not first_rank:
            self._recv_states(states, rank - 1)
        boundary = []
        with torch.no_grad():
            for s, e in mine:
                boundary.append(states)
                _, states = ad.stack(ad.embeddings(ids[:, s:e]), states, self._seg(s, e))
        if not last_rank:
            self._send_states(states, rank + 1)

        # pass 2: reverse, relaying the adjoint of the boundary states
        adjoint = None
        if not last_rank:
            adjoint = [tuple(torch.empty_like(t) for t in st) for st in states]
            self._recv_states(adjoint, rank + 1)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(len(mine) - 1, -1, -1):
            s, e = mine[i]
            need_in = i > 0 or not first_rank
            start = [tuple(_leaf(t) for t in st) for st in boundary[i]] if need_in else boundary[i]
            loss, end = self._chunk_loss(ids[:, s:e], targets[:, s:e], start, divisor, self._seg(s, e))
            outs, grads = [loss], [torch.ones_like(loss)]
            if adjoint is not None:
                for st, adj in zip(end, adjoint):
                    outs += list(st)
                    grads += list(adj)
            torch.autograd.backward(outs, grads)
            total += loss.detach().double().cpu()
            adjoint = [tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in st) for st in start] \
                if need_in else None
            boundary[i] = None
        if not first_rank:
            self._send_states(adjoint, rank - 1)
        if self.group is not None:
            total = self._finish_distributed(total)
        return total.to(torch.float32)

    # ---- distributed helpers ---------------------------------------------------------------------
    def _split(self, bounds, rank=None):
        """(rank, world, lo, hi): `rank` (default: this process) owns chunks bounds[lo:hi]."""
        world = 1 if self.group is None else dist.get_world_size(self.group)
        if rank is None:
            rank = 0 if self.group is None else dist.get_rank(self.group)
        n = len(bounds)
        if n < world:
            raise ValueError(f"seqwrap.AdjointSharding: {n} chunks cannot be split over {world} ranks; use a "
                             "smaller chunk_size or a longer sequence")
        return rank, world, rank * n // world, (rank + 1) * n // world

    def _send_states(self, states, dst):
        for st in states:
            for t in st:
                dist.send(t.detach().contiguous(), group=self.group, group_dst=dst)

    def _recv_states(self, states, src):
        for st in states:
            for t in st:
                dist.recv(t, group=self.group, group_src=src)

    def _params(self):
        seen, out = set(), []
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _finish_distributed(self, total):
        """One all-reduce (a flat float64 buffer) of this step's parameter gradients, the cast-leaf
        gradients (see MambaAdapter.begin_step) and the loss."""
        params = self._params()
        total = reduce_step(params + self.adapter.cast_leaves(), self.group, total)  # the step's one all-reduce
        self.adapter.end_step()                          # cast leaves -> A_log, D, dt_proj.bias
        return total

    # ---- sharded (the paper's formulation) -----------------------------------------------------
    def _sharded(self, ids, targets, divisor, bounds):
        ad = self.adapter
        T = self.truncation or 0
        length = ids.shape[1]
        reach = -(-(T - 1) // self.chunk_size) if T else 0   # later chunks a look-ahead window touches
        rank, world, lo, hi = self._split(bounds)
        first_rank, last_rank = rank == 0, rank == world - 1
        mine = bounds[lo:hi]
        states = ad.zero_states(ids.shape[0], ids.device)
        if not first_rank:
            self._recv_states(states, rank - 1)
        boundary, v = [], []
        total = torch.zeros((), dtype=torch.float64)
        # pass 1: boundary states, and v = dLoss/d(top hidden state) per chunk (+ head gradients)
        for s, e in mine:
            boundary.append(states)
            with torch.no_grad():
                x, states = ad.stack(ad.embeddings(ids[:, s:e]), states, self._seg(s, e))
            top = _leaf(x)
            loss = ad.loss_sum(top, targets[:, s:e]) / divisor
            loss.backward()
            total += loss.detach().double().cpu()
            v.append(top.grad)
        boundary.append(states)
        if not last_rank:
            self._send_states([(states[k][0], states[k][1]) for k in range(len(states))], rank + 1)
        # look-ahead cotangents of the next rank's first chunks travel one rank back
        if reach and not first_rank:
            self._send_states([tuple(v[:reach])], rank - 1)
        if reach and not last_rank:
            nlo, nhi = self._split(bounds, rank + 1)[2:]
            nxt = [torch.empty(v[0].shape[0], e - s, v[0].shape[2], dtype=v[0].dtype, device=v[0].device)
                   for s, e in bounds[nlo:min(nhi, nlo + reach)]]
            self._recv_states([tuple(nxt)], rank + 1)
            v += nxt

        # pass 2: per chunk in reverse, every layer's VJP with cotangent v (layers independent)
        adjoint = None    # per layer (d conv_state, d ssm_state or None) at the end of the chunk
        if not last_rank:
            adjoint = [(torch.empty_like(c), None if T else torch.empty_like(h)) for c, h in states]
            self._recv_states([tuple(t for t in a if t is not None) for a in adjoint], rank + 1)
        for i in range(len(mine) - 1, -1, -1):
            s, e = mine[i]
            la_end = min(length, e + T - 1) if T else e
            seg, seg_la = self._seg(s, e), (self._seg(e, la_end) if la_end > e else None)
            with torch.no_grad():     # inputs of every layer over the chunk and its look-ahead
                xs_own, xs_la = self._layer_inputs(ids[:, s:e], boundary[i], seg), None
                if la_end > e:
                    xs_la = self._layer_inputs(ids[:, e:la_end], boundary[i + 1], seg_la)
            v_la = torch.cat(v[i + 1:i + 1 + reach], 1)[:, :la_end - e] if la_end > e else None
            need_in = i > 0 or not first_rank
            start = [tuple(_leaf(t) for t in st) for st in boundary[i]] if need_in else boundary[i]
            outs, grads = [], []
            for k, block in enumerate(ad.layers):
                x_in = ad.embeddings(ids[:, s:e]) if k == 0 else xs_own[k]
                residual = x_in.to(torch.float32) if block.residual_in_fp32 else x_in
                h = block.norm(x_in.to(dtype=block.norm.weight.dtype))
                la = None
                if xs_la is not None:
                    la = block.norm(xs_la[k].to(dtype=block.norm.weight.dtype)).detach()
                out, out_la, conv_end, ssm_end = ad.mixer(block.mixer, h, start[k][0], start[k][1],
                                                          lookahead=la, truncation=T, seg=seg,
                                                          seg_lookahead=seg_la)
                outs.append(residual + out)
                grads.append(v[i].to(outs[-1].dtype))
                if out_la is not None:
                    outs.append(out_la)
                    grads.append(v_la.to(out_la.dtype))
                if adjoint is not None:
                    outs.append(conv_end)
                    grads.append(adjoint[k][0])
                    if adjoint[k][1] is not None:
                        outs.append(ssm_end)
                        grads.append(adjoint[k][1])
            torch.autograd.backward(outs, grads)
            # relay: the conv-state adjoint always; the SSM adjoint only without truncation (with it,
            # the look-ahead window already holds every loss a step may reach)
            g = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)  # noqa: E731
            adjoint = [(g(st[0]), None if T else g(st[1])) for st in start] if need_in else None
            boundary[i + 1] = None
            for j in range(i + reach, len(v)):   # v of chunks no earlier window reaches
                v[j] = None
        if not first_rank:
            self._send_states([tuple(t for t in a if t is not None) for a in adjoint], rank - 1)
        if self.group is not None:
            total = self._finish_distributed(total)
        return total.to(torch.float32)

    def _layer_inputs(self, ids, states, seg=None):
        """No grad: the input of every layer for these tokens, starting from `states`."""
        ad = self.adapter
        x = ad.embeddings(ids)
        xs = []
        for block, st in zip(ad.layers, states):
            xs.append(x)
            x, _ = ad.block(block, x, st, seg=seg)
        return xs


def _input_fingerprint(input_ids, targets, divisor) -> int:
    """A CRC32 (>= 1) of what every rank of group= must hold alike: the tokens, the shifted targets and
    the loss divisor (one pass over the step's token ids, small next to the step)."""
    crc = zlib.crc32(repr((tuple(input_ids.shape), float(divisor))).encode())
    for t in (input_ids, targets):
        crc = zlib.crc32(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes(), crc)
    return 1 + crc
