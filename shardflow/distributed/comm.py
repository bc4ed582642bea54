"""The few collectives the sharded placements use, and a recorder that counts what they move.

Every collective of :mod:`shardflow.distributed.sharded` goes through a function here, each
carrying a flat buffer for *all* the parameters of a step (never one call per parameter). They
call ``torch.distributed`` through the module attribute, so a test or a benchmark that wraps
``torch.distributed.all_reduce`` (say) sees every call.

:func:`record_collectives` wraps the ``torch.distributed`` collectives for the duration of a
``with`` block and logs, per call, the bytes this rank sends and receives under the usual
bandwidth-optimal accounting (ring all-reduce: ``2·n·(W−1)/W`` each way; all-gather and
reduce-scatter: ``(W−1)`` chunks each way; all-to-all: every split but one's own).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


def all_reduce_sum(values: Tensor, group, device: torch.device | None = None) -> Tensor:
    """A new tensor: the sum of ``values`` over the ranks of ``group`` (one call)."""
    out = values.detach().to(device=device or values.device, copy=True).contiguous()
    dist.all_reduce(out, group=group)
    return out.to(values.device)


def all_to_all(
    send: Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group
) -> Tensor:
    """One all-to-all on a flat buffer: ``send_splits[r]`` elements go to rank r, in rank order.

    Uneven and empty splits need no padding here (``all_to_all_single`` takes the split sizes),
    so an empty FSDP2 shard simply sends and receives 0 elements.
    """
    recv = send.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv, send, list(recv_splits), list(send_splits), group=group)
    return recv


def all_gather_bytes(chunk: Tensor, chunk_bytes: int, world_size: int, group) -> Tensor:
    """All-gather byte chunks of up to ``chunk_bytes`` each: a ``(world_size, chunk_bytes)``
    uint8 tensor, row r holding rank r's chunk (zero-padded to the common size)."""
    send = chunk.new_zeros(chunk_bytes)
    send[: chunk.numel()] = chunk
    recv = chunk.new_empty(world_size * chunk_bytes)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(recv, send, group=group)
    return recv.view(world_size, chunk_bytes)


def all_gather_object(obj, group, world_size: int) -> list:
    """Every rank's ``obj`` (pickled; construction-time checks only)."""
    out: list = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


# -- recording ------------------------------------------------------------------------------


@dataclass
class CollectiveLog:
    """Collective calls seen on this rank: ``(name, bytes sent, bytes received)`` each."""

    calls: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)

    def sent(self) -> int:
        return sum(c[1] for c in self.calls)

    def received(self) -> int:
        return sum(c[2] for c in self.calls)

    def by_name(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, _, _ in self.calls:
            out[name] = out.get(name, 0) + 1
        return out

    def clear(self) -> None:
        self.calls.clear()


def _size(group) -> int:
    return dist.get_world_size(group)


def _rank(group) -> int:
    return dist.get_rank(group)


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _accounting(name: str, a: dict) -> tuple[int, int]:
    """Bytes (sent, received) by this rank for one call, from its bound arguments ``a``."""
    group = a.get("group")
    w = _size(group)
    if name == "all_reduce":
        moved = 2 * _bytes(a["tensor"]) * (w - 1) // w
        return moved, moved
    if name == "all_to_all_single":
        out, inp = a["output"], a["input"]
        in_splits = a.get("input_split_sizes") or [inp.numel() // w] * w
        out_splits = a.get("output_split_sizes") or [out.numel() // w] * w
        me, size = _rank(group), inp.element_size()
        sent = sum(s for r, s in enumerate(in_splits) if r != me) * size
        received = sum(s for r, s in enumerate(out_splits) if r != me) * size
        return sent, received
    if name in ("all_gather_into_tensor", "all_gather_single"):
        n = _bytes(a["input_tensor"])
        return n * (w - 1), n * (w - 1)
    if name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        n = _bytes(a["output"])
        return n * (w - 1), n * (w - 1)
    if name == "broadcast":
        n = _bytes(a["tensor"])
        return n, n
    return 0, 0  # list and object collectives: counted, not sized


RECORDED = (
    "all_reduce",
    "all_to_all_single",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "all_gather_object",
    "all_to_all",
)


@contextlib.contextmanager
def record_collectives() -> Iterator[CollectiveLog]:
    """Log every ``torch.distributed`` collective called inside the block (see the module doc)."""
    log = CollectiveLog()
    saved = {}
    for name in RECORDED:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn
        signature = inspect.signature(fn)

        def wrapper(*args, __fn=fn, __name=name, __sig=signature, **kwargs):
            bound = __sig.bind(*args, **kwargs).arguments
            log.calls.append((__name, *_accounting(__name, bound)))
            return __fn(*args, **kwargs)

        setattr(dist, name, wrapper)
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
