"""How many bytes of optimizer state a model needs: measured on a built optimizer, or estimated
from shapes alone (on the ``meta`` device: nothing is allocated), for benchmarks and dry runs.

The rule is the base's :meth:`~shardflow.optim.base.ShardFlowOptimizer.state_bytes`: every state
tensor with more than one element counts ``numel × element_size`` bytes (0-d step counters and
scalars do not); bytes per parameter divide by the parameter elements the state serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class StateFootprint:
    """Optimizer state of one rank."""

    state_bytes: int
    """Bytes of state tensors with more than one element."""
    param_elements: int
    """Elements of the parameters that state serves."""
    by_key: dict[str, int] = field(default_factory=dict)
    """Bytes per state key (e.g. ``exp_avg_sign``)."""

    @property
    def bytes_per_param(self) -> float:
        return self.state_bytes / self.param_elements if self.param_elements else 0.0

    def describe(self) -> str:
        """One line per state key, then the total."""
        lines = [f"  {k}: {v:,} B" for k, v in sorted(self.by_key.items())]
        lines.append(
            f"  total: {self.state_bytes:,} B for {self.param_elements:,} params "
            f"= {self.bytes_per_param:.4f} B/param"
        )
        return "\n".join(lines)


def state_footprint(optimizer: torch.optim.Optimizer) -> StateFootprint:
    """The state ``optimizer`` holds now (on this rank, for a ShardFlow optimizer)."""
    placement = getattr(optimizer, "placement", None)
    local = placement.local if placement is not None else (lambda t: t)
    owns = placement.owns if placement is not None else (lambda p: True)
    by_key: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.numel() > 1:
                by_key[key] = by_key.get(key, 0) + local(value).numel() * value.element_size()
    params = sum(local(p).numel() for g in optimizer.param_groups for p in g["params"] if owns(p))
    return StateFootprint(sum(by_key.values()), params, by_key)


def estimate_state_footprint(
    factory: Callable[..., torch.optim.Optimizer],
    shapes: Mapping[str, Sequence[int]] | Iterable[Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
    **hyper: Any,
) -> StateFootprint:
    """Build ``factory(params, **hyper)`` over ``meta`` parameters of these shapes and measure it.

    ShardFlow optimizers create state at construction; an optimizer that creates it lazily
    (``torch.optim.AdamW``) is stepped once on zero ``meta`` gradients first. Nothing is
    allocated either way.
    """
    values = shapes.values() if isinstance(shapes, Mapping) else shapes
    params = [torch.nn.Parameter(torch.empty(tuple(s), dtype=dtype, device="meta")) for s in values]
    optimizer = factory(params, **hyper)
    if not any(optimizer.state.values()):
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    return state_footprint(optimizer)
