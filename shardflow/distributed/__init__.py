"""Placements: single process, DDP-aware owner plan, FSDP2-aware sharded state.

The sharded placements (:mod:`shardflow.distributed.sharded`) are imported only when an optimizer
is given a ``process_group``.
"""

from shardflow.distributed.comm import record_collectives
from shardflow.distributed.placement import LocalPlacement, resolve_placement
from shardflow.distributed.plan import OwnerPlan

__all__ = ["LocalPlacement", "OwnerPlan", "record_collectives", "resolve_placement"]
