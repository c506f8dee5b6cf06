"""Document boundaries of packed sequences: one layout object, the conventions that describe it, and
the attention masks it implies.

A packed batch holds several documents per row, each one contiguous span of tokens; no token may
attend to, or be predicted from, another document. `Documents` holds the layout as document ids
(B, T), non-decreasing along each row. It is built from any of the conventions in use:

  position_ids (B, T)   restarting per document (HF / TRL padding-free / DataCollatorWithFlattening):
                        a document starts wherever position_ids[t] != position_ids[t-1] + 1, HF's own
                        rule (transformers' find_packed_sequence_indices);
  cu_seqlens (D + 1,)   cumulative document lengths over the flattened batch (B * T tokens), starting at
                        0 and ending at B * T, every row start among them (flash-attention varlen; the
                        collator's cu_seq_lens_q / cu_seq_lens_k);
  seq_idx (B, T)        the document index of every token (mamba-ssm, the collator's return_seq_idx).

`resolve` picks and cross-checks them; `block_mask` gives the attention mask of one (query span, key
span) block: EMPTY when the two spans share no document in any row (the block is skipped, never
computed), None when every pair is allowed, else an additive mask. Nothing here imports transformers.
"""
from __future__ import annotations

import torch

from .attention_blocks import EMPTY
from .attention_blocks import block_mask as positional_block_mask


