"""SpaCO: sparse chunk-wise training (Li et al. 2025), an unbiased gradient estimate.

    engine = seqwrap.SpaCO(model, chunk_size=2048, rate=0.125, seed=0)
    out = engine(input_ids, labels=labels)     # out.backward_chunks ~ rate * out.num_chunks

Same two passes as SeCO, but pass 2 recomputes only a sample of the chunks;
the others are never recomputed (their K/V still serve later chunks as
constants). Each recomputed chunk's backward (its own loss and the gradient
relayed onto its K/V) is multiplied by its compensation factor:

  sampling="bernoulli" (default): chunk i kept independently with probability
      q_i, factor 1/q_i. A gradient path through chunks i1..ip survives with
      probability q_i1...q_ip and carries 1/(q_i1...q_ip): exactly unbiased.
      q_i = rate (a float), or one value per chunk (a sequence), or
      rate(label_counts) -> sequence (a callable of the per-chunk label counts),
      or budget/k when `budget` (expected chunks per step) is given.
  sampling="fixed" (the paper's): t = budget (default round(rate*k)) chunks kept
      uniformly without replacement, factor min(k/t, max_compensation) per hop.
      Only approximately unbiased: a path through p >= 2 chunks survives with
      probability t(t-1)...(t-p+1)/(k(k-1)...(k-p+1)), not (t/k)^p, and a cap
      below k/t shrinks every term. Use it to reproduce the paper.

The draw is made in the C core from (seed, step, chunk index); `seed=None`
takes one from torch's generator (reproducible under torch.manual_seed).
The reported loss is the exact loss: pass 1 computes the losses of the chunks
that are not recomputed (one LM-head forward per chunk). With exact_loss=False
it reports the unbiased estimate sum_i w_i loss_i / N instead, and pass 1 stops
at the last recomputed chunk (less work, above all with a large vocabulary).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..ops.sampler import sample_chunks
from .seco import SeCO


class SpaCO(SeCO):
    name = "SpaCO"

    def __init__(self, model: nn.Module, chunk_size: int = 2048, *, rate: float | Sequence[float] | Callable = 0.25,
                 budget: int | None = None, sampling: str = "bernoulli", seed: int | None = None,
                 max_compensation: float | None = None, exact_loss: bool = True, **options):
        super().__init__(model, chunk_size, **options)
        fn = "seqwrap.SpaCO"
        if sampling not in ("bernoulli", "fixed"):
            raise ValueError(f"{fn}: sampling must be 'bernoulli' or 'fixed', not {sampling!r}")
        if isinstance(rate, (int, float)) and not isinstance(rate, bool):
            if not 0 < rate <= 1:
                raise ValueError(f"{fn}: rate must be in (0, 1], got {rate}")
        elif sampling == "fixed" or not (callable(rate) or isinstance(rate, (list, tuple, torch.Tensor))):
            raise TypeError(f"{fn}: rate must be a float in (0, 1]" +
                            ("" if sampling == "fixed" else ", a sequence of per-chunk probabilities or a callable"))
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"{fn}: budget must be an int >= 1 (chunks per step), got {budget!r}")
        if max_compensation is not None:
            if sampling != "fixed":
                raise ValueError(f"{fn}: max_compensation applies to sampling='fixed' only "
                                 "(it would bias the bernoulli estimate)")
            if not float(max_compensation) >= 1:
                raise ValueError(f"{fn}: max_compensation must be >= 1, got {max_compensation}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"{fn}: seed must be an int in [0, 2**64), got {seed!r}")
        self.rate, self.budget, self.sampling = rate, budget, sampling
        self.seed, self.max_compensation = seed, max_compensation
        self.exact_loss = bool(exact_loss)

    def probabilities(self, label_counts: list[int]) -> list[float]:
        """Bernoulli inclusion probability of each chunk."""
        k = len(label_counts)
        if self.budget is not None:
            return [min(1.0, self.budget / k)] * k
        if callable(self.rate):
            q = [float(x) for x in self.rate(list(label_counts))]
        elif isinstance(self.rate, (list, tuple, torch.Tensor)):
            q = [float(x) for x in self.rate]
        else:
            return [float(self.rate)] * k
        if len(q) != k:
            raise ValueError(f"seqwrap.SpaCO: rate gave {len(q)} probabilities for {k} chunks")
        return q

    def chunk_weights(self, label_counts: list[int]) -> list[float]:
        k = len(label_counts)
        step = self.step  # SeCO.__call__ increments it after this call
        if self.sampling == "bernoulli":
            w = sample_chunks(k, sampling="bernoulli", probs=self.probabilities(label_counts),
                              seed=self.seed, step=step)
        else:
            t = self.budget if self.budget is not None else round(self.rate * k)
            w = sample_chunks(k, sampling="fixed", budget=max(1, min(k, t)),
                              max_compensation=self.max_compensation, seed=self.seed, step=step)
        return w.tolist()


def proportional_to_labels(rate: float, floor: float = 0.05) -> Callable[[list[int]], list[float]]:
    """A per-chunk `rate` for SpaCO: q_i grows with chunk i's labelled tokens, mean about `rate`.

    q_i = clip(rate * k * (c_i + 1) / sum(c + 1), floor, 1). The floor keeps chunks without
    labels (which still relay gradient from later chunks) sampled now and then.
    """
    def probs(counts: list[int]) -> list[float]:
        k, total = len(counts), sum(c + 1 for c in counts)
        return [min(1.0, max(floor, rate * k * (c + 1) / total)) for c in counts]
    return probs
