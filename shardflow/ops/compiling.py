"""How ShardFlow's optimizers run their element-wise passes through ``torch.compile``.

A pass is written as a function of lists of tensors (``fn(ws, gs, ...)``, one loop over the
parameters of a chunk) and called through :func:`each`: the lists are cut into chunks of at
most :data:`CHUNK` parameters and every chunk is one compiled call. The compiled functions are
built once per Python function (:func:`compile_once`), with dynamic shapes: one graph per list
length and per static variant (keyword flags, dtypes, with or without optional tensors),
whatever the parameters' shapes.

Graphs are built under :func:`compile_settings`, which :meth:`ShardFlowOptimizer.step
<shardflow.optim.base.ShardFlowOptimizer.step>` enters once per step when the optimizer may
compile (entering it costs ~0.1 ms; once per compiled call, that was ~10 % of a small model's
step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

CHUNK = 8
"""Most parameters per compiled call. Each call costs Python, guard checks and dispatch (~0.1 ms
on a 2-core CPU; on the tiny-model row of ``python -m bench.step_parts`` the compiled step's
overhead halved when calls were batched); each list length is a graph of its own, so a list
is cut into full chunks and one shorter remainder: at most ``CHUNK`` lengths, and in practice
one or two per pass for a given model."""


def each(fn: Callable[..., Any], *lists: list[Any] | None, **kwargs: Any) -> list[Any]:
    """``fn`` compiled, called on the lists cut into chunks of :data:`CHUNK` (all lists cut
    alike; a None in place of a list is passed as None); returns the concatenated results
    (``fn`` returns a list, or None)."""
    compiled = compile_once(fn)
    out: list[Any] = []
    n = len(next(x for x in lists if x is not None))
    for start in range(0, n, CHUNK):
        cut = slice(start, start + CHUNK)
        out += compiled(*(None if x is None else x[cut] for x in lists), **kwargs) or []
    return out


_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}


def compile_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` through ``torch.compile``, built once (dynamic shapes, whole graph)."""
    if fn not in _COMPILED:
        # cpp.dynamic_threads: inductor's CPU code otherwise decides at compile time, from the
        # first call's sizes, whether a loop runs on one thread or all; a graph first built for
        # a small parameter then ran a 28 M-element embedding on one thread
        _COMPILED[fn] = torch.compile(
            fn, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True}
        )
    return _COMPILED[fn]


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """Dynamo settings for the compiled passes, read when a graph is built: no duck shaping (a
    square first matrix would tie rows to columns in the guards and recompile for every other
    shape), and room for more variants per function than dynamo's default of 8 graphs."""
    from torch._dynamo import config as dynamo_config  # noqa: PLC0415
    from torch.fx.experimental import _config as shape_config  # noqa: PLC0415

    with shape_config.patch(use_duck_shape=False), dynamo_config.patch(recompile_limit=64):
        yield
