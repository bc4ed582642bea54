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
from shardflow.optim.orthogonalize import orthograd_, orthograd_sums
from shardflow.optim.projection import ProjectionCache, mix_seed
from shardflow.optim.routing import is_hidden_matrix

SECOND_MOMENTS = ("projected", "dense")
ORTHO_MODES = ("vector", None)
_ROW_BLOCK = 4096
"""Global rows per block of stochastic-rounding row noise."""


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
        self._generators: dict[torch.device, torch.Generator] = {}
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
        """Overwrite each ``item.grad`` with the direction ``u`` (steps 1–5 of the rule)."""
        beta1, beta2 = group["betas"]
        routes = [self.route(it.param, group) for it in items]
        self._orthograd([it for it, r in zip(items, routes) if r != "elementwise"])

        grads = [it.grad for it in items]
        moms = [it.state["exp_avg"].to(g.dtype, copy=True) for it, g in zip(items, grads)]
        ops.lerp_(moms, grads, 1.0 - beta1)
        for it, m in zip(items, moms):
            self._store(group, it, "exp_avg", m, t)
        ops.mul_(moms, 1.0 / (1.0 - beta1**t))  # M̂

        b2, weight = beta2_at(beta2, t), second_moment_weight(beta2, t)
        dense = [i for i, r in enumerate(routes) if r != "projected"]
        sq = [items[i].state["exp_avg_sq"].to(grads[i].dtype, copy=True) for i in dense]
        ops.square_ema_(sq, [grads[i] for i in dense], b2)
        for i, v in zip(dense, sq):
            self._store(group, items[i], "exp_avg_sq", v, t)
        second = dict(zip(dense, sq))

        elementwise = [i for i, r in enumerate(routes) if r == "elementwise"]
        ops.div_by_rms_denominator_(
            [moms[i] for i in elementwise],
            [second[i] for i in elementwise],
            1.0 / weight,
            group["eps"],
        )
        for i, (it, route) in enumerate(zip(items, routes)):
            if route == "dense":
                scale = _dense_channel_scale(moms[i], second[i], weight, group["eps"])
            elif route == "projected":
                scale = self._projected_channel_scale(group, it, moms[i], t, b2, weight)
            else:
                continue
            _rows(moms[i]).mul_(scale.unsqueeze(1))
        for it, u in zip(items, moms):
            it.grad = u

    def _orthograd(self, items: list[Item]) -> None:
        for it in items:
            if it.grad.numel() == 0:  # an empty shard
                continue
            sums = orthograd_sums(it.grad, it.local, rowwise=True)
            orthograd_(it.grad, it.local, rowwise=True, restore_norm=True, sums=sums)

    def _projected_channel_scale(
        self, group: dict[str, Any], it: Item, mhat: Tensor, t: int, b2: float, weight: float
    ) -> Tensor:
        """``sᵢ = √(n/r)·‖R̃ᵢ‖/‖M_R,ᵢ‖``, updating the projected second moment ``V_R``."""
        n = _width(self.placement.global_shape(it.param))
        r = self.proj_rank(it.param, group)
        refresh = (t - 1) // group["proj_update_freq"]
        proj = self.projections.get(
            group["seed"], n, r, refresh, device=mhat.device, dtype=mhat.dtype
        )
        g, m = _rows(it.grad), _rows(mhat)
        projected_grad = g @ proj
        projected_mom = m @ proj
        v = it.state["exp_avg_sq_proj"].to(mhat.dtype, copy=True)
        v.mul_(b2).addcmul_(projected_grad, projected_grad, value=1.0 - b2)
        self._store(group, it, "exp_avg_sq_proj", v, t)
        adapted = projected_mom / v.div_(weight).sqrt_().add_(group["eps"])
        return _ratio(_row_norms(adapted), _row_norms(projected_mom)).mul_(math.sqrt(n / r))

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

    # -- bf16 storage -----------------------------------------------------------------------

    def _store(self, group: dict[str, Any], it: Item, key: str, value: Tensor, t: int) -> None:
        """Write ``value`` into ``state[key]``, stochastically rounded when that is bf16."""
        dst = it.state[key]
        if dst.dtype != torch.bfloat16 or not group["stochastic_rounding"]:
            dst.copy_(value)
            return
        rows = self.placement.row_range(it.param)
        noise = self._rounding_noise(
            value.shape,
            row_start=rows[0] if rows else 0,
            global_rows=_global_rows(self.placement.global_shape(it.param)),
            key=(group["seed"], self.param_index(it.param), t, key),
            device=value.device,
        )
        stochastic_round_to_bf16_(dst, value, noise)

    def _rounding_noise(
        self,
        shape: torch.Size,
        *,
        row_start: int,
        global_rows: int,
        key: tuple,
        device: torch.device,
    ) -> Tensor:
        """Uniform 16-bit integers for a tensor whose rows start at global row ``row_start``.

        ``noise[i, j] = (a[j] + b[i]) mod 2¹⁶`` with ``a`` (one value per column) and ``b`` (one
        per global row) uniform, drawn fresh for every ``key`` (which holds the step): every
        element's noise is uniform and new at each step, and the elements of a row are
        independent — all stochastic rounding needs — for ``rows + cols`` random draws instead of
        ``rows · cols`` (random numbers cost ~10 ns each on a CPU, 100× an element-wise op).
        ``b`` comes in blocks of :data:`_ROW_BLOCK` global rows, each from a generator seeded by
        ``(key, block)``; a shard slices the blocks it overlaps, so its noise does not depend on
        where the shard boundaries are.
        """
        rows = shape[0] if len(shape) else 1
        width = math.prod(shape[1:]) if len(shape) > 1 else 1
        if rows == 0 or width == 0:
            return torch.zeros(shape, dtype=torch.int32, device=device)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)

        def draw(n: int, *salt) -> Tensor:
            gen.manual_seed(mix_seed("whiteflow-rounding", *key, *salt))
            return torch.randint(0, 1 << 16, (n,), generator=gen, dtype=torch.int32, device=device)

        block = min(global_rows, _ROW_BLOCK)
        parts = []
        for b in range(row_start // block, (row_start + rows - 1) // block + 1):
            lo = max(row_start, b * block) - b * block
            hi = min(row_start + rows, (b + 1) * block) - b * block
            parts.append(draw(block, "rows", b)[lo:hi])
        per_row = parts[0] if len(parts) == 1 else torch.cat(parts)
        noise = per_row.unsqueeze(1) + draw(width, "cols").unsqueeze(0)
        return noise.bitwise_and_(0xFFFF).reshape(shape)


def stochastic_round_to_bf16_(dst: Tensor, value: Tensor, noise: Tensor) -> Tensor:
    """``dst ← bf16(value)`` rounded stochastically with ``noise`` (uniform in ``[0, 2¹⁶)``).

    Adds the noise to the 16 low bits of the fp32 bit pattern and truncates them: the magnitude
    rounds up with probability equal to the dropped fraction, so the rounding is unbiased.
    """
    bits = value.float().contiguous().view(torch.int32) + noise
    dst.copy_(bits.bitwise_and_(-65536).view(torch.float32))
    return dst


def _dense_channel_scale(mhat: Tensor, v: Tensor, weight: float, eps: float) -> Tensor:
    """``sᵢ = ‖Ũᵢ‖ / ‖M̂ᵢ‖`` with ``Ũ = M̂ / (√(v/cₜ) + eps)``."""
    adapted = mhat / (v / weight).sqrt_().add_(eps)
    return _ratio(_row_norms(_rows(adapted)), _row_norms(_rows(mhat)))


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


def _global_rows(shape: torch.Size) -> int:
    return shape[0] if len(shape) else 1
