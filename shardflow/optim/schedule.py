"""A loss-aware learning-rate controller that composes with torch LR schedulers.

Torch schedulers own ``group["lr"]``. This controller owns a separate multiplier,
``group["lr_scale"]`` (1.0 to start), which every ShardFlow optimizer applies on top:
the effective learning rate is ``lr × lr_scale``. The two never overwrite each other, so a
warm-up + cosine schedule keeps its shape while the controller lowers the level when the loss
stalls.

Rule: keep an exponential moving average of the observed loss (``smoothing``). When the average
has not improved on its best value by a relative ``threshold`` for ``patience`` observations,
multiply ``lr_scale`` by ``factor`` (never below ``min_scale``) and start counting again.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shardflow.optim._validate import (
    check_int_at_least,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)


class LossAwareSchedule:
    """Lower ``lr_scale`` of every param group when the smoothed loss stops improving."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        patience: int = 10,
        factor: float = 0.5,
        threshold: float = 1e-3,
        min_scale: float = 1e-2,
        smoothing: float = 0.9,
    ) -> None:
        check_int_at_least("patience", patience, 1)
        if not isinstance(factor, (int, float)) or not 0 < factor < 1:
            raise ValueError(f"factor={factor!r} is invalid: pass a number in (0, 1), e.g. 0.5.")
        check_nonnegative("threshold", threshold)
        check_positive("min_scale", min_scale)
        check_unit_interval("smoothing", smoothing)
        self.optimizer = optimizer
        self.patience = patience
        self.factor = factor
        self.threshold = threshold
        self.min_scale = min_scale
        self.smoothing = smoothing
        self.average: float | None = None
        self.best = math.inf
        self.stalled = 0
        for group in optimizer.param_groups:
            group.setdefault("lr_scale", 1.0)

    @property
    def scale(self) -> float:
        """The current multiplier (the same for every group)."""
        return float(self.optimizer.param_groups[0]["lr_scale"])

    def observe(self, loss: float | torch.Tensor) -> float:
        """Record one loss value; returns the (possibly lowered) ``lr_scale``."""
        value = float(loss)
        if not math.isfinite(value):
            return self.scale
        s = self.smoothing
        self.average = value if self.average is None else s * self.average + (1 - s) * value
        if self.average < self.best * (1 - self.threshold):
            self.best = self.average
            self.stalled = 0
        else:
            self.stalled += 1
        if self.stalled >= self.patience:
            self.stalled = 0
            for group in self.optimizer.param_groups:
                group["lr_scale"] = max(self.min_scale, group["lr_scale"] * self.factor)
        return self.scale

    def state_dict(self) -> dict[str, Any]:
        return {
            "average": self.average,
            "best": self.best,
            "stalled": self.stalled,
            "scales": [g["lr_scale"] for g in self.optimizer.param_groups],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average, self.best, self.stalled = state["average"], state["best"], state["stalled"]
        for group, scale in zip(self.optimizer.param_groups, state["scales"]):
            group["lr_scale"] = scale
