"""Ranks agree on a step before its first collective: one small all-reduce.

A chunked step on several ranks (DDP, FSDP2, Ulysses) issues collectives whose number can depend on
what each rank holds: FSDPSchedule(params="layer") all-gathers each layer once per chunk forward,
grads="chunk" reduce-scatters once per chunk backward, SpaCO's draw decides which chunks run. And an
input check that fails on one rank only would leave the others waiting in their next collective until
the process-group timeout (a later step's collectives would then pair with those leftovers).

So before any collective of a step every rank contributes to one all-reduce (MAX over an int64 vector
of 3 * world + 4 entries, a few dozen bytes):

  slot r (r < world)   1 if rank r's input checks (or the rest of its local preparation) failed, else 0
  num_chunks, -num_chunks          its chunk count (MAX of both: the largest and the smallest)
  fingerprint, -fingerprint        a CRC of the chunks it will recompute (SpaCO's draw), 0 when not known
                                   yet (under Ulysses the draw is made afterwards, equal on the group)
  world + 4 + 2 r, + 1             rank r's shard fingerprint (a CRC of its batch size, local length and
                                   chunk split; 0 when not given) and local length: a Ulysses all-to-all
                                   pairs the ranks' chunks one for one, so the members of a Ulysses group
                                   must hold equal splits (StepAgreement.refuse_unequal_shards), while
                                   data-parallel replicas beside them may hold other lengths

If any rank failed, every rank learns which (one all_gather_object of the failures' type and message,
on that path only) and raises the same exception type, naming the failing rank(s) and the problem,
before any other collective: no rank waits, and a retry pairs its collectives with the other ranks'
retry. Otherwise `StepAgreement.uniform` says whether every rank runs the same chunks; a schedule whose
collective count depends on them (fsdp.FSDPSchedule.count_dependent) falls back to the count-independent
one for that call (with a warning; see FSDPStep.schedule_for).

Cost per step: one all-reduce of (3 * world + 4) int64 (counted by count_collectives as all_reduces == 1).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepAgreement:
    """What the ranks agreed on: uniform = every rank has the same chunk count and recompute set;
    min_chunks / max_chunks over the ranks."""

    uniform: bool
    min_chunks: int
    max_chunks: int
    shards: tuple = ()  # per rank of the agreement group: (shard fingerprint, local length)

    def refuse_unequal_shards(self, engine: str, group, members) -> None:
        """Raise ValueError (on every member alike: the agreement is the same everywhere) unless the
        ranks of `members` (a Ulysses process group inside `group`, the agreement group) hold equal
        shard splits. Before any all-to-all of the step."""
        if members is None or not self.shards:
            return
        ranks = _member_ranks(group, members)
        if len({self.shards[r][0] for r in ranks}) <= 1:
            return
        lengths = ", ".join(f"rank {r}: {self.shards[r][1]}" for r in ranks)
        raise ValueError(f"seqwrap.{engine}: the Ulysses ranks hold shards of different lengths or chunk splits "
                         f"(local lengths {lengths}), and each all-to-all pairs their chunks one for one; shard "
                         "the batch with seqwrap.parallel.shard_batch so that every rank holds the same length "
                         "(every rank raises this)")


def agreement_group(*, fsdp=None, ddp=None, ulysses=None, deepspeed=None):
    """The group whose ranks must agree on this step: the whole world when FSDP2 is involved (its meshes,
    and a Ulysses group beside them, together span the ranks that step together), else Ulysses' or DDP's
    own group; None (nothing to agree on) for a single process, or for a DDP step inside ddp.no_sync()
    (such a step issues no collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if fsdp is not None:
        return dist.group.WORLD
    if deepspeed is not None:  # a parallel.deepspeed.DeepSpeedStep: the engine's data-parallel group
        return deepspeed.group
    if ulysses is not None:
        return ulysses
    if ddp is not None and getattr(ddp, "require_backward_grad_sync", True):
        return getattr(ddp, "process_group", None) or dist.group.WORLD
    return None


def selection_fingerprint(selected) -> int:
    """A CRC32 of the recomputed chunk indices (>= 1, so 0 can mean 'not known')."""
    return 1 + zlib.crc32(",".join(map(str, selected)).encode())


def shard_fingerprint(batch: int, length: int, bounds) -> int:
    """A CRC32 (>= 1) of a rank's batch size, local length and chunk bounds [(start, end), ...]."""
    return 1 + zlib.crc32(f"{batch}|{length}|{list(bounds)}".encode())


def _member_ranks(group, members) -> list[int]:
    """The ranks, within `group`, of the processes of `members` (both process groups)."""
    if members is group:
        return list(range(dist.get_world_size(group)))
    glob = [dist.get_global_rank(members, r) for r in range(dist.get_world_size(members))]
    if group is None or group is dist.group.WORLD:
        return glob
    return [dist.get_group_rank(group, g) for g in glob]


def agree_step(engine: str, group, *, error: BaseException | None, num_chunks: int,
               fingerprint: int = 0, shard: tuple[int, int] = (0, 0)) -> StepAgreement:
    """The step's agreement (module docstring); raises on every rank if any rank's `error` is set.

    error: the exception this rank's local preparation raised (None: it passed).
    shard: (shard_fingerprint, local length) of this rank's input, (0, 0) when not known."""
    if group is None:
        if error is not None:
            raise error
        return StepAgreement(True, num_chunks, num_chunks)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    vec = torch.zeros(3 * world + 4, dtype=torch.int64)
    if error is not None:
        vec[rank] = 1
        num_chunks = fingerprint = 0
        shard = (0, 0)
    vec[world:world + 4] = torch.tensor([num_chunks, -num_chunks, fingerprint, -fingerprint], dtype=torch.int64)
    vec[world + 4 + 2 * rank:world + 6 + 2 * rank] = torch.tensor(shard, dtype=torch.int64)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
    failed = [r for r in range(world) if vec[r] != 0]
    if failed:
        _raise_everywhere(engine, group, rank, world, failed, error)
    hi, neg_lo, fp_hi, neg_fp_lo = (int(x) for x in vec[world:world + 4])
    shards = tuple((int(vec[world + 4 + 2 * r]), int(vec[world + 5 + 2 * r])) for r in range(world))
    return StepAgreement(uniform=hi == -neg_lo and fp_hi == -neg_fp_lo, min_chunks=-neg_lo, max_chunks=hi,
                         shards=shards)


def _raise_everywhere(engine, group, rank, world, failed, error):
    """Every rank raises the first failing rank's exception type with every failure named."""
    mine = None if error is None else (type(error), str(error))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    parts = [f"rank {r}: {gathered[r][1]}" for r in failed if gathered[r] is not None]
    msg = (f"seqwrap.{engine}: the input of rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} "
           f"was refused, so no rank ran this step (every rank raises this): " + "; ".join(parts))
    cls = gathered[failed[0]][0] if gathered[failed[0]] is not None else RuntimeError
    try:
        exc = cls(msg)
    except Exception:  # an exception type that does not take one message
        exc = RuntimeError(msg)
    if error is not None:
        raise exc from error
    raise exc
