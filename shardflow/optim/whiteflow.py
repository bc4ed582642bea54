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
     :mod:`shardflow.ops.projection`): ``R = g·P``, ``V_R ← β₂ₜ·V_R + (1−β₂ₜ)·R²`` (stored,
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

**Implementations** (:meth:`WhiteFlow._step_items`): native CPU kernels by default on the CPU
(fp32 weights, bf16 states; the element-wise step in one pass, a hidden matrix in chunks of rows
around one ``torch.mm`` with ``P``: no temporary beyond a chunk's ~1 MiB scratch), eager torch
passes elsewhere (float64, other devices), ``torch.compile`` with ``compiled=True`` (default on
CUDA). They agree to fp32 rounding (tests/test_whiteflow_native.py); step times against fused
AdamW are in bench/results/whiteflow-step-cpu2-2026-12-07.md.

**World-size invariance.** Everything is row-local except the limiter's norms (summed over
shards). Stochastic-rounding noise is a function of ``(seed, parameter index, step, state,
global row block)`` — never of the shard — so 1, 2 or 4 ranks round identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from shardflow.ops import backend
from shardflow.ops.compiling import each
from shardflow.ops.listops import ListOps
from shardflow.ops.native import whiteflow as wf_native
from shardflow.ops.orthogonalize import orthograd_fold, orthograd_sums
from shardflow.ops.precision import bf16_stochastic, hash32_int, mix_seed
from shardflow.ops.projection import ProjectionCache
from shardflow.optim._validate import (
    check_bool,
    check_choice,
    check_lr,
    check_nonnegative,
    check_unit_interval,
)
from shardflow.optim.base import (
    SHARED_ARGS_DOC,
    Item,
    Layout,
    ShardFlowOptimizer,
    _compute_dtype,
    step_counter,
)
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
    __doc__ = (
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
        foreach: accepted for the common contract; WhiteFlow's passes do not use it.
        compiled: run the passes through ``torch.compile``, a chunk of parameters per call
            (None: on CUDA only). Otherwise, on the CPU, fp32 weights with bf16 states take
            the native kernels (:mod:`shardflow.ops.native.whiteflow`; ``SHARDFLOW_NATIVE=0``
            switches them off), everything else the eager torch passes: the same rule.
    """
        + SHARED_ARGS_DOC
    )

    scratch_grads: ClassVar[bool] = False
    """Every pass reads the raw gradient and applies the clip factor itself."""

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
        grads_reduced: bool = False,
        precision: str | None = None,
        decouple_lr: bool = False,
        gradient_release: bool = False,
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
        self._compiled = backend.check_compiled(compiled)
        super().__init__(
            params,
            defaults,
            process_group=process_group,
            foreach=foreach,
            gradient_clipping=gradient_clipping,
            grads_reduced=grads_reduced,
            precision=precision,
            decouple_lr=decouple_lr,
            gradient_release=gradient_release,
        )

    # -- validation and state ---------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"], "1e-3")
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
            self._step_items(group, t, bucket, ops)

    def _step_items(self, group: dict[str, Any], t: int, items: list[Item], ops: ListOps) -> None:
        """One step of ``items`` (all at step ``t``).

        Three implementations of one rule: the step's backend (``ops``, chosen once per step by
        :func:`shardflow.ops.backend.choose`) says which may run, and each parameter takes the
        first that takes its tensors:

        - **native** (``ops.native``, the default on the CPU: fp32 weights and gradients, bf16
          states; :mod:`shardflow.ops.native.whiteflow`): the element-wise
          parameters of the group in one C call, one pass each; a projected hidden matrix in
          chunks of rows — ⊥Grad, momentum (C), one ``torch.mm`` with the projection, second
          moment, channel scale and the store (C) while the chunk is in cache; a dense one in
          one C call. No temporary beyond a chunk's scratch.
        - **eager torch** (float64, other devices, ``SHARDFLOW_NATIVE=0``, empty shards) and
          **compiled** (``ops.compiled``: ``compiled=True``, or None on CUDA; it takes
          precedence over native): :func:`whiteflow_scales_` (⊥Grad
          coefficients, second moment, channel scales — everything per row) then
          :func:`whiteflow_apply_` (momentum and weights, element-wise) for hidden matrices,
          :func:`whiteflow_elementwise_` for the rest; compiled, a chunk of parameters per
          ``torch.compile`` call (:func:`~shardflow.ops.compiling.each`).

        Every path reads the raw gradient with the clip factor as a scalar (no scratch copy).
        The rule needs a row's scale before it may write that row, and the momentum written
        to memory is rounded: the torch path's second pass recomputes the fp32 momentum from
        ``(g, w, m)``; the native projected pass keeps it in its chunk's scratch. With the
        norm-growth limiter, ``‖u‖`` of every parameter comes first (``Σᵢ sᵢ²·‖M̂ᵢ‖²`` for
        hidden matrices), one batched reduction over shards, and the limited step follows.
        """
        compiled = ops.compiled
        jobs = [self._job(group, t, it, compiled, ops.native) for it in items]
        limited = group["norm_growth_limit"] is not None
        channel = [j for j in jobs if j.route != "elementwise"]
        elementwise = [j for j in jobs if j.route == "elementwise"]
        torch_channel = [j for j in channel if j.native is None]
        for route in ("projected", "dense"):
            chosen = [j for j in torch_channel if j.route == route]
            scales = _call(
                whiteflow_scales_each, chosen, compiled, lambda j: j.tensor_args(), route=route
            )
            for j, coef in zip(chosen, scales):
                j.coef = coef
        scratch = wf_native.Scratch()
        for j in channel:
            if j.native is not None and j.route == "projected":
                j.coef = wf_native.rows_projected(j.native, j.args[4], scratch, apply=not limited)
            elif j.native is not None:
                j.coef = wf_native.rows_dense(j.native, apply=not limited)
        torch_elementwise = [j for j in elementwise if j.native is None]
        for j, u in zip(
            torch_elementwise,
            _call(
                whiteflow_elementwise_each,
                torch_elementwise,
                compiled,
                lambda j: (lambda a: (*a[:4], *a[5:]))(j.tensor_args()),
                apply=not limited,
            ),
        ):
            j.u = u
        native_elementwise = [j for j in elementwise if j.native is not None]
        if native_elementwise:
            usq = wf_native.elementwise_many(
                [j.native for j in native_elementwise], norm_only=limited
            )
            for i, j in enumerate(native_elementwise if limited else []):
                j.usq = usq[i]
        if limited:
            self._limit_norm_growth(group, channel, elementwise, compiled)
        else:
            _call(
                whiteflow_apply_each,
                torch_channel,
                compiled,
                lambda j: (lambda a: (a[0], a[1], a[2], j.coef, a[5], a[6]))(j.tensor_args()),
            )
        for j in jobs:
            for dst, src in j.write_back:
                dst.copy_(src.view_as(dst))

    def _job(self, group: dict[str, Any], t: int, it: Item, compiled: bool, native: bool) -> _Job:
        """One item's arguments ``(w, g, m, v, proj, hyper, keys)`` for the pass functions, and
        the native kernels' job where they take it."""
        route = self.route(it.param, group)
        v_key = "exp_avg_sq_proj" if route == "projected" else "exp_avg_sq"
        tensors = [it.local.detach(), it.grad, it.state["exp_avg"], it.state[v_key]]
        write_back: list[tuple[Tensor, Tensor]] = []
        if route == "elementwise":
            if all(x.is_contiguous() for x in tensors):  # 1-D and 2-D share one graph
                tensors = [x.view(-1) for x in tensors]
        else:
            views = [_rows_view(x) for x in tensors]
            if any(x is None for x in views):  # a non-contiguous tensor of 3+ dims: copies
                views = [_rows(x.contiguous()) for x in tensors]
                write_back = [(tensors[i], views[i]) for i in (0, 2, 3)]
            tensors = views
        w, g, m, v = tensors
        proj = None
        if route == "projected":
            n, r = _width(self.placement.global_shape(it.param)), v.shape[1]
            refresh = (t - 1) // group["proj_update_freq"]
            dtype = _compute_dtype(g)
            proj = self.projections.get(group["seed"], n, r, refresh, device=g.device, dtype=dtype)
        keys = None
        if group["stochastic_rounding"] and m.dtype == torch.bfloat16:
            # the element-wise route's v is element-for-element m's: the same global offsets
            v_width = (
                v.shape[-1]
                if route == "projected"
                else _width(self.placement.global_shape(it.param))
            )
            keys = self._rounding_keys(group, it, t, v_width)
        hyper = self._hyper(group, t, it)
        fast = it.grad.numel() > 0 and not write_back
        job = _Job(it, route, (w, g, m, v, proj, hyper, keys), fast, write_back)
        if (
            native
            and not compiled
            and it.grad.numel() > 0
            and wf_native.usable(w, g, m, v)
            and (proj is None or (proj.dtype == torch.float32 and proj.device.type == "cpu"))
        ):
            job.native = wf_native.Job(w, g, m, v, hyper, keys)
        return job

    @property
    def compiled(self) -> bool | None:
        """Run the passes through ``torch.compile`` (None: on CUDA only)."""
        return self._compiled

    def _step_size(self, group: dict[str, Any], param: Tensor) -> float:
        """``η = lr × lr_scale`` (× SPlus's ``2/(rows + cols)`` with ``shape_lr_scaling``)."""
        return group["lr"] * group["lr_scale"] * self._shape_factor(group, param)

    def _hyper(self, group: dict[str, Any], t: int, it: Item) -> list[float]:
        """The scalars of the pass functions, ``[c, 1−β₁, 1/(1−β₁ᵗ), β₂ₜ, 1−β₂ₜ, 1/cₜ, eps,
        1−η·λ, η]`` with ``c`` the clip factor and ``η`` the parameter's step size (the torch
        path takes them as one tensor, so that a compiled kernel never recompiles for new
        values: :meth:`_Job.tensor_args`)."""
        beta1, beta2 = group["betas"]
        b2, weight = beta2_at(beta2, t), second_moment_weight(beta2, t)
        eta = self._step_size(group, it.param)
        return [
            it.grad_scale,
            1.0 - beta1,
            1.0 / (1.0 - beta1**t),
            b2,
            1.0 - b2,
            1.0 / weight,
            group["eps"],
            1.0 - eta * self.decay(group),
            eta,
        ]

    def _rounding_keys(
        self, group: dict[str, Any], it: Item, t: int, v_width: int
    ) -> tuple[int, int, int, int]:
        """``(key_m, offset_m, key_v, offset_v)`` for :func:`bf16_stochastic`: the counter-based
        stream of :mod:`shardflow.ops.precision`, seeded by (seed, param index, step, state),
        at the global flat index of this shard's first element (so 1, 2 or 4 ranks agree)."""
        rows = self.placement.row_range(it.param)
        row0 = rows[0] if rows else 0
        width = _width(self.placement.global_shape(it.param))
        index = self.param_index(it.param)
        return (
            hash32_int(mix_seed(group["seed"], index, t, _SR_EXP_AVG)),
            row0 * width,
            hash32_int(mix_seed(group["seed"], index, t, _SR_EXP_AVG_SQ)),
            row0 * v_width,
        )

    def _limit_norm_growth(
        self,
        group: dict[str, Any],
        channel: list[_Job],
        elementwise: list[_Job],
        compiled: bool,
    ) -> None:
        """APOLLO's limiter: ``‖uₜ‖ ≤ γ·‖uₜ₋₁‖`` per parameter, one reduction over shards, then
        the limited step of every parameter.

        ``‖u‖²`` is summed in fp64 over rows (each row is whole on one rank), then over rows and
        shards: the total does not depend on where the shard boundaries are (to fp64 rounding).
        Channel-scaled parameters take ``‖uᵢ‖²`` from their first pass and have their scales
        ``sᵢ`` multiplied before the second; element-wise ones are applied here (the native
        kernel recomputes ``u`` with ``η`` times the factor).
        """
        gamma = group["norm_growth_limit"]
        local = [j.coef[:, 3].double().sum() for j in channel]
        for j in elementwise:
            usq = j.usq if j.native is not None else None
            local.append(
                usq if usq is not None else _row_norms(_rows(j.u), torch.float64).square().sum()
            )
        sq = self.placement.sum_over_shards(torch.stack(local)) if local else torch.zeros(0)
        factors = []
        for j, norm in zip(channel + elementwise, sq.double().sqrt().tolist()):
            prev = float(j.item.state["update_norm"])
            factor = gamma * prev / norm if prev > 0 and norm > gamma * prev else 1.0
            j.item.state["update_norm"].fill_(norm * factor)
            factors.append(factor)
        for j, factor in zip(channel, factors):
            j.coef[:, 2].mul_(factor)
        torch_channel = [j for j in channel if j.native is None]
        _call(
            whiteflow_apply_each,
            torch_channel,
            compiled,
            lambda j: (lambda a: (a[0], a[1], a[2], j.coef, a[5], a[6]))(j.tensor_args()),
        )
        for j in channel:
            if j.native is not None:
                wf_native.rows_apply(j.native, j.coef)
        limited_native = []
        for j, factor in zip(elementwise, factors[len(channel) :]):
            eta = self._step_size(group, j.item.param)
            if j.native is not None:
                hyper = list(j.native.hyper)
                hyper[8] = eta * factor
                limited_native.append(j.native._replace(hyper=hyper))
                continue
            w = j.args[0]
            w.mul_(1.0 - eta * self.decay(group))
            w.add_(j.u.to(w.dtype), alpha=-eta * factor)
        if limited_native:
            wf_native.elementwise_many(limited_native)

    def _shape_factor(self, group: dict[str, Any], param: Tensor) -> float:
        """SPlus's ``2/(rows + cols)`` for hidden matrices when ``shape_lr_scaling``, else 1."""
        if not group["shape_lr_scaling"] or self.route(param, group) == "elementwise":
            return 1.0
        shape = self.placement.global_shape(param)
        return 2.0 / (shape[0] + _width(shape))


@dataclass(slots=True)
class _Job:
    """One parameter's step as :meth:`WhiteFlow._step_items` carries it between passes."""

    item: Item
    route: str
    args: tuple
    """``(w, g, m, v, proj, hyper, keys)``: views as the pass functions take them (``hyper`` a
    list of floats, ``keys`` a tuple of ints or None: :meth:`tensor_args` makes them tensors)."""
    fast: bool
    """May go through the compiled call (not an empty shard, no copies to write back)."""
    write_back: list[tuple[Tensor, Tensor]]
    """``(state, contiguous copy)`` pairs to copy back after the step."""
    native: wf_native.Job | None = None
    """The native kernels' job, where they take this parameter (else the torch path)."""
    coef: Tensor | None = None
    """The first pass's ``(rows, 4)`` result (:func:`whiteflow_scales_`)."""
    u: Tensor | None = None
    """The element-wise direction (torch path), kept only for the limiter."""
    usq: Tensor | None = None
    """``‖u‖²`` of a native element-wise parameter, for the limiter."""
    _tensors: tuple | None = None

    def tensor_args(self) -> tuple:
        """``args`` with ``hyper`` and ``keys`` as tensors on the gradient's device (hyper in
        the compute dtype): what the torch and compiled pass functions take."""
        if self._tensors is None:
            w, g, m, v, proj, hyper, keys = self.args
            h = torch.tensor(hyper, dtype=_compute_dtype(g)).to(g.device, non_blocking=True)
            k = None
            if keys is not None:
                k = torch.tensor(keys, dtype=torch.int64).to(g.device, non_blocking=True)
            self._tensors = (w, g, m, v, proj, h, k)
        return self._tensors


def _call(
    fn: Callable[..., list | None],
    jobs: list[_Job],
    compiled: bool,
    args: Callable[[_Job], tuple],
    **kwargs: Any,
) -> list[Any]:
    """``fn`` (a function of lists) on ``args(job)`` of every job; its results in job order.

    Compiled: the ``fast`` jobs through :func:`~shardflow.ops.compiling.each` (chunked
    ``torch.compile`` calls), the others eagerly; otherwise one eager call for all.
    """
    out: list[Any] = [None] * len(jobs)
    parts = {True: [], False: []}
    for i, j in enumerate(jobs):
        parts[compiled and j.fast].append(i)
    for through_compile, index in parts.items():
        if not index:
            continue
        lists = [list(x) for x in zip(*(args(jobs[i]) for i in index))]
        results = (each(fn, *lists, **kwargs) if through_compile else fn(*lists, **kwargs)) or []
        for i, r in zip(index, results):
            out[i] = r
    return out


def whiteflow_scales_(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    proj: Tensor | None,
    hyper: Tensor,
    keys: Tensor | None,
    *,
    route: str,
) -> Tensor:
    """First pass for a hidden matrix (steps 1–4 of the module docstring); updates ``v``.

    ``w, g, m`` (and dense ``v``) are ``(rows, n)`` views, ``v`` is ``(rows, r)`` and ``proj``
    ``(n, r)`` for ``route="projected"``. ``g`` is the raw gradient (never written); ``hyper``
    holds ``[c, 1−β₁, 1/(1−β₁ᵗ), β₂ₜ, 1−β₂ₜ, 1/cₜ, eps, 1−η·λ, η]`` in the compute dtype (``c``
    the clip factor) and ``keys`` the stochastic-rounding keys (:meth:`WhiteFlow._rounding_keys`)
    or None to round to nearest. Returns ``(rows, 4)``: ``[c·a, b, s, ‖uᵢ‖²]``, where ``c·g⊥ =
    (c·a)·g − b·w`` is ⊥Grad of the clipped gradient (:func:`~shardflow.ops.orthogonalize.
    orthograd_fold`), ``s`` the channel scale and ``‖uᵢ‖ = s·‖M̂ᵢ‖`` the row's update norm.

    Every quantity is per row, so a compiled version can finish a row while it is in cache.
    """
    c, one_minus_b1, corr1, b2, one_minus_b2, inv_weight, eps, _, _ = hyper.unbind()
    dtype = hyper.dtype
    w32 = w.to(dtype)
    g = g.to(dtype) * c
    a, b = orthograd_fold(orthograd_sums(g, w32), restore_norm=True)
    g = a.unsqueeze(1) * g - b.unsqueeze(1) * w32
    mhat = torch.lerp(m.to(dtype), g, one_minus_b1) * corr1
    ref = mhat
    if route == "projected":
        g = g @ proj
        ref = mhat @ proj
    sq = v.to(dtype) * b2 + one_minus_b2 * g * g
    _store(v, sq, keys, 2)
    adapted = ref / ((sq * inv_weight).sqrt() + eps)
    ref_norm = _row_norms(ref)
    scale = _ratio(_row_norms(adapted), ref_norm)
    mhat_norm = ref_norm
    if route == "projected":
        scale = scale * math.sqrt(mhat.shape[1] / proj.shape[1])
        mhat_norm = _row_norms(mhat)
    return torch.stack([a * c, b, scale, (scale * mhat_norm).square()], dim=1)


def whiteflow_apply_(
    w: Tensor, g: Tensor, m: Tensor, coef: Tensor, hyper: Tensor, keys: Tensor | None
) -> None:
    """Second pass for a hidden matrix (steps 2, 5 and 7), in place on ``m`` and ``w``.

    With ``coef`` from :func:`whiteflow_scales_`: ``g⊥ = coef₀·g − coef₁·w``, ``m ← β₁·m +
    (1−β₁)·g⊥`` (stored rounded; the update uses the fp32 value), ``w ← w·(1 − η·λ) −
    η·s·m/(1−β₁ᵗ)``. Element-wise, with per-row coefficients (as fused AdamW's loop, plus the
    rounding).
    """
    _, one_minus_b1, corr1, _, _, _, _, decay, eta = hyper.unbind()
    dtype = hyper.dtype
    w32 = w.to(dtype)
    g = coef[:, 0:1] * g.to(dtype) - coef[:, 1:2] * w32
    mom = torch.lerp(m.to(dtype), g, one_minus_b1)
    _store(m, mom, keys, 0)
    w.copy_((w32 * decay - (eta * corr1) * coef[:, 2:3] * mom).to(w.dtype))


def whiteflow_elementwise_(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    hyper: Tensor,
    keys: Tensor | None,
    *,
    apply: bool = True,
) -> Tensor | None:
    """The fallback's step (Adam with the warmed-up second moment), one element-wise pass, in
    place on ``m``, ``v`` and (``apply``) ``w``; without ``apply`` it returns ``u`` instead of
    writing the weights (for the limiter). Arguments as in :func:`whiteflow_scales_`."""
    c, one_minus_b1, corr1, b2, one_minus_b2, inv_weight, eps, decay, eta = hyper.unbind()
    dtype = hyper.dtype
    g = g.to(dtype) * c
    mom = torch.lerp(m.to(dtype), g, one_minus_b1)
    _store(m, mom, keys, 0)
    sq = v.to(dtype) * b2 + one_minus_b2 * g * g
    _store(v, sq, keys, 2)
    u = mom * corr1 / ((sq * inv_weight).sqrt() + eps)
    if not apply:
        return u
    w.copy_((w.to(dtype) * decay - eta * u).to(w.dtype))
    return None


def whiteflow_scales_each(
    ws: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    projs: list[Tensor | None],
    hypers: list[Tensor],
    keys: list[Tensor | None],
    *,
    route: str,
) -> list[Tensor]:
    """:func:`whiteflow_scales_` for each parameter of the lists (one compiled call)."""
    return [
        whiteflow_scales_(w, g, m, v, p, h, k, route=route)
        for w, g, m, v, p, h, k in zip(ws, gs, ms, vs, projs, hypers, keys)
    ]


def whiteflow_apply_each(
    ws: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    coefs: list[Tensor],
    hypers: list[Tensor],
    keys: list[Tensor | None],
) -> None:
    """:func:`whiteflow_apply_` for each parameter of the lists (one compiled call)."""
    for w, g, m, coef, h, k in zip(ws, gs, ms, coefs, hypers, keys):
        whiteflow_apply_(w, g, m, coef, h, k)


def whiteflow_elementwise_each(
    ws: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    hypers: list[Tensor],
    keys: list[Tensor | None],
    *,
    apply: bool,
) -> list[Tensor] | None:
    """:func:`whiteflow_elementwise_` for each parameter of the lists (one compiled call)."""
    out = [
        whiteflow_elementwise_(w, g, m, v, h, k, apply=apply)
        for w, g, m, v, h, k in zip(ws, gs, ms, vs, hypers, keys)
    ]
    return None if apply else out


def _store(dst: Tensor, value: Tensor, keys: Tensor | None, at: int) -> None:
    """``dst ← value``, rounded stochastically with ``keys[at], keys[at + 1]`` when given."""
    if keys is None:
        dst.copy_(value)
    else:
        dst.copy_(bf16_stochastic(value, keys[at], keys[at + 1]))


def _rows(t: Tensor) -> Tensor:
    """The ``(out, rest)`` view (0-row shards included); a 0-d tensor is one row."""
    return t.reshape(t.shape[0], _width(t.shape)) if t.ndim >= 1 else t.reshape(1, 1)


def _rows_view(t: Tensor) -> Tensor | None:
    """The ``(out, rest)`` view of ``t`` sharing its storage, or None where only a copy can be
    had (a non-contiguous tensor of 3+ dims)."""
    try:
        return t.view(t.shape[0], _width(t.shape)) if t.ndim >= 1 else t.view(1, 1)
    except RuntimeError:
        return None


def _row_norms(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.linalg.vector_norm(t.to(dtype) if dtype else t, dim=1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    tiny = torch.finfo(den.dtype).tiny
    return torch.where(den > 0, num / den.clamp_min(tiny), torch.zeros_like(num))


def _width(shape: torch.Size) -> int:
    """Columns of the ``(out, rest)`` view of a parameter of this shape."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1
