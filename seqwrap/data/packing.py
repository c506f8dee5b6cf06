"""Packing documents into rows of a fixed length, the way long-context fine-tuning batches them.

    batch = pack_documents(docs, row_len=16384)   # docs: token lists or 1-D tensors
    engine(**batch.inputs())                      # input_ids, labels, position_ids, cu_seqlens

Each row holds whole documents back to back (first-fit decreasing by default: few rows, little
padding); the rest of the last rows is padding, its own document with ignored labels, so no token
attends to or predicts across a document and no attention mask is needed. Labels follow
transformers' DataCollatorWithFlattening: the token ids, with -100 at each document's first token
(the seqwrap engines also ignore the target of each document's last token themselves).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.documents import Documents

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """A packed batch. input_ids, labels, position_ids, attention_mask: (rows, row_len) int64;
    cu_seqlens: int32 (D + 1,) over the flattened rows, padding tails included as documents;
    placement: per input document, the (row, start, end) spans it landed in (several with overflow="split")."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    placement: list[list[tuple[int, int, int]]] = field(default_factory=list)

    def inputs(self) -> dict:
        """Keyword arguments for an engine call or an MsT model call (no attention mask: the padding is its
        own document, with ignored labels)."""
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
                "cu_seqlens": self.cu_seqlens}

    def rows(self, index) -> dict:
        """inputs() of some rows only (an int, a slice or a list of row indices), cu_seqlens rebuilt for them:
        e.g. one row per engine call, as gradient accumulation."""
        if isinstance(index, int):
            index = [index]
        shape = tuple(self.input_ids.shape)
        docs = Documents(Documents.from_cu_seqlens(self.cu_seqlens, *shape).ids[index])
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "position_ids": self.position_ids[index], "cu_seqlens": docs.cu_seqlens().to(self.cu_seqlens.device)}

    @property
    def num_labels(self) -> int:
        """Targets that count (what the engines divide by): labels other than -100 after the shift."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        """Tokens of the documents (padding left out)."""
        return int(self.attention_mask.sum())

    @property
    def fill(self) -> float:
        """Fraction of the rows' tokens that belong to documents."""
        return self.num_tokens / self.input_ids.numel()


def _as_list(doc, i: int) -> list[int]:
    if torch.is_tensor(doc):
        if doc.dim() != 1 or doc.dtype.is_floating_point or doc.dtype == torch.bool:
            raise ValueError(f"pack_documents: document {i} must be a 1-D integer tensor, got {doc.dtype} "
                             f"{tuple(doc.shape)}")
        return doc.tolist()
    out = list(doc)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in out):
        raise ValueError(f"pack_documents: document {i} must hold integer token ids")
    return out


def pack_documents(documents, row_len: int, *, pad_id: int = 0, strategy: str = "ffd", overflow: str = "error",
                   device=None) -> PackedBatch:
    """Packs `documents` (a sequence of token-id lists or 1-D integer tensors) into rows of row_len tokens.

    strategy: "ffd" (first-fit decreasing: longest documents first, each into the first row with room)
        or "greedy" (in the given order, a new row when the next document does not fit).
    overflow: what to do with a document longer than row_len: "error", "split" (pieces of row_len
        tokens, each trained as its own document) or "truncate" (its first row_len tokens).
    Empty documents are skipped."""
    if isinstance(row_len, bool) or not isinstance(row_len, int) or row_len < 1:
        raise ValueError(f"pack_documents: row_len must be a positive int, got {row_len!r}")
    if strategy not in ("ffd", "greedy"):
        raise ValueError(f"pack_documents: strategy must be 'ffd' or 'greedy', got {strategy!r}")
    if overflow not in ("error", "split", "truncate"):
        raise ValueError(f"pack_documents: overflow must be 'error', 'split' or 'truncate', got {overflow!r}")
    pieces = []   # (document index, tokens)
    for i, doc in enumerate(documents):
        toks = _as_list(doc, i)
        if len(toks) > row_len:
            if overflow == "error":
                raise ValueError(f"pack_documents: document {i} has {len(toks)} tokens, more than row_len={row_len} "
                                 "(overflow='split' or 'truncate' to allow it)")
            toks = toks[:row_len] if overflow == "truncate" else toks
        pieces += [(i, toks[s:s + row_len]) for s in range(0, len(toks), row_len)]
    if not pieces:
        raise ValueError("pack_documents: no non-empty document to pack")
    order = sorted(range(len(pieces)), key=lambda k: -len(pieces[k][1])) if strategy == "ffd" else range(len(pieces))
    rows: list[list[int]] = []   # piece indices per row
    room: list[int] = []
    for k in order:
        n = len(pieces[k][1])
        r = next((r for r in range(len(rows)) if room[r] >= n), None) if strategy == "ffd" else (
            len(rows) - 1 if rows and room[-1] >= n else None)
        if r is None:
            rows.append([])
            room.append(row_len)
            r = len(rows) - 1
        rows[r].append(k)
        room[r] -= n
    R = len(rows)
    ids = torch.full((R, row_len), pad_id, dtype=torch.long)
    labels = torch.full((R, row_len), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((R, row_len), dtype=torch.long)
    mask = torch.zeros((R, row_len), dtype=torch.long)
    lengths, placement = [], [[] for _ in range(len(documents))]
    for r, members in enumerate(rows):
        s = 0
        for k in members:
            i, toks = pieces[k]
            n = len(toks)
            t = torch.tensor(toks, dtype=torch.long)
            ids[r, s:s + n] = t
            labels[r, s + 1:s + n] = t[1:]          # -100 at the document's first token
            pos[r, s:s + n] = torch.arange(n)
            mask[r, s:s + n] = 1
            placement[i].append((r, s, s + n))
            lengths.append(n)
            s += n
        if s < row_len:                              # the padding: one more document, ignored labels
            pos[r, s:] = torch.arange(row_len - s)
            lengths.append(row_len - s)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    batch = PackedBatch(ids, labels, pos, mask, cu, placement)
    if device is not None:
        for name in ("input_ids", "labels", "position_ids", "attention_mask", "cu_seqlens"):
            setattr(batch, name, getattr(batch, name).to(device))
    return batch
