"""List arithmetic with two implementations: ``torch._foreach_*`` kernels and a plain loop.

Update rules are written once against :class:`ListOps`; the optimizer decides which
implementation runs (``foreach=None`` picks foreach where every tensor is on one device). The
loop path is the reference the tests compare the foreach path against in float64.

A :class:`ListOps` is also the step's backend choice (:func:`shardflow.ops.backend.choose`, once
per step): besides ``foreach`` it says whether element-wise passes go through ``torch.compile``
(``compiled``) and whether native CPU kernels may run (``native``; each kernel still checks that
it takes the tensors at hand).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Scalars = float | Sequence[float]


def _each(values: Scalars, n: int) -> Sequence[float]:
    return [values] * n if isinstance(values, (int, float)) else values


class ListOps:
    """In-place and out-of-place arithmetic over lists of tensors."""

    def __init__(self, foreach: bool, *, compiled: bool = False, native: bool = False) -> None:
        self.foreach = foreach
        self.compiled = compiled
        """Element-wise passes run through ``torch.compile`` (:mod:`shardflow.ops.compiling`)."""
        self.native = native
        """Native CPU kernels may run (:mod:`shardflow.ops.native`), where they take the tensors."""

    @property
    def name(self) -> str:
        """The element-wise backend this choice prefers: ``"compiled"``, ``"native"``,
        ``"foreach"`` or ``"eager"`` (a rule falls back down this list where a backend does not
        take its tensors)."""
        if self.compiled:
            return "compiled"
        if self.native:
            return "native"
        return "foreach" if self.foreach else "eager"

    def __repr__(self) -> str:
        return f"ListOps(foreach={self.foreach}, compiled={self.compiled}, native={self.native})"

    def clone_scaled(self, xs: Sequence[Tensor], scale: float, dtype: torch.dtype) -> list[Tensor]:
        """New tensors ``x · scale`` in ``dtype`` (the scratch copy an update works in): one
        pass where no conversion is needed or ``scale`` is 1, else a conversion and an in-place
        multiply (no third tensor)."""
        if not xs:
            return []
        if scale != 1.0 and all(x.dtype == dtype for x in xs):
            return torch._foreach_mul(list(xs), scale) if self.foreach else [x * scale for x in xs]
        out = [x.to(dtype, copy=True) for x in xs]
        if scale != 1.0:
            self.mul_(out, scale)
        return out

    def mul_(self, xs: Sequence[Tensor], s: Scalars) -> None:
        if not xs:
            return
        if self.foreach:
            torch._foreach_mul_(xs, s if isinstance(s, (int, float)) else list(s))
        else:
            for x, v in zip(xs, _each(s, len(xs))):
                x.mul_(v)

    def add_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], alpha: float = 1.0) -> None:
        if not xs:
            return
        if self.foreach:
            torch._foreach_add_(xs, ys, alpha=alpha)
        else:
            for x, y in zip(xs, ys):
                x.add_(y, alpha=alpha)

    def scaled_add_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], s: Scalars) -> None:
        """``x += s · y`` with one scalar per pair."""
        if not xs:
            return
        if isinstance(s, (int, float)):
            self.add_(xs, ys, alpha=s)
        elif self.foreach:
            torch._foreach_add_(xs, torch._foreach_mul(ys, list(s)))
        else:
            for x, y, v in zip(xs, ys, s):
                x.add_(y, alpha=v)

    def lerp_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], w: Scalars) -> None:
        """``x ← x + w·(y − x)``, one weight for all or one per pair."""
        if not xs:
            return
        if self.foreach and isinstance(w, (int, float)):
            torch._foreach_lerp_(xs, ys, w)
        else:
            for x, y, v in zip(xs, ys, _each(w, len(xs))):
                x.lerp_(y, v)

    def square_ema_(self, vs: Sequence[Tensor], xs: Sequence[Tensor], beta: float) -> None:
        """``v ← β·v + (1 − β)·x²``."""
        if not vs:
            return
        if self.foreach:
            torch._foreach_mul_(vs, beta)
            torch._foreach_addcmul_(vs, xs, xs, value=1.0 - beta)
        else:
            for v, x in zip(vs, xs):
                v.mul_(beta).addcmul_(x, x, value=1.0 - beta)

    def div_by_rms_denominator_(
        self, xs: Sequence[Tensor], vs: Sequence[Tensor], v_scale: Scalars, eps: float
    ) -> None:
        """``x ← x / (√(v · v_scale) + eps)``: the Adam denominator with bias correction."""
        if not xs:
            return
        if self.foreach:
            denom = torch._foreach_mul(
                vs, v_scale if isinstance(v_scale, (int, float)) else list(v_scale)
            )
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            torch._foreach_div_(xs, denom)
        else:
            for x, v, s in zip(xs, vs, _each(v_scale, len(xs))):
                x.div_((v * s).sqrt_().add_(eps))

    def sq_norms(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """Squared L2 norm of each tensor, as 0-d fp32 (fp64 for fp64 input) tensors."""
        if not xs:
            return []
        if self.foreach:
            return [n.square() for n in torch._foreach_norm(xs)]
        return [torch.linalg.vector_norm(x).square() for x in xs]
