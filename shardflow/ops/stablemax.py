"""StableMax and its cross-entropy: a softmax whose probabilities cannot round to exactly 0 or 1.

Prieto et al., "Grokking at the Edge of Numerical Stability" (arXiv 2501.04697): once a model
fits its training set, plain gradient descent keeps scaling the logits up (naïve loss
minimization) until float32 softmax rounds the correct class's probability to exactly 1; then
the loss is exactly 0, the gradient exactly 0, and learning stops (Softmax Collapse). StableMax
replaces ``exp`` by

    s(x) = x + 1        for x ≥ 0
    s(x) = 1 / (1 − x)  for x < 0

and normalizes like softmax: ``StableMax(x)ᵢ = s(xᵢ) / Σⱼ s(xⱼ)``. ``s`` grows linearly, not
exponentially, so a logit has to reach about ``1/ε`` (1.7e7 in float32) above the others for a
probability to round to 1, not about 17.

Computed as a softmax of ``log s(x)``, which is ``log1p(x)`` for ``x ≥ 0`` and ``−log1p(−x)``
for ``x < 0`` (both finite for every finite ``x``, slope ``1/(1 + |x|)``): the normalization then
runs through the max-subtracted log-sum-exp every softmax uses, so no sum of ``s`` can
overflow, and :func:`stablemax_cross_entropy` is :func:`torch.nn.functional.cross_entropy` of
``log s(x)`` with all its options (``ignore_index``, ``reduction``, ``weight``,
``label_smoothing``). Half-precision logits (bf16, fp16) are computed in float32 and the result
returned in their dtype, as ``F.cross_entropy`` returns its input's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def log_stablemax_scores(x: Tensor) -> Tensor:
    """``log s(x)`` element-wise: ``log1p(x)`` for ``x ≥ 0``, ``−log1p(−x)`` for ``x < 0``.

    Each branch only ever sees a non-negative argument (the other side is clamped to 0 before
    the ``log1p``), so neither the value nor the gradient of the branch :func:`torch.where`
    discards can be NaN; at ``x = 0`` the slope is 1, as ``s`` has.
    """
    return torch.where(x >= 0, torch.log1p(x.clamp_min(0)), -torch.log1p((-x).clamp_min(0)))


def _compute(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """StableMax probabilities along ``dim``: ``s(xᵢ) / Σⱼ s(xⱼ)``, in ``x``'s dtype."""
    return torch.softmax(log_stablemax_scores(_compute(x)), dim=dim).to(x.dtype)


def log_stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """``log StableMax(x)`` along ``dim``, in ``x``'s dtype (finite for every finite ``x``)."""
    return torch.log_softmax(log_stablemax_scores(_compute(x)), dim=dim).to(x.dtype)


def stablemax_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of StableMax probabilities: ``−log(s(x_y) / Σⱼ s(xⱼ))``.

    A drop-in for :func:`torch.nn.functional.cross_entropy` and the same arguments: ``logits``
    of shape ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)`` (classes on dim 1), ``target`` class
    indices (or class probabilities) of the matching shape; ``ignore_index`` targets contribute
    nothing, and ``reduction`` is ``"mean"`` (over the targets not ignored, weighted),
    ``"sum"`` or ``"none"``. Returns the loss in ``logits``' dtype.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"reduction={reduction!r} is invalid: pass 'mean', 'sum' or 'none' "
            "(as for F.cross_entropy)."
        )
    if not logits.is_floating_point():
        raise TypeError(
            f"logits has dtype {logits.dtype}: stablemax_cross_entropy needs floating-point "
            "logits; convert them with logits.float()."
        )
    scores = log_stablemax_scores(_compute(logits))
    w = None if weight is None else weight.to(scores.dtype)
    if target.is_floating_point():
        target = target.to(scores.dtype)
    loss = F.cross_entropy(
        scores,
        target,
        weight=w,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.to(logits.dtype)
