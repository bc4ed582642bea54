"""WhiteFlow: ⊥Grad, bf16 momentum and channel-wise Adam scaling from a seeded low-rank sketch.

The update rule, for one parameter ``W`` of shape ``(rows, n)`` (tensors of more dims are viewed
as ``(out, rest)``) with gradient ``G`` (after global clipping), step ``t``:

1. **⊥Grad** (hidden matrices, ``ortho_mode="vector"``): per row, ``g ← g − (⟨g,w⟩/‖w‖²)·w``,
   rescaled to the row's original norm (Prieto et al., arXiv 2501.04697). Row-wise, so shard-local.
2. **Momentum**: ``m ← β₁·m + (1−β₁)·g``, stored in bf16 with stochastic rounding;
   ``M̂ = m / (1 − β₁ᵗ)`` (the update uses the fp32 value before rounding).
3. **Second moment with a warm-up** ("car suspension", whiteflow-design.md):
   ``β₂ₜ = min(β₂, 0.9 + 0.099·t/100)`` and bias correction by the weight the EMA has
   accumulated, ``cₜ = 1 − ∏_{s≤t} β₂ₛ`` (:func:`second_moment_weight`).
4. **Channel scale** ``sᵢ`` per row ``i``, the gain Adam's element-wise normalization would give
   that row — computed one of two ways (``second_moment``):

   - ``"projected"`` (APOLLO-style, Zhu et al., arXiv 2412.05270): with the seeded projection
     ``P`` (``n × r``, entries ``N(0, 1/r)``, ``r = min(rank, n)``, regenerated every
     ``proj_update_freq`` steps from ``(seed, n, r, refresh index)``, see
     :mod:`shardflow.optim.projection`): ``R = g·P``, ``V_R ← β₂ₜ·V_R + (1−β₂ₜ)·R²`` (stored,
     ``rows × r``, bf16), ``M_R = M̂·P`` (recomputed, not stored: it is the projected momentum
     under the *current* ``P``, so a refresh needs no reset), ``R̃ = M_R / (√(V_R/cₜ) + eps)``,
     and ``sᵢ = √(n/r) · ‖R̃ᵢ‖ / ‖M_R,ᵢ‖``. ``√(n/r)`` turns the norm of an ``r``-wide normalized
     row into that of an ``n``-wide one (each normalized entry is O(1)).
   - ``"dense"`` (the design's bf16 second moment): ``V ← β₂ₜ·V + (1−β₂ₜ)·g²`` (stored, full
     size, bf16), ``Ũ = M̂ / (√(V/cₜ) + eps)`` and ``sᵢ = ‖Ũᵢ‖ / ‖M̂ᵢ‖`` — the exact value the
     projected variant estimates.

   ``sᵢ = 0`` where the momentum row is zero.
5. **Direction** ``u = s ⊙ M̂`` (each row of the momentum scaled by its channel scale). On step 1
   every row of ``u`` has an RMS of 1 (exactly for ``"dense"``, up to the sketch's error for
   ``"projected"``), so ``lr`` is the RMS of the weight change, as with Adam.
6. **Norm-growth limiter** (``norm_growth_limit=γ``, APOLLO): if ``‖uₜ‖ > γ·‖uₜ₋₁‖``, scale
   ``uₜ`` to ``γ·‖uₜ₋₁‖`` (norms over the whole parameter: one batched reduction over shards).
7. **Apply**: ``W ← W·(1 − η·λ) − η·u`` with ``η = lr``, or with ``shape_lr_scaling``
   ``η = lr · 2/(rows + n)`` for hidden matrices (SPlus, arXiv 2506.07254).

**Fallback** — 1-D parameters, embeddings and heads (by name, see
:mod:`shardflow.optim.routing`) and groups with ``ortho_mode=None``: Adam with the same bf16
momentum, the same warmed-up bf16 second moment ``v`` and ``u = M̂ / (√(v/cₜ) + eps)``; no ⊥Grad,
no projection.

**State and memory** (bytes per parameter, fp32/bf16 params): momentum 2; second moment 2
(``"dense"`` and fallback) or ``2·r/n`` (``"projected"``); a step counter and the last update
norm (0-d). AdamW keeps 8. Projections are not state: they are regenerated from the group's
``seed``; :meth:`WhiteFlow.projection_bytes` reports the cache (one ``n × r`` matrix per distinct
width). Float64 parameters keep float64 states, rounded nowhere (the reference path).

**World-size invariance.** Everything is row-local except the limiter's norms (summed over
shards). Stochastic-rounding noise is a function of ``(seed, parameter index, step, state,
global row block)`` — never of the shard — so 1, 2 or 4 ranks round identically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from shardflow.optim._listops import ListOps
from shardflow.optim._validate import (
    check_bool,
    check_choice,
    check_nonnegative,
    check_unit_interval,
)
from shardflow.optim.base import Item, Layout, ShardFlowOptimizer, step_counter
from shardflow.optim.orthogonalize import orthograd_
from shardflow.optim.precision import bf16_stochastic, hash32_int, mix_seed
from shardflow.optim.projection import ProjectionCache
from shardflow.optim.routing import is_hidden_matrix

SECOND_MOMENTS = ("projected", "dense")
ORTHO_MODES = ("vector", None)
_SR_EXP_AVG, _SR_EXP_AVG_SQ = 1, 2
"""lowbias32's multipliers (precision.py), as signed int32."""
"""Stochastic-rounding streams (mixed into the seed with the param index and step)."""