class Documents:
    """Document layout of a (B, T) batch. ids: (B, T) int64, non-decreasing along each row (made so by the
    constructors below; not checked here: decreasing_at() finds a violation)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids                                     # (B, T) on the batch's device
        host = ids.detach().to("cpu", torch.int64)
        self.batch, self.length = host.shape
        self._rows = host.tolist()                         # per row, per token: its document (host)
        self._host = host

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> "Documents":
        """A new document wherever position_ids[b, t] != position_ids[b, t-1] + 1 (HF's rule)."""
        pos = position_ids.to(torch.int64)
        starts = torch.zeros(pos.shape, dtype=torch.int64, device=pos.device)
        starts[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).to(torch.int64)
        return cls(starts.cumsum(1))

    @classmethod
    def from_seq_idx(cls, seq_idx: torch.Tensor, what: str = "seq_idx") -> "Documents":
        if seq_idx.shape[1] > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            raise ValueError(f"{what} must be non-decreasing along each row (every document one contiguous span "
                             "of tokens)")
        # renumber so that a document id is its rank within the row (ids may repeat across rows)
        ids = seq_idx.to(torch.int64)
        starts = torch.zeros(ids.shape, dtype=torch.int64, device=ids.device)
        starts[:, 1:] = (ids[:, 1:] != ids[:, :-1]).to(torch.int64)
        return cls(starts.cumsum(1))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, batch: int, length: int, what: str = "cu_seqlens") -> "Documents":
        cu = _as_long_1d(cu_seqlens, what)
        total = batch * length
        if cu.numel() < 2 or int(cu[0]) != 0:
            raise ValueError(f"{what} must start at 0 and hold at least one document end, got {_show(cu)}")
        if bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(f"{what} must be strictly increasing (no empty document), got {_show(cu)}")
        if int(cu[-1]) != total:
            raise ValueError(f"{what} ends at {int(cu[-1])} but the batch has {batch} x {length} = {total} tokens: "
                             "the document boundaries must cover every row exactly")
        have = set(cu.tolist())
        crossing = [b for b in range(1, batch) if b * length not in have]
        if crossing:
            raise ValueError(f"{what}: a document crosses from row {crossing[0] - 1} into row {crossing[0]} (no "
                             f"boundary at token {crossing[0] * length} of the flattened batch); every row must "
                             "start a document")
        starts = torch.zeros(total, dtype=torch.int64)
        starts[cu[1:-1]] = 1
        starts = starts.view(batch, length)
        starts[:, 0] = 0
        return cls(starts.cumsum(1))

    # -- what the layout implies ----------------------------------------------------------------
    def to(self, device) -> "Documents":
        out = Documents.__new__(Documents)
        out.__dict__.update(self.__dict__)
        out.ids = self.ids.to(device)
        return out

    @property
    def packed(self) -> bool:
        """More than one document in some row."""
        return any(row[0] != row[-1] for row in self._rows)

    def positions(self) -> torch.Tensor:
        """(B, T) int64: each token's position inside its document (0 at every document start)."""
        ids = self.ids
        idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        start = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        start[:, 1:] = ids[:, 1:] != ids[:, :-1]
        first = torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values
        return idx - first

    def ends(self) -> torch.Tensor:
        """(B, T) bool: token t is the last of its document and token t+1 of the row starts another one
        (its next-token target belongs to the other document)."""
        ids = self.ids
        out = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        out[:, :-1] = ids[:, 1:] != ids[:, :-1]
        return out

    def cu_seqlens(self) -> torch.Tensor:
        """int32 (D + 1,): cumulative document lengths over the flattened batch (flash-attention's layout)."""
        host = self._host
        start = torch.ones(host.shape, dtype=torch.bool)
        start[:, 1:] = host[:, 1:] != host[:, :-1]
        begins = start.reshape(-1).nonzero().flatten()
        return torch.cat([begins, torch.tensor([host.numel()])]).to(torch.int32)

    def count(self) -> int:
        """Number of documents in the batch."""
        return sum(row[-1] - row[0] + 1 for row in self._rows) if self.length else 0

    def lengths(self) -> list[int]:
        """Lengths of the documents, row after row."""
        cu = self.cu_seqlens().tolist()
        return [b - a for a, b in zip(cu[:-1], cu[1:])]

    def decreasing_at(self) -> tuple[int, int] | None:
        """(row, t) of the first place where ids[row, t + 1] < ids[row, t] (host), or None: the layout is only
        valid without one (the constructors below never make one; an op given raw ids checks it)."""
        bad = (self._host[:, 1:] < self._host[:, :-1]).nonzero()
        return None if bad.numel() == 0 else (int(bad[0, 0]), int(bad[0, 1]))

    def id_at(self, row: int, t: int) -> int:
        return self._rows[row][t]

    # -- block decisions (host only: no device synchronisation) ------------------------------------
    def share(self, q0: int, q1: int, k0: int, k1: int) -> bool:
        """Whether queries [q0, q1) and keys [k0, k1) hold a token of one same document in some row."""
        for row in self._rows:
            if row[q0] <= row[k1 - 1] and row[k0] <= row[q1 - 1]:
                return True
        return False

    def single(self, q0: int, q1: int, k0: int, k1: int) -> bool:
        """Whether, in every row, all of [q0, q1) and [k0, k1) lie in one document (no document mask needed)."""
        lo, hi = min(q0, k0), max(q1, k1) - 1
        return all(row[lo] == row[hi] for row in self._rows)

    def continues(self, end: int) -> bool:
        """Whether some document holds both token end-1 and token end (is read past `end`)."""
        return end < self.length and any(row[end - 1] == row[end] for row in self._rows)

    def same(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """(B, 1, q1-q0, k1-k0) bool: query and key in the same document."""
        ids = self.ids
        return (ids[:, q0:q1, None] == ids[:, None, k0:k1])[:, None]

    def block_counts(self, bounds: list[tuple[int, int]], window: int | None = None) -> tuple[int, int]:
        """(blocks a causal attention over chunks `bounds` computes without boundaries, blocks of those the
        boundaries leave empty): the (query chunk, key chunk <= it) pairs, inside the window if any."""
        total = skipped = 0
        for i, (q0, q1) in enumerate(bounds):
            for k0, k1 in bounds[:i + 1]:
                if window is not None and q0 - (k1 - 1) >= window:
                    continue
                total += 1
                skipped += not self.share(q0, q1, k0, k1)
        return total, skipped


def block_mask(documents: Documents | None, q0: int, q1: int, k0: int, k1: int, *, causal: bool = True,
               window: int | None = None, key_padding: torch.Tensor | None = None, dtype=torch.float32,
               device="cpu"):
    """attention_blocks.block_mask with document boundaries: EMPTY when the spans share no document in
    any row (or no position pair is allowed), None when every pair is allowed, else an additive
    (1 or B, 1, q1-q0, k1-k0) mask that also keeps queries to their own document."""
    if documents is not None and not documents.share(q0, q1, k0, k1):
        return EMPTY
    base = positional_block_mask(q0, q1, k0, k1, causal=causal, window=window, key_padding=key_padding,
                                 dtype=dtype, device=device)
    if base is EMPTY or documents is None or documents.single(q0, q1, k0, k1):
        return base
    same = documents.same(q0, q1, k0, k1).to(device)
    neg = torch.full((), float("-inf"), dtype=dtype, device=device)
    if base is None:
        return torch.where(same, torch.zeros((), dtype=dtype, device=device), neg)
    return torch.where(same, base, neg)


def resolve(shape: tuple[int, int], *, position_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, cu_seqlens=None, seq_idx=None, cu_seq_lens_q=None,
            cu_seq_lens_k=None, infer: bool = True, what: str = "seqwrap") -> Documents | None:
    """The document layout of a (B, T) batch, or None when every row is one document.

    Explicit boundaries (cu_seqlens, or HF's cu_seq_lens_q / cu_seq_lens_k, or seq_idx; several may be
    given if they agree) win; position_ids must then be consecutive inside every document (they may run
    on across a boundary: rotary embeddings only see differences inside a document). Without explicit
    boundaries and with infer=True, restarting position_ids mark them (HF's rule); in a padded batch
    (attention_mask with zeros) restarts between two non-padding tokens are refused as ambiguous.
    Raises ValueError naming the problem."""
    B, T = shape
    layouts = []
    cu_named = [(n, c) for n, c in (("cu_seqlens", cu_seqlens), ("cu_seq_lens_q", cu_seq_lens_q),
                                    ("cu_seq_lens_k", cu_seq_lens_k)) if c is not None]
    for name, cu in cu_named:
        layouts.append((name, Documents.from_cu_seqlens(cu, B, T, f"{what}: {name}")))
    if seq_idx is not None:
        seq_idx = _as_long_2d(seq_idx, shape, f"{what}: seq_idx")
        layouts.append(("seq_idx", Documents.from_seq_idx(seq_idx, f"{what}: seq_idx")))
    device = position_ids.device if torch.is_tensor(position_ids) else None
    if layouts:
        name0, docs = layouts[0]
        for name, other in layouts[1:]:
            if other._rows != docs._rows:
                raise ValueError(f"{what}: {name} and {name0} describe different document boundaries")
        if device is not None:
            docs = docs.to(device)
        if position_ids is not None:
            _check_positions(docs, position_ids, what, name0)
        return docs if docs.packed else None
    if position_ids is None or not infer:
        return None
    docs = Documents.from_position_ids(position_ids)
    if not docs.packed:
        return None
    if attention_mask is not None and not bool(attention_mask.all()):
        real = attention_mask.bool()
        inside = real[:, 1:] & real[:, :-1] & (position_ids[:, 1:] != position_ids[:, :-1] + 1)
        if bool(inside.any()):
            raise ValueError(f"{what}: position_ids restart between non-padding tokens of a padded batch; packed "
                             "documents with padding need explicit boundaries (cu_seqlens or seq_idx)")
        return None
    return docs


def _check_positions(docs: Documents, position_ids: torch.Tensor, what: str, name: str) -> None:
    pos = position_ids.to(torch.int64)
    same_doc = docs.ids[:, 1:] == docs.ids[:, :-1]
    bad = same_doc & (pos[:, 1:] != pos[:, :-1] + 1)
    if bool(bad.any()):
        b, t = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{what}: position_ids contradict {name}: tokens {t} and {t + 1} of row {b} are in one "
                         f"document by {name} but their positions are {int(pos[b, t])} and {int(pos[b, t + 1])} "
                         "(a restart marks a new document)")


def _as_long_1d(x, what: str) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex() or t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D integer tensor of cumulative lengths, got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.int64)


def _as_long_2d(x, shape, what: str) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex() or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what} must be an integer tensor of shape {tuple(shape)} (as input_ids), got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _show(cu: torch.Tensor) -> str:
    vals = cu.tolist()
    return str(vals if len(vals) <= 8 else vals[:4] + ["..."] + vals[-2:])
