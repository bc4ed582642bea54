"""Placements: single process, DDP-aware owner plan, FSDP2-aware sharded state."""

from shardflow.distributed.placement import LocalPlacement, resolve_placement

__all__ = ["LocalPlacement", "resolve_placement"]