def beta2_at(beta2: float, t: int) -> float:
    """The warmed-up second-moment coefficient ``min(β₂, 0.9 + 0.099·t/100)`` at step ``t``."""
    return min(beta2, 0.9 + 0.099 * t / 100)


def second_moment_weight(beta2: float, t: int) -> float:
    """``1 − ∏_{s=1..t} β₂ₛ``: the weight the warmed-up EMA has accumulated (its bias correction)."""
    prod, s = 1.0, 1
    while s <= t:
        b = beta2_at(beta2, s)
        if b >= beta2:  # constant from here on
            prod *= beta2 ** (t - s + 1)
            break
        prod *= b
        s += 1
    return 1.0 - prod


class WhiteFlow(ShardFlowOptimizer):
    """WhiteFlow. See the module docstring for the update rule and the memory it keeps.

    Args:
        params: parameters, named parameters or param groups (any key below but
            ``projection_device`` may be set per group).
        lr: learning rate: the RMS of the weight change per step.
        betas: ``(β₁, β₂)``: momentum and (final) second-moment coefficients.
        eps: added to the square root of the second moment.
        weight_decay: decoupled weight decay (multiplied by the step size).
        rank: projection rank ``r`` (capped at the matrix's column count).
        proj_update_freq: steps between projection refreshes.
        second_moment: ``"projected"`` (``rows × r`` state) or ``"dense"`` (full-size state).
        ortho_mode: ``"vector"`` (⊥Grad and channel scaling for hidden matrices) or ``None``
            (the whole group uses the element-wise fallback).
        norm_growth_limit: APOLLO's limiter γ (e.g. 1.01), or None to disable.
        shape_lr_scaling: multiply the lr of hidden matrices by ``2/(rows + cols)`` (SPlus).
        seed: seed of the projections and of the stochastic-rounding noise.
        stochastic_rounding: round bf16 states stochastically (False: to nearest).
        gradient_clipping: global gradient-norm bound (None: off).
        projection_device: ``"param"`` (projections cached on the parameter's device) or
            ``"cpu"`` (cached in CPU memory, pinned when CUDA is available, and moved to the
            compute device only while used).
        process_group: ProcessGroup or 1-D DeviceMesh to shard over; None: one process.
        foreach: use ``torch._foreach_*`` kernels (None: when all tensors share a device).
        compiled: run each parameter's direction (:func:`whiteflow_direction`) through
            ``torch.compile`` (None: on CUDA only; on a CPU inductor emits C++).
    """

    state_layout: ClassVar[dict[str, Layout]] = {
        "step": "replicated",
        "exp_avg": "rows",
        "exp_avg_sq": "rows",
        "exp_avg_sq_proj": "rows",
        "update_norm": "replicated",
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rank: int = 256,
        proj_update_freq: int = 20,
        second_moment: str = "projected",
        ortho_mode: str | None = "vector",
        norm_growth_limit: float | None = None,
        shape_lr_scaling: bool = False,
        seed: int = 0,
        stochastic_rounding: bool = True,
        gradient_clipping: float | None = 1.0,
        *,
        projection_device: str = "param",
        process_group: Any = None,
        foreach: bool | None = None,
        compiled: bool | None = None,
    ) -> None:
        self.projections = ProjectionCache(projection_device)
        self.projection_device = projection_device
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            proj_update_freq=proj_update_freq,
            second_moment=second_moment,
            ortho_mode=ortho_mode,
            norm_growth_limit=norm_growth_limit,
            shape_lr_scaling=shape_lr_scaling,
            seed=seed,
            stochastic_rounding=stochastic_rounding,
        )
        self._names: dict[Tensor, str] = {}
        self._index: dict[Tensor, int] = {}
        if compiled is not None and not isinstance(compiled, bool):
            raise ValueError(
                f"compiled={compiled!r} is invalid: pass True, False or None (compile on CUDA only)."
            )
        self._compiled = compiled
        self._hyper_cache: tuple[Any, Tensor | None] = (None, None)
        super().__init__(
            params,
            defaults,
            process_group=process_group,
            foreach=foreach,
            gradient_clipping=gradient_clipping,
        )

    # -- validation and state ---------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        if not isinstance(group["lr"], (int, float)) or not group["lr"] >= 0:
            raise ValueError(
                f"lr={group['lr']!r} is invalid: pass a learning rate >= 0, e.g. 1e-3."
            )
        betas = group["betas"]
        if not isinstance(betas, tuple) or len(betas) != 2:
            raise ValueError(f"betas={betas!r} is invalid: pass (beta1, beta2), e.g. (0.9, 0.999).")
        check_unit_interval("betas[0]", betas[0])
        check_unit_interval("betas[1]", betas[1])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        rank = group["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(
                f"rank={rank!r} is invalid: pass an integer >= 1 (the projection rank; "
                "it is capped at each matrix's column count), e.g. 256."
            )
        freq = group["proj_update_freq"]
        if not isinstance(freq, int) or isinstance(freq, bool) or freq < 1:
            raise ValueError(
                f"proj_update_freq={freq!r} is invalid: pass a positive integer number of steps "
                "between projection refreshes, e.g. 20."
            )
        check_choice("second_moment", group["second_moment"], SECOND_MOMENTS)
        check_choice("ortho_mode", group["ortho_mode"], ORTHO_MODES)
        gamma = group["norm_growth_limit"]
        if gamma is not None and (
            not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma > 1
        ):
            raise ValueError(
                f"norm_growth_limit={gamma!r} is invalid: pass a number > 1 (APOLLO uses 1.01) "
                "or None to disable the limiter."
            )
        check_bool("shape_lr_scaling", group["shape_lr_scaling"])
        check_bool("stochastic_rounding", group["stochastic_rounding"])
        if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
            raise ValueError(f"seed={group['seed']!r} is invalid: pass an integer, e.g. 0.")

    def _init_state(self, param: Tensor, local: Tensor, group: dict[str, Any], state: dict) -> None:
        names = group.get("param_names")
        if names:
            self._names[param] = names[next(i for i, p in enumerate(group["params"]) if p is param)]
        dtype = torch.float64 if local.dtype == torch.float64 else torch.bfloat16
        state["step"] = step_counter()
        state["exp_avg"] = torch.zeros_like(local, dtype=dtype)
        if self.route(param, group) == "projected":
            r = self.proj_rank(param, group)
            state["exp_avg_sq_proj"] = torch.zeros(
                local.shape[0], r, dtype=dtype, device=local.device
            )
        else:
            state["exp_avg_sq"] = torch.zeros_like(local, dtype=dtype)
        state["update_norm"] = torch.zeros((), dtype=torch.float32)

    def route(self, param: Tensor, group: dict[str, Any]) -> str:
        """``"projected"``, ``"dense"`` (channel-scaled hidden matrix) or ``"elementwise"``."""
        if group["ortho_mode"] is None or not is_hidden_matrix(param, self._names.get(param)):
            return "elementwise"
        return group["second_moment"]

    def proj_rank(self, param: Tensor, group: dict[str, Any]) -> int:
        """The projection rank used for ``param``: ``min(rank, columns)``."""
        return min(group["rank"], _width(self.placement.global_shape(param)))

    def param_index(self, param: Tensor) -> int:
        """Position of ``param`` among all the optimizer's parameters (the same on every rank)."""
        if param not in self._index:
            self._index = {
                p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])
            }
        return self._index[param]

    def projection_bytes(self) -> int:
        """Bytes of cached projections (regenerated from the seed, never checkpointed)."""
        return self.projections.bytes()

    # -- the step ---------------------------------------------------------------------------

    def _after_step(self, loss: Any) -> None:
        self.projections.retain()

    def _update_group(self, group: dict[str, Any], items: list[Item], ops: ListOps) -> None:
        for it in items:
            it.state["step"] += 1
        by_step: dict[int, list[Item]] = {}
        for it in items:
            by_step.setdefault(int(it.state["step"]), []).append(it)
        for t, bucket in by_step.items():
            self._directions(group, t, bucket, ops)
        if group["norm_growth_limit"] is not None:
            self._limit_norm_growth(group, items, ops)
        self._apply(group, items, ops)

    def _directions(self, group: dict[str, Any], t: int, items: list[Item], ops: ListOps) -> None:
        """Overwrite each ``item.grad`` with the direction ``u`` (steps 1–5 of the rule).

        One call of :func:`whiteflow_direction` per parameter — eagerly, or through
        ``torch.compile`` when :attr:`compiled` says so (one fused kernel per route and shape).
        """
        for it in items:
            route = self.route(it.param, group)
            g = _rows(it.grad)
            m = _rows(it.state["exp_avg"])
            v = it.state["exp_avg_sq_proj" if route == "projected" else "exp_avg_sq"]
            v = v if route == "projected" else _rows(v)
            proj = None
            if route == "projected":
                n, r = _width(self.placement.global_shape(it.param)), v.shape[1]
                refresh = (t - 1) // group["proj_update_freq"]
                proj = self.projections.get(
                    group["seed"], n, r, refresh, device=g.device, dtype=g.dtype
                )
            rounding = group["stochastic_rounding"] and m.dtype == torch.bfloat16
            u = self._kernel(g)(
                g,
                _rows(it.local) if route != "elementwise" else g,
                m,
                v,
                proj,
                self._hyper(group, t, g),
                self._rounding_keys(group, it, t, v.shape[1]) if rounding else None,
                route=route,
            )
            it.grad = u.view_as(it.grad)

    @property
    def compiled(self) -> bool | None:
        """Run :func:`whiteflow_direction` through ``torch.compile`` (None: on CUDA only)."""
        return self._compiled

    def _kernel(self, g: Tensor):
        compiled = self._compiled if self._compiled is not None else g.device.type == "cuda"
        return _compiled_direction() if compiled else whiteflow_direction

    def _hyper(self, group: dict[str, Any], t: int, like: Tensor) -> Tensor:
        """The step's scalars as one tensor (a compiled kernel then never recompiles for them)."""
        key = (id(group), t, like.device, like.dtype)
        if self._hyper_cache[0] != key:
            beta1, beta2 = group["betas"]
            b2, weight = beta2_at(beta2, t), second_moment_weight(beta2, t)
            values = [1.0 - beta1, 1.0 / (1.0 - beta1**t), b2, 1.0 - b2, 1.0 / weight]
            hyper = torch.tensor([*values, group["eps"]], dtype=like.dtype)
            self._hyper_cache = (key, hyper.to(like.device, non_blocking=True))
        return self._hyper_cache[1]

    def _rounding_keys(self, group: dict[str, Any], it: Item, t: int, v_width: int) -> Tensor:
        """``[key_m, offset_m, key_v, offset_v]`` for :func:`bf16_stochastic`: the counter-based
        stream of :mod:`shardflow.optim.precision`, seeded by (seed, param index, step, state),
        at the global flat index of this shard's first element (so 1, 2 or 4 ranks agree)."""
        rows = self.placement.row_range(it.param)
        row0 = rows[0] if rows else 0
        width = _width(self.placement.global_shape(it.param))
        index = self.param_index(it.param)
        keys = [
            hash32_int(mix_seed(group["seed"], index, t, _SR_EXP_AVG)),
            row0 * width,
            hash32_int(mix_seed(group["seed"], index, t, _SR_EXP_AVG_SQ)),
            row0 * v_width,
        ]
        return torch.tensor(keys, dtype=torch.int64).to(it.grad.device, non_blocking=True)

    def _limit_norm_growth(self, group: dict[str, Any], items: list[Item], ops: ListOps) -> None:
        gamma = group["norm_growth_limit"]
        # Summed in fp64 per row (each row is whole on one rank), then over rows and shards: the
        # total does not depend on where the shard boundaries are (to fp64 rounding).
        local = [_row_norms(_rows(it.grad), torch.float64).square().sum() for it in items]
        sq = self.placement.sum_over_shards(torch.stack(local))
        scales = []
        for it, norm in zip(items, sq.double().sqrt().tolist()):
            prev = float(it.state["update_norm"])
            scale = gamma * prev / norm if prev > 0 and norm > gamma * prev else 1.0
            it.state["update_norm"].fill_(norm * scale)
            scales.append(scale)
        ops.mul_([it.grad for it in items], scales)

    def _apply(self, group: dict[str, Any], items: list[Item], ops: ListOps) -> None:
        lr = group["lr"] * group["lr_scale"]
        steps = [lr * self._shape_factor(group, it.param) for it in items]
        locals_ = [it.local for it in items]
        updates = [it.grad for it in items]
        if group["weight_decay"] and lr:
            ops.mul_(locals_, [1.0 - s * group["weight_decay"] for s in steps])
        if locals_ and locals_[0].dtype != updates[0].dtype:
            for p, u, s in zip(locals_, updates, steps):
                p.add_(u.to(p.dtype), alpha=-s)
        else:
            ops.scaled_add_(locals_, updates, [-s for s in steps])

    def _shape_factor(self, group: dict[str, Any], param: Tensor) -> float:
        """SPlus's ``2/(rows + cols)`` for hidden matrices when ``shape_lr_scaling``, else 1."""
        if not group["shape_lr_scaling"] or self.route(param, group) == "elementwise":
            return 1.0
        shape = self.placement.global_shape(param)
        return 2.0 / (shape[0] + _width(shape))


