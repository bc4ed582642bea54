"""Optimizers by name, for configs and the command line."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

OptimizerFactory = Callable[..., torch.optim.Optimizer]

_REGISTRY: dict[str, OptimizerFactory] = {"adamw": torch.optim.AdamW}


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    """Make ``factory`` available to :func:`build_optimizer` under ``name``."""
    _REGISTRY[name.lower()] = factory


def optimizer_names() -> list[str]:
    """Names :func:`build_optimizer` accepts, sorted."""
    return sorted(_REGISTRY)


def build_optimizer(name: str, params: Iterable[Any], **hyper: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params`` with ``hyper``."""
    key = name.lower()
    if key not in _REGISTRY:
        import difflib

        near = difflib.get_close_matches(key, _REGISTRY, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(
            f"optimizer={name!r} is not known.{hint} Choose one of {optimizer_names()}."
        )
    return _REGISTRY[key](params, **hyper)
