"""The few collectives a checkpoint needs: one ``all_gather`` of small Python objects per phase.

Save and load exchange only metadata (names, shapes, row ranges, digests, error messages) —
never tensor data: every rank reads and writes its own bytes. Each phase ends with an
``all_gather`` of every rank's status, so an error on one rank is raised on all of them (no rank
is left waiting in a collective, and no rank assigns anything when another refused).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch.distributed as dist


@runtime_checkable
class Comm(Protocol):
    """What save/load need from a process group."""

    rank: int
    world_size: int

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        ...


class SingleComm:
    """One process."""

    rank = 0
    world_size = 1

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]


class TorchComm:
    """A ``torch.distributed`` process group (``all_gather_object``: metadata only)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def resolve_comm(process_group: Any, optimizer: Any) -> Comm:
    """The group to coordinate over.

    ``process_group`` if given (a ProcessGroup, a 1-D DeviceMesh, a 2-D HSDP mesh over every
    rank: the default group, or a :class:`Comm`); else the
    optimizer's ``process_group``; else the default group when ``torch.distributed`` is
    initialized (replicated training: ranks holding identical copies write them once, shared out
    between ranks); else one process.
    """
    group = process_group
    if group is None and optimizer is not None:
        group = getattr(optimizer, "process_group", None)
    if isinstance(group, Comm):
        return group
    if group is not None:
        if hasattr(group, "get_group"):  # DeviceMesh
            if group.ndim == 2 and sorted(group.mesh.flatten().tolist()) == list(
                range(dist.get_world_size())
            ):  # HSDP over every rank: replicas' identical rows are written once
                return TorchComm(None)
            if group.ndim != 1:
                raise ValueError(
                    f"process_group={group!r} is a {group.ndim}-D DeviceMesh: pass a 1-D mesh "
                    "(the dimension the state is sharded over) or a 2-D HSDP mesh over every rank."
                )
            group = group.get_group()
        return TorchComm(group)
    if dist.is_available() and dist.is_initialized():
        return TorchComm(None)
    return SingleComm()
