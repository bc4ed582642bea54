"""Replica divergence check: do the ranks that should hold the same bits still hold them?

Under HSDP every replica (one per node, say) holds the same shard of every parameter and
computes the same update from the same gradient shard, so the replicas agree bit for bit by
construction (:mod:`shardflow.distributed.sharded`). Under the DDP-aware owner plan every rank
holds every parameter whole after the step's all-gather. Nothing in a step compares them, so a
fault (a flipped bit, a rank that skipped a step, nondeterministic code) would spread silently.

:func:`check_replicas` compares them cheaply: per parameter, two 64-bit integer checksums of the
local tensor's bits (the sum of its 32-bit words, and the sum weighted by position, so that a
change and a swap both show), and **one** ``all_reduce(MAX)`` of ``[c, −c]`` over the replicas'
group: a parameter differs where the maximum and the minimum disagree. Every rank learns the
same result, and :class:`ReplicaDivergence` names the first parameter that differs (in
parameter order) on every rank (under HSDP a second all-reduce of one flag per parameter over
the shard group tells the other shards' ranks too, so that no rank goes on alone). Cost: one
read of this rank's parameters and one all-reduce of ``4·P`` int64 values (P parameters; HSDP:
and one of ``P``), never of the weights.

:class:`ReplicaCheck` runs it every ``every`` steps (the runtime does, by default; the library
does nothing unless asked).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from shardflow.distributed.placement import plan_inputs

_WEIGHTS = 65521
"""Position weights cycle through 1 .. 65521 (a prime): word k weighs ``k % 65521 + 1``."""


class ReplicaDivergence(RuntimeError):
    """The replicas of a parameter no longer hold the same bits."""


def replica_group(optimizer: torch.optim.Optimizer):
    """The group of ranks holding the same bits as this one under ``optimizer``'s placement:
    the replicate group under HSDP, every rank of the DDP-aware owner plan; None where no other
    rank holds a copy (one process, 1-D FSDP2)."""
    placement = getattr(optimizer, "placement", None)
    if placement is None:
        return None
    if hasattr(placement, "replicate_group"):
        return placement.replicate_group
    if hasattr(placement, "grads_reduced"):  # DDP-aware: parameters whole on every rank
        return placement.group
    return None


def checksums(tensors: list[Tensor], chunk: int = 1 << 24) -> Tensor:
    """``(len(tensors), 2)`` int64 on the tensors' device: per tensor, the sum of its 32-bit
    words and their sum weighted by position (bytes zero-padded to whole words; int64 wraps,
    the same way on every rank). Read ``chunk`` words at a time (no full-size copy)."""
    device = tensors[0].device if tensors else torch.device("cpu")
    out = torch.zeros(len(tensors), 2, dtype=torch.int64, device=device)
    for i, t in enumerate(tensors):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = (-raw.numel()) % 4
        if pad:
            raw = torch.cat([raw, raw.new_zeros(pad)])
        words = raw.view(torch.int32)
        for start in range(0, words.numel(), chunk):
            part = words[start : start + chunk].to(torch.int64)
            weights = torch.arange(start, start + part.numel(), device=device) % _WEIGHTS + 1
            out[i, 0] += part.sum()
            out[i, 1] += (part * weights).sum()
    return out


def differing(tensors: list[Tensor], group, spread=None) -> list[int]:
    """Indices of ``tensors`` whose bits differ between the ranks of ``group``: one all-reduce.
    ``spread``: a second group (HSDP: the shard group) that learns every finding too, with one
    all-reduce of one flag per tensor, so that the list is the same on every rank of both."""
    local = checksums(tensors)
    both = torch.cat([local, -local], dim=1)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    flags = (both[:, :2] != -both[:, 2:]).any(dim=1).to(torch.int64)
    if spread is not None and dist.get_world_size(spread) > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=spread)
    return [i for i, f in enumerate(flags.tolist()) if f]


def check_replicas(
    optimizer: torch.optim.Optimizer, group=None, names: Mapping[Tensor, str] | None = None
) -> None:
    """Raise :class:`ReplicaDivergence` on every rank when the replicas of any of
    ``optimizer``'s parameters hold different bits, naming the first one (parameter order).

    ``group``: the replicas' group (default :func:`replica_group`); nothing is checked, and no
    collective is called, where there is none. ``names``: parameter → name (e.g. from
    ``model.named_parameters()``), for param groups without ``param_names``."""
    group = group if group is not None else replica_group(optimizer)
    if group is None or dist.get_world_size(group) == 1:
        return
    params, listed, _ = plan_inputs(optimizer.param_groups)
    names = [names.get(p, n) for p, n in zip(params, listed)] if names else listed
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    placement = getattr(optimizer, "placement", None)
    spread = placement.group if getattr(placement, "replicate_group", None) is group else None
    bad = differing(local, group, spread)
    if bad:
        ranks = dist.get_process_group_ranks(group)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ReplicaDivergence(
            f"parameter {names[bad[0]]!r} differs between the replicas (global ranks {ranks}) "
            f"that should hold the same bits{more}: a rank skipped or repeated a step, loaded "
            "other weights, or ran nondeterministic code. Resume every rank from the last "
            "checkpoint."
        )


class ReplicaCheck:
    """Call after each ``optimizer.step()``: runs :func:`check_replicas` every ``every`` steps
    (``every=0``: never)."""

    def __init__(self, optimizer: torch.optim.Optimizer, every: int) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(
                f"every={every!r} is invalid: pass a step count >= 1 (check every that many "
                "steps) or 0 (never)."
            )
        self.optimizer = optimizer
        self.every = every
        self.steps = 0

    def __call__(self) -> None:
        self.steps += 1
        if self.every and self.steps % self.every == 0:
            check_replicas(self.optimizer)