def whiteflow_direction(
    g: Tensor,
    w: Tensor,
    m: Tensor,
    v: Tensor,
    proj: Tensor | None,
    hyper: Tensor,
    keys: Tensor | None,
    *,
    route: str,
) -> Tensor:
    """The direction ``u`` of one parameter (steps 1–5 of the module docstring); updates ``m, v``.

    ``g`` (fp32/fp64, clipped), ``w``, ``m`` and (dense) ``v`` are ``(rows, n)`` views; ``v`` is
    ``(rows, r)`` and ``proj`` ``(n, r)`` for ``route="projected"``. ``hyper`` holds
    ``[1−β₁, 1/(1−β₁ᵗ), β₂ₜ, 1−β₂ₜ, 1/cₜ, eps]``; ``keys`` the stochastic-rounding keys
    (:meth:`WhiteFlow._rounding_keys`) or None to round to nearest. Written as one pure function so
    that ``torch.compile`` can fuse it; eager it runs op by op.
    """
    one_minus_b1, corr1, b2, one_minus_b2, inv_weight, eps = hyper.unbind()
    if route != "elementwise":
        g = orthograd_(g.clone(), w, rowwise=True, restore_norm=True)
    mom = m.to(g.dtype, copy=True).lerp_(g, one_minus_b1)
    _store(m, mom, keys, 0)
    mhat = mom.mul_(corr1)
    if route == "projected":
        g = g @ proj
        mhat_p = mhat @ proj
    sq = v.to(g.dtype, copy=True).mul_(b2).addcmul_(g, g, value=one_minus_b2)
    _store(v, sq, keys, 2)
    denom = sq.mul_(inv_weight).sqrt_().add_(eps)
    if route == "elementwise":
        return mhat.div_(denom)
    adapted = (mhat_p if route == "projected" else mhat) / denom
    ref = mhat_p if route == "projected" else mhat
    scale = _ratio(_row_norms(adapted), _row_norms(ref))
    if route == "projected":
        scale = scale * math.sqrt(mhat.shape[1] / proj.shape[1])
    return mhat.mul_(scale.unsqueeze(1))


def _store(dst: Tensor, value: Tensor, keys: Tensor | None, at: int) -> None:
    """``dst ← value``, rounded stochastically with ``keys[at], keys[at + 1]`` when given."""
    if keys is None:
        dst.copy_(value)
    else:
        dst.copy_(bf16_stochastic(value, keys[at], keys[at + 1]))


_COMPILED: list[Any] = []


def _compiled_direction():
    if not _COMPILED:
        _COMPILED.append(torch.compile(whiteflow_direction, dynamic=None))
    return _COMPILED[0]


def _rows(t: Tensor) -> Tensor:
    """The ``(out, rest)`` view (0-row shards included); a 0-d tensor is one row."""
    return t.reshape(t.shape[0], _width(t.shape)) if t.ndim >= 1 else t.reshape(1, 1)


def _row_norms(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.linalg.vector_norm(t.to(dtype) if dtype else t, dim=1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    tiny = torch.finfo(den.dtype).tiny
    return torch.where(den > 0, num / den.clamp_min(tiny), torch.zeros_like(num))


def _width(shape: torch.Size) -> int:
    """Columns of the ``(out, rest)`` view of a parameter of this shape."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1
