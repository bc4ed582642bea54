"""DolphinFlow: ⊥Grad or Newton-Schulz orthogonalization, Nesterov momentum, Adam-like scaling.

The update rule, for one parameter ``w`` with gradient ``g`` (after global clipping), step ``t``:

1. **Route.** Hidden matrices (2+ dims, not an embedding or head) follow the group's
   ``ortho_mode``; everything else is element-wise (see :mod:`shardflow.optim.routing`).
2. **⊥Grad** (``ortho_mode="vector"``): ``g ← g − (⟨g,w⟩/‖w‖²)·w``, per row (``vector_mode=
   "rowwise"``, the default) or over the whole tensor (``"flat"``), rescaled to ``‖g‖`` when
   ``restore_norm`` (Prieto et al., arXiv 2501.04697). ``ns_orthograd="gradient"`` does the same
   on the matrix and block routes; ``"direction"`` projects their Newton-Schulz input instead
   (after step 5's Adam division, before Newton-Schulz).
3. **Moments.** ``m ← μ·m + (1−μ)·g``; with ``adaptive_lr``, ``v ← β₂·v + (1−β₂)·g²``.
4. **Nesterov as an average**: ``n = μ·m + (1−μ)·g`` (plain momentum: ``n = m``), divided by its
   bias correction (the weight the EMA has accumulated: ``1 − μᵗ`` for a constant μ), so that
   ``n̂`` estimates the gradient from step 1.
5. **Direction with RMS ≈ 1**:
   - element-wise and vector routes: ``u = n̂ / (√v̂ + eps)`` with ``v̂ = v / (1 − β₂ᵗ)``
     (without ``adaptive_lr``: ``u = n̂ / RMS(n̂)``);
   - matrix and block routes: the adaptive scaling comes *before* orthogonalizing, so it cannot
     undo it: ``u = NS(n̂ / (√v̂ + eps)) · √max(m, n)`` (per tile in block mode; without
     ``adaptive_lr`` the division is left out). An orthogonal ``(m, n)`` matrix has RMS
     ``1/√max(m, n)``, hence the factor.
6. **Trust region** (``trust_region=τ``): if ``lr·‖u‖ > τ·‖w‖``, shrink ``u`` to meet it
   (parameters with ``‖w‖ = 0`` are left alone, or they could never move).
7. **Apply**: ``w ← w·(1 − lr·weight_decay) − lr·u`` (decoupled weight decay).

**The RMS rule.** ``u`` has an RMS of 1 on the first step in every mode up to the Newton-Schulz
band — within ``[0.5, 1.3]`` (tested) — so ``lr`` is the RMS of the weight change, independent of
the gradient's scale. Compared with the published package, which moved weights ≈19×–269× lr on
its first step (ANCHORS.md).

**Dynamic momentum** (``dynamic_momentum=True``): each parameter keeps its own μ, moved each step
by ``0.05·cos(g, m)`` and kept within ``momentum_bounds``: momentum grows while successive
gradients agree and shrinks when they oppose.

**Memory**: ``m`` (fp32, 4 B/param) and, with ``adaptive_lr``, ``v`` (fp32, 4 B/param).

**One rule, every backend.** Steps 3-7 are written once, as plain torch code on one
parameter's tensors: :func:`dolphinflow_rule` (the step-by-step route calls it for the
direction alone, ``direction=True``). The step's backend is chosen once per step by
:func:`shardflow.ops.backend.choose` and runs that rule: compiled (``compiled=True``, or None on
CUDA: the rule itself through ``torch.compile``, :func:`dolphinflow_rule_each`), native (the
CPU default for fp32 tensors: ``csrc/dolphinflow_rule.h``, the same operations in C, in
:mod:`shardflow.ops.native.dolphinflow`), foreach (:func:`dolphinflow_rule_foreach`, the same
operations as list kernels) or eager (the rule called on each parameter: the reference).
``tests/test_backends.py`` checks each against the reference; :class:`DolphinFlow8bit
<shardflow.optim.dolphinflow8bit.DolphinFlow8bit>` runs the same rule between dequantizing
and requantizing its moments.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from shardflow.ops import backend, compiling
from shardflow.ops import precision as lowp
from shardflow.ops.compiling import compile_once, each
from shardflow.ops.listops import ListOps
from shardflow.ops.native import dolphinflow as dolphinflow_native
from shardflow.ops.orthogonalize import (
    NS_SCHEDULES,
    NS_TOL,
    _rows,
    apply_fold_,
    orthograd_,
    orthograd_fold,
    orthograd_sums,
)
from shardflow.optim._validate import (
    check_bool,
    check_choice,
    check_int_at_least,
    check_lr,
    check_nonnegative,
    check_optional_positive,
    check_unit_interval,
    is_number,
)
from shardflow.optim.base import (
    SHARED_ARGS_DOC,
    Collected,
    Item,
    Layout,
    ShardFlowOptimizer,
    _compute_dtype,
    _sum_sq,
    step_counter,
)
from shardflow.optim.routing import is_hidden_matrix
from shardflow.optim.schedule import LossAwareSchedule

ORTHO_MODES = ("vector", "block", "matrix", "full", None)
NS_ORTHOGRAD = (None, "gradient", "direction")
"""Where ``ns_orthograd`` applies ⊥Grad on the matrix and block routes (None: nowhere)."""
_DYNAMIC_RATE = 0.05


class DolphinFlow(ShardFlowOptimizer):
    __doc__ = (
        """DolphinFlow, 32-bit states. See the module docstring for the update rule.

    Args:
        params: parameters, named parameters (``model.named_parameters()``, which lets names
            route embeddings and heads element-wise) or param groups (any key below may be set
            per group; :func:`shardflow.optim.routing.param_groups` builds sensible ones).
        lr: learning rate: the RMS of the weight change per step.
        weight_decay: decoupled weight decay coefficient (multiplied by ``lr``).
        momentum: momentum coefficient μ in [0, 1).
        nesterov: use Nesterov momentum (an average of momentum and gradient).
        ortho_mode: ``"vector"`` (⊥Grad), ``"block"`` (Newton-Schulz per tile), ``"matrix"``
            (alias ``"full"``: Newton-Schulz on the whole matrix), or ``None`` (element-wise).
        block_size: tile side for ``"block"``.
        vector_mode: ⊥Grad per row (``"rowwise"``) or over the flattened tensor (``"flat"``).
        restore_norm: rescale the ⊥Grad-projected gradient to the original norm.
        adaptive_lr: Adam-like second-moment scaling.
        beta2: second-moment coefficient.
        eps: added to ``√v̂``.
        dynamic_momentum: adapt μ per parameter from gradient alignment.
        momentum_bounds: ``(low, high)`` for dynamic momentum.
        gradient_clipping: global gradient-norm bound (None: off).
        trust_region: bound on ``lr·‖u‖ / ‖w‖`` per parameter (None: off).
        ns_min_steps, ns_max_steps: Newton-Schulz iteration bounds (the criterion in between
            is documented in :mod:`shardflow.ops.orthogonalize`).
        ns_dtype: Newton-Schulz compute dtype; None: bf16 on CUDA, fp32 elsewhere.
        ns_coeffs: Newton-Schulz coefficient schedule, ``"muon"`` (fixed quintic) or
            ``"polar_express"`` (per iteration; :mod:`shardflow.ops.orthogonalize`).
        ns_orthograd: ⊥Grad on the matrix and block routes too (``vector_mode`` and
            ``restore_norm`` apply): ``"gradient"`` projects the clipped gradient away from the
            weight before the moments (as the vector route does), ``"direction"`` projects the
            direction that enters Newton-Schulz (momentum, Adam-divided); None: off.
        loss_aware_schedule: lower the lr when the loss stalls (needs ``step(closure)``);
            see :class:`~shardflow.optim.schedule.LossAwareSchedule`.
        verbose: log per-step summaries to the ``shardflow`` logger.
        foreach: use ``torch._foreach_*`` kernels on the torch path (None: when all tensors
            share a device).
        compiled: run the element-wise pass (the reference rule :func:`dolphinflow_rule`,
            compiled as it is: one generated loop per parameter, eight parameters per call,
            the ⊥Grad row sums taken in the clipping-norm pass) through ``torch.compile``;
            None: on CUDA only. The first step pays the compilation (seconds with a warm
            inductor cache, about a minute cold on a 2-core CPU). Without it, on the CPU, fp32
            parameters take the native kernel (:mod:`shardflow.ops.native.dolphinflow`, the
            same rule in C; ``SHARDFLOW_NATIVE=0`` turns it off), others the foreach or eager
            torch path. The choice is made once per step by :func:`shardflow.ops.backend.choose`.
    """
        + SHARED_ARGS_DOC
    )

    scratch_grads: ClassVar[bool] = False
    """The fused pass reads the raw gradient on every backend (the rule writes no ``g``); the
    step-by-step route and dynamic momentum copy it (:func:`_make_scratch`)."""

    state_layout: ClassVar[dict[str, Layout]] = {
        "step": "replicated",
        "exp_avg": "rows",
        "exp_avg_sq": "rows",
        "momentum": "replicated",
        "momentum_weight": "replicated",
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        momentum: float = 0.9,
        nesterov: bool = True,
        ortho_mode: str | None = "vector",
        block_size: int = 128,
        adaptive_lr: bool = True,
        beta2: float = 0.99,
        eps: float = 1e-8,
        dynamic_momentum: bool = False,
        momentum_bounds: tuple[float, float] = (0.7, 0.98),
        gradient_clipping: float | None = 1.0,
        trust_region: float | None = None,
        ns_min_steps: int = 3,
        ns_max_steps: int = 5,
        loss_aware_schedule: bool = False,
        verbose: bool = False,
        *,
        vector_mode: str = "rowwise",
        restore_norm: bool = True,
        ns_dtype: torch.dtype | None = None,
        ns_coeffs: str = "muon",
        ns_orthograd: str | None = None,
        process_group: Any = None,
        foreach: bool | None = None,
        compiled: bool | None = None,
        grads_reduced: bool = False,
        precision: str | None = None,
        decouple_lr: bool = False,
        gradient_release: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ortho_mode=ortho_mode,
            block_size=block_size,
            vector_mode=vector_mode,
            restore_norm=restore_norm,
            adaptive_lr=adaptive_lr,
            beta2=beta2,
            eps=eps,
            dynamic_momentum=dynamic_momentum,
            momentum_bounds=tuple(momentum_bounds) if momentum_bounds is not None else None,
            trust_region=trust_region,
            ns_min_steps=ns_min_steps,
            ns_max_steps=ns_max_steps,
            ns_dtype=ns_dtype,
            ns_coeffs=ns_coeffs,
            ns_orthograd=ns_orthograd,
        )
        check_bool("loss_aware_schedule", loss_aware_schedule)
        check_bool("verbose", verbose)
        self.verbose = verbose
        self.compiled = backend.check_compiled(compiled)
        self._row_sums: dict[Tensor, Tensor] = {}
        """⊥Grad row sums of this step's raw-read gradients (see :meth:`_local_sq_norm`)."""
        self._names: dict[Tensor, str] = {}
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
        self.loss_schedule = LossAwareSchedule(self) if loss_aware_schedule else None

    # -- validation and state ---------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"], "1e-4")
        check_nonnegative("weight_decay", group["weight_decay"])
        check_unit_interval("momentum", group["momentum"])
        check_bool("nesterov", group["nesterov"])
        check_choice("ortho_mode", group["ortho_mode"], ORTHO_MODES)
        check_int_at_least("block_size", group["block_size"], 1)
        check_choice("vector_mode", group["vector_mode"], ("rowwise", "flat"))
        check_bool("restore_norm", group["restore_norm"])
        check_bool("adaptive_lr", group["adaptive_lr"])
        check_unit_interval("beta2", group["beta2"])
        check_nonnegative("eps", group["eps"])
        check_bool("dynamic_momentum", group["dynamic_momentum"])
        bounds = group["momentum_bounds"]
        if (
            bounds is None
            or len(bounds) != 2
            or not all(is_number(b) for b in bounds)
            or not 0 <= bounds[0] <= bounds[1] < 1
        ):
            raise ValueError(
                f"momentum_bounds={bounds!r} is invalid: pass (low, high) with 0 <= low <= high < 1, "
                "e.g. (0.7, 0.98)."
            )
        check_optional_positive("trust_region", group["trust_region"])
        check_choice("ns_coeffs", group["ns_coeffs"], NS_SCHEDULES)
        check_choice("ns_orthograd", group["ns_orthograd"], NS_ORTHOGRAD)
        check_int_at_least("ns_min_steps", group["ns_min_steps"], 0)
        check_int_at_least("ns_max_steps", group["ns_max_steps"], 1)
        if group["ns_min_steps"] > group["ns_max_steps"]:
            raise ValueError(
                f"ns_min_steps={group['ns_min_steps']} is larger than ns_max_steps="
                f"{group['ns_max_steps']}: pass ns_min_steps <= ns_max_steps."
            )
        if group["ns_dtype"] not in (
            None,
            torch.float32,
            torch.bfloat16,
            torch.float16,
            torch.float64,
        ):
            raise ValueError(
                f"ns_dtype={group['ns_dtype']!r} is invalid: pass None, torch.float32 or torch.bfloat16."
            )

    def _init_state(self, param: Tensor, local: Tensor, group: dict[str, Any], state: dict) -> None:
        names = group.get("param_names")
        if names:
            self._names[param] = names[next(i for i, p in enumerate(group["params"]) if p is param)]
        state["step"] = step_counter()
        state["exp_avg"] = torch.zeros_like(local, dtype=_state_dtype(local))
        if group["adaptive_lr"]:
            state["exp_avg_sq"] = torch.zeros_like(local, dtype=_state_dtype(local))
        state["momentum"] = torch.tensor(float(group["momentum"]), dtype=torch.float64)
        state["momentum_weight"] = torch.zeros((), dtype=torch.float64)

    def route(self, param: Tensor, group: dict[str, Any]) -> str:
        """``"matrix"``, ``"block"``, ``"vector"`` or ``"elementwise"`` for this parameter."""
        mode = group["ortho_mode"]
        if mode is None or not is_hidden_matrix(param, self._names.get(param)):
            return "elementwise"
        return "matrix" if mode == "full" else mode

    # -- the step ---------------------------------------------------------------------------

    def step(self, closure=None):  # type: ignore[override]
        if self.loss_schedule is not None and closure is None:
            raise ValueError(
                "loss_aware_schedule=True needs the loss: call optimizer.step(closure) with a "
                "closure that returns it, or build the optimizer with loss_aware_schedule=False "
                "and call a LossAwareSchedule yourself."
            )
        return super().step(closure)

    def _after_step(self, loss: Any) -> None:
        if self.loss_schedule is not None and loss is not None:
            self.loss_schedule.observe(loss)

    def _reads_raw(
        self, group: dict[str, Any], it_param: Tensor, grad: Tensor, ops: ListOps
    ) -> bool:
        """Whether the fused pass reads this element-wise/vector gradient raw (no scratch copy,
        the clip factor applied in the pass): every backend's rule reads ``g`` without writing
        it, so all do, except where the step-by-step route needs the direction in ``g``
        (no ``adaptive_lr``, a trust region) or dynamic momentum applies ⊥Grad to the gradient
        itself; gradients of other dtypes are copied to fp32 first, except where the native
        kernel reads them with the weight (:meth:`_stores_weight`)."""
        return self._fusable(group, it_param) and (
            grad.dtype in _RAW_DTYPES or self._native_weight(group, it_param, grad, ops)
        )

    def _fusable(self, group: dict[str, Any], param: Tensor) -> bool:
        """Whether this parameter's step is one pass of the rule with the gradient read raw."""
        return (
            not self.scratch_grads
            and group["adaptive_lr"]
            and group["trust_region"] is None
            and not group["dynamic_momentum"]
            and self.route(param, group) in ("vector", "elementwise")
        )

    def _native_weight(
        self, group: dict[str, Any], param: Tensor, grad: Tensor, ops: ListOps
    ) -> bool:
        """Whether the native kernel updates this bf16 weight in place this step: it reads the
        weight with its Kahan compensation and the raw gradient (bf16 or fp32) and writes the
        weight back (Kahan, or round to nearest) in the same pass — no fp32 working copy and
        no fp32 gradient copy (:func:`shardflow.ops.native.dolphinflow.step`)."""
        local = self.placement.local(param)
        if (
            not ops.native
            or ops.compiled
            or local.dtype != torch.bfloat16
            or self.precision_of(param, group) not in ("kahan", "nearest")
            or not self._fusable(group, param)
        ):
            return False
        if self.route(param, group) == "vector" and _rowwise_1d(group, local):
            return False  # as in _rule_native: the torch path takes it
        state = self.placement.state_view(self.state[param])
        return dolphinflow_native.takes_bf16(
            local, grad, state.get("kahan")
        ) and dolphinflow_native.usable(state["exp_avg"], state.get("exp_avg_sq"))

    def _stores_weight(self, group: dict[str, Any], item: Item, ops: ListOps) -> bool:
        return self._native_weight(group, item.param, item.grad, ops)

    def _local_sq_norm(self, collected: list[Collected], ops: ListOps) -> Tensor:
        """The clipping norm's ``Σ‖g‖²``, with the ⊥Grad row sums of the raw-read vector
        gradients computed in the same pass (native kernel, compiled or eager, as the step's
        backend says): ``‖g‖²`` of a matrix is the sum of its rows' ``‖g‖²``, so those gradients
        are read once before the update, not twice. The sums wait in ``_row_sums`` for
        :meth:`_orthograd`. Large gradients go through :func:`sq_norms_each` when compiling, the
        rest through the base's pass."""
        self._row_sums = {}
        vector, large, rest = [], [], []
        for group, params, grads in collected:
            for p, g in zip(params, grads):
                if (
                    g.numel() > 0
                    and self.route(p, group) == "vector"
                    and self._reads_raw(group, p, g, ops)
                ):
                    vector.append((p, g))
                elif _streams_well(g) and ops.compiled:
                    large.append(g.view(-1))
                else:
                    rest.append(g)
        total = _sum_sq(rest, ops)
        if large:
            total = total + torch.stack(each(sq_norms_each, large)).double().sum()
        if vector:
            params, grads = zip(*vector)
            weights = [self.placement.local(p) for p in params]
            comps = [self.placement.state_view(self.state[p]).get("kahan") for p in params]
            sums = _row_sums(list(grads), weights, ops, comps)
            self._row_sums = dict(zip(params, sums))
            total = total + torch.cat([s[:, 2] for s in sums]).double().sum()
        return total

    def _update_group(self, group: dict[str, Any], items: list[Item], ops: ListOps) -> None:
        lr = group["lr"] * group["lr_scale"]
        routes = {it.param: self.route(it.param, group) for it in items}
        fusable = group["adaptive_lr"] and group["trust_region"] is None
        fused = [it for it in items if fusable and routes[it.param] in ("vector", "elementwise")]
        raw = {id(it) for it in fused if self._reads_raw(group, it.param, it.grad, ops)}
        if not self.scratch_grads:
            _make_scratch([it for it in items if id(it) not in raw], ops)
        rest = [
            it for it in items if not (fusable and routes[it.param] in ("vector", "elementwise"))
        ]
        vector = [it for it in items if routes[it.param] == "vector"]
        # ⊥Grad is folded into the fused pass, unless dynamic momentum must see g⊥ first
        folds = self._orthograd(
            group, vector, fold=fusable and not group["dynamic_momentum"], ops=ops
        )
        if group["ns_orthograd"] == "gradient":  # scratch copies: the Newton-Schulz routes
            ortho = [it for it in items if routes[it.param] in ("matrix", "block")]
            self._orthograd(group, ortho, fold=False, ops=ops)
        mus = self._momenta(group, items)
        mu_of = dict(zip(map(id, items), mus))
        torch._foreach_add_([it.state["step"] for it in items], 1.0)
        if fused:
            self._fused_update(group, fused, [mu_of[id(it)] for it in fused], lr, folds, ops)
        if rest:
            self._stepwise_update(group, rest, [mu_of[id(it)] for it in rest], lr, routes, ops)

    def _nesterov_weights(self, group: dict[str, Any], items: list[Item], mus: list[float]):
        """Advance each item's accumulated EMA weight; return the bias correction of its ``n``."""
        accumulated = [it.state["momentum_weight"] for it in items]
        torch._foreach_mul_(accumulated, mus)
        torch._foreach_add_(accumulated, [1.0 - mu for mu in mus])
        if not group["nesterov"]:
            return _values(accumulated)
        return [mu * w + (1.0 - mu) for mu, w in zip(mus, _values(accumulated))]

    def _scalars(
        self,
        group: dict[str, Any],
        items: list[Item],
        mus: list[float],
        lr: float | None,
    ) -> list[tuple[float, ...]]:
        """Each item's scalars of :func:`dolphinflow_rule` for this step (advancing its Nesterov
        weight ``W``): with ``adaptive_lr`` the bias corrections fold into two of them
        (``1 − β₂ᵗ = k``: ``u = (n/W) / (√(v/k) + eps) = s·n / (√v + eps·√k)`` with
        ``s = √k / W``); ``lr`` None: the direction alone (no lr, no decay, no clip factor:
        the step-by-step route works in a clipped copy), else ``s`` times ``lr``."""
        weights = self._nesterov_weights(group, items, mus)
        beta2 = group["beta2"]
        if group["adaptive_lr"]:
            corr = [1.0 - beta2**t for t in _values([it.state["step"] for it in items])]
        else:
            corr = [0.0] * len(items)
        gain = 1.0 if lr is None else lr
        decay = 1.0 if lr is None else 1.0 - lr * self.decay(group)
        rows = []
        for it, mu, w, k in zip(items, mus, weights, corr):
            scale = gain * (k**0.5 if group["adaptive_lr"] else 1.0) / w
            eps = group["eps"] * k**0.5
            c = 1.0 if lr is None else it.grad_scale
            rows.append((decay, 1.0 - mu, mu, beta2, 1.0 - beta2, scale, eps, c))
        return rows

    def _fused_update(
        self,
        group: dict[str, Any],
        items: list[Item],
        mus: list[float],
        lr: float,
        folds: dict[int, tuple[Tensor, Tensor]],
        ops: ListOps,
    ) -> None:
        """Element-wise and vector routes with ``adaptive_lr`` and no trust region: steps 3-7 of
        the rule in one pass of :func:`dolphinflow_rule` per parameter (⊥Grad folded in as
        ``g ← a·g − b·w``, :func:`~shardflow.ops.orthogonalize.orthograd_fold`)."""
        rows = self._scalars(group, items, mus, lr)
        self._rule_pass(group, items, rows, folds, ops, direction=False)

    def _rule_pass(
        self,
        group: dict[str, Any],
        items: list[Item],
        rows: list[tuple[float, ...]],
        folds: dict[int, tuple[Tensor, Tensor]],
        ops: ListOps,
        *,
        direction: bool,
    ) -> None:
        """:func:`dolphinflow_rule` on each item with ``rows`` (:meth:`_scalars`), on the step's
        backend (:func:`shardflow.ops.backend.choose`): compiled (the rule itself through
        ``torch.compile``), native (``csrc/dolphinflow.c``, for fp32 contiguous tensors), foreach
        list ops (:func:`dolphinflow_rule_foreach`) or the rule called eagerly; an item the
        chosen backend does not take goes down that list. ``direction``: ``u`` into ``it.grad``
        (a scratch copy), the weights untouched."""
        if not items:
            return
        if ops.compiled:
            self._rule_compiled(group, items, rows, folds, direction)
            return
        todo = list(zip(items, rows))
        if ops.native:
            todo = [
                (it, row)
                for it, row in todo
                if not self._rule_native(group, it, row, folds, direction)
            ]
        if not todo:
            return
        nesterov, adaptive = group["nesterov"], group["adaptive_lr"]
        if ops.foreach and _same_kind([it.grad for it, _ in todo] + [it.local for it, _ in todo]):
            chunk = compiling.CHUNK
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                tensors = [self._rule_tensors(group, it, folds, direction) for it, _ in part]
                dolphinflow_rule_foreach(
                    *map(list, zip(*tensors)),
                    [row for _, row in part],
                    nesterov=nesterov,
                    adaptive=adaptive,
                    direction=direction,
                )
            return
        for (it, _), s in zip(
            todo, _scalar_rows([it.grad for it, _ in todo], [r for _, r in todo])
        ):
            w, g, m, v, a, b = self._rule_tensors(group, it, folds, direction)
            dolphinflow_rule(
                w, g, m, v, s, a, b, nesterov=nesterov, adaptive=adaptive, direction=direction
            )

    def _rule_tensors(
        self, group: dict[str, Any], it: Item, folds: dict, direction: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``(w, g, m, v, a, b)`` of an item for the torch backends: with a fold, ``(rows,
        rest)`` views and per-row coefficients ``(rows, 1)``."""
        w, g, m = it.local.detach(), it.grad, it.state["exp_avg"]
        v = it.state.get("exp_avg_sq") if group["adaptive_lr"] else None
        fold = folds.get(id(it))
        if fold is None:
            return w, g, m, v, None, None
        rowwise = group["vector_mode"] == "rowwise"
        w, g, m = (_rows(t, rowwise) for t in (w, g, m))
        v = None if v is None else _rows(v, rowwise)
        return w, g, m, v, fold[0].unsqueeze(1), fold[1].unsqueeze(1)

    def _rule_native(
        self,
        group: dict[str, Any],
        it: Item,
        row: tuple[float, ...],
        folds: dict[int, tuple[Tensor, Tensor]],
        direction: bool,
    ) -> bool:
        """:func:`dolphinflow_rule` for one item in the native kernel, if it takes the tensors
        (CPU, fp32, contiguous, built here); returns whether it ran."""
        w, g, m = it.local.detach(), it.grad, it.state["exp_avg"]
        v = it.state.get("exp_avg_sq") if group["adaptive_lr"] else None
        fold = folds.get(id(it))
        comp = None
        if w.dtype in lowp.LOW_PRECISION:  # the weight itself (_stores_weight said so)
            comp = it.state.get("kahan")
        elif not dolphinflow_native.usable(w, g):
            return False
        if not dolphinflow_native.usable(m, v, *(fold or ())):
            return False
        if fold is not None and _rowwise_1d(group, w):
            return False  # a 1-D weight's "rows" are one (the fold has one pair): as flat
        dolphinflow_native.step(
            w,
            g,
            m,
            v,
            row,
            fold,
            nesterov=group["nesterov"],
            adaptive=group["adaptive_lr"],
            out=g if direction else None,
            compensation=comp,
        )
        return True

    def _rule_compiled(
        self,
        group: dict[str, Any],
        items: list[Item],
        scalars: list[tuple[float, ...]],
        folds: dict[int, tuple[Tensor, Tensor]],
        direction: bool,
    ) -> None:
        """The rule through ``torch.compile`` (:func:`dolphinflow_rule_each`): parameters with
        and without ⊥Grad in separate calls, each call a chunk of parameters
        (:func:`~shardflow.ops.compiling.each`)."""
        rowwise = group["vector_mode"] == "rowwise"
        adaptive = group["adaptive_lr"]
        args: list[tuple[bool, list[Tensor], list[Tensor]]] = []  # (folded, w g m v, a b)
        rows: list[tuple[float, ...]] = []
        for it, row in zip(items, scalars):
            # detach: parameters would get static shapes (one graph per shape)
            tensors = [it.local.detach(), it.grad, it.state["exp_avg"]]
            if adaptive:
                tensors.append(it.state["exp_avg_sq"])
            if it.grad.numel() == 0:
                continue
            fold = folds.get(id(it))
            if not all(t.is_contiguous() for t in tensors):  # rare: ⊥Grad to a copy, then 1-D
                it.grad = it.grad.clone()
                if fold is not None:  # the fold carries the clip factor: c = 1 in the pass
                    self._apply_fold(group, it, fold)
                    row = (*row[:-1], 1.0)
                tensors[1], fold = it.grad, None
            if fold is not None:
                tensors = [_rows(t, rowwise) for t in tensors]
                args.append((True, tensors, [f.unsqueeze(1) for f in fold]))
            else:
                if all(t.is_contiguous() for t in tensors):
                    tensors = [t.view(-1) for t in tensors]
                args.append((False, tensors, []))
            rows.append(row)
        calls: dict[bool, list[tuple[Tensor, ...]]] = {True: [], False: []}
        for (folded, tensors, ab), s in zip(args, _scalar_rows([t[1] for _, t, _ in args], rows)):
            if not adaptive:
                tensors = [*tensors, None]
            calls[folded].append((*tensors, s, *ab))
        for batch in calls.values():
            if not batch:
                continue
            lists = list(map(list, zip(*batch)))
            if not adaptive:  # no v: the compiled function gets None for it
                lists[3] = None
            each(
                dolphinflow_rule_each,
                *lists,
                nesterov=group["nesterov"],
                adaptive=adaptive,
                direction=direction,
            )

    @staticmethod
    def _apply_fold(group: dict[str, Any], it: Item, fold: tuple[Tensor, Tensor]) -> None:
        rowwise = group["vector_mode"] == "rowwise"
        scale = group["restore_norm"]
        apply_fold_(_rows(it.grad, rowwise), _rows(it.local, rowwise), *fold, scale=scale)

    def _stepwise_update(
        self,
        group: dict[str, Any],
        items: list[Item],
        mus: list[float],
        lr: float,
        routes: dict[Tensor, str],
        ops: ListOps,
    ) -> None:
        """Every route and option, the direction first (:func:`dolphinflow_rule` with
        ``direction``: steps 3-5 into the scratch gradient), then what needs the whole
        direction before the weights move: the RMS normalization (no ``adaptive_lr``),
        Newton-Schulz, the trust region; then the apply."""
        ortho = [it for it in items if routes[it.param] in ("matrix", "block")]
        plain = [it for it in items if routes[it.param] in ("vector", "elementwise")]
        rows = self._scalars(group, items, mus, None)
        self._rule_pass(group, items, rows, {}, ops, direction=True)
        if not group["adaptive_lr"]:
            self._normalize_rms(plain, ops)
        if group["ns_orthograd"] == "direction":
            self._orthograd(group, ortho, fold=False, ops=ops)
        self._orthogonalize(group, ortho, routes)
        self._trust_region(group, items, lr, ops)
        self._apply(group, items, lr, ops)

    def _orthograd(
        self, group: dict[str, Any], items: list[Item], fold: bool, ops: ListOps
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """⊥Grad for the vector route (and ``ns_orthograd``'s Newton-Schulz routes, unfolded):
        applied to ``it.grad`` now, or (``fold``) returned as
        per-row coefficients ``(a, b)`` by ``id(item)`` for the fused pass to apply."""
        if not items:
            return {}
        rowwise = group["vector_mode"] == "rowwise"
        # raw-read gradients: the sums came with the clipping norm (_local_sq_norm)
        sums = [self._row_sums.pop(it.param, None) for it in items]
        todo = [i for i, x in enumerate(sums) if x is None]
        grads, weights = [items[i].grad for i in todo], [items[i].local for i in todo]
        comps = [items[i].state.get("kahan") for i in todo]
        for i, x in zip(todo, _row_sums(grads, weights, ops, comps)):
            sums[i] = x
        if not rowwise:  # the flat sums: over the rows, then over the ranks holding rows
            flat = torch.cat([x.sum(0, keepdim=True) for x in sums])
            sums = list(self.placement.sum_over_shards(flat).split(1))
        if fold:
            scales = [it.grad_scale for it in items]
            folds = _folds(sums, group["restore_norm"], scales, ops.compiled)
            return dict(zip(map(id, items), folds))
        for it, x in zip(items, sums):
            orthograd_(
                it.grad, it.local, rowwise=rowwise, restore_norm=group["restore_norm"], sums=x
            )
        return {}

    def _momenta(self, group: dict[str, Any], items: list[Item]) -> list[float]:
        """Each item's μ for this step (updating the stored per-parameter μ when dynamic)."""
        if not group["dynamic_momentum"]:
            return [float(group["momentum"])] * len(items)
        parts = torch.stack(
            [
                torch.stack([(it.grad * m).sum(), it.grad.square().sum(), m.square().sum()])
                for it in items
                for m in [it.state["exp_avg"].to(it.grad.dtype)]
            ]
        )
        dot, gg, mm = self.placement.sum_over_shards(parts).double().unbind(1)
        cos = torch.where((gg > 0) & (mm > 0), dot / (gg.sqrt() * mm.sqrt()).clamp_min(1e-300), 0.0)
        low, high = group["momentum_bounds"]
        mus = []
        for it, c in zip(items, cos.tolist()):
            mu = min(high, max(low, float(it.state["momentum"]) + _DYNAMIC_RATE * c))
            it.state["momentum"].fill_(mu)
            mus.append(mu)
        return mus

    def _normalize_rms(self, items: list[Item], ops: ListOps) -> None:
        if not items:
            return
        sq = self.placement.sum_over_shards(torch.stack(ops.sq_norms([it.grad for it in items])))
        numel = [self.placement.global_shape(it.param).numel() for it in items]
        scale = [(n / s) ** 0.5 if s > 0 else 0.0 for s, n in zip(sq.double().tolist(), numel)]
        ops.mul_([it.grad for it in items], scale)

    def _orthogonalize(self, group: dict[str, Any], items: list[Item], routes: dict) -> None:
        if not items:
            return
        ns = dict(
            min_steps=group["ns_min_steps"],
            max_steps=group["ns_max_steps"],
            tol=NS_TOL,
            dtype=group["ns_dtype"] or _default_ns_dtype(items[0].grad),
            coeffs=group["ns_coeffs"],
        )
        for mode in ("matrix", "block"):
            chosen = [it for it in items if routes[it.param] == mode]
            if not chosen:
                continue
            mats = [it.grad.flatten(1) for it in chosen]  # flatten: 0-row shards too
            out = self.placement.orthogonalize(
                [it.param for it in chosen],
                mats,
                block_size=group["block_size"] if mode == "block" else None,
                ns=ns,
            )
            for it, o in zip(chosen, out):
                it.grad.copy_(o.reshape(it.grad.shape))

    def _trust_region(
        self, group: dict[str, Any], items: list[Item], lr: float, ops: ListOps
    ) -> None:
        tau = group["trust_region"]
        if tau is None or lr == 0:
            return
        uu = torch.stack(ops.sq_norms([it.grad for it in items]))
        ww = torch.stack(ops.sq_norms([it.local.to(it.grad.dtype) for it in items]))
        uu, ww = self.placement.sum_over_shards(torch.stack([uu, ww], dim=1)).double().unbind(1)
        scale = []
        for u2, w2 in zip(uu.tolist(), ww.tolist()):
            step_norm, bound = lr * u2**0.5, tau * w2**0.5
            scale.append(bound / step_norm if w2 > 0 and step_norm > bound else 1.0)
        ops.mul_([it.grad for it in items], scale)

    def _apply(self, group: dict[str, Any], items: list[Item], lr: float, ops: ListOps) -> None:
        locals_ = [it.local for it in items]
        updates = [it.grad for it in items]
        if self.decay(group) and lr:
            ops.mul_(locals_, 1.0 - lr * self.decay(group))
        if locals_ and locals_[0].dtype != updates[0].dtype:
            for p, u in zip(locals_, updates):
                p.add_(u.to(p.dtype), alpha=-lr)
        else:
            ops.add_(locals_, updates, alpha=-lr)


def _rowwise_1d(group: dict[str, Any], w: Tensor) -> bool:
    """Rowwise ⊥Grad on a 1-D weight: its "rows" are one (the fold has one pair)."""
    return group["vector_mode"] == "rowwise" and w.ndim < 2


def _state_dtype(local: Tensor) -> torch.dtype:
    return torch.float64 if local.dtype == torch.float64 else torch.float32


def _default_ns_dtype(t: Tensor) -> torch.dtype:
    if t.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if t.device.type == "cuda" else torch.float32


def dolphinflow_rule(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor | None,
    s: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    nesterov: bool,
    adaptive: bool = True,
    direction: bool = False,
) -> None:
    """DolphinFlow's per-element rule (steps 3-7 of the module docstring), the reference every
    backend is generated from or checked against: in place on ``w``, ``m`` and ``v``.

    ``s`` holds one step's scalars as one tensor (new values never recompile the compiled
    form), ``(decay, 1 − μ, μ, β₂, 1 − β₂, scale, eps, c)``: ``decay = 1 − lr·wd``, ``scale =
    lr·√(1 − β₂ᵗ)/W`` and ``eps·√(1 − β₂ᵗ)`` (the bias corrections folded in, ``W`` the
    Nesterov average's weight; without ``adaptive_lr``: ``lr/W``), ``c`` the clip factor of a raw
    gradient. With ``a, b`` (⊥Grad's per-row coefficients broadcastable against ``g``, the clip
    factor in them; :func:`~shardflow.ops.orthogonalize.orthograd_fold`) the gradient is
    ``a·g − b·w``, else ``c·g``. Then::

        v ← β₂·v + (1 − β₂)·g·g                         (adaptive_lr)
        m ← m + (1 − μ)·(g − m)
        n = g + μ·(m − g)   (Nesterov: an average)   or   m
        u = scale·n / (√v + eps)   (adaptive_lr)   or   scale·n
        w ← w·decay − u           (direction: g ← u instead, w only read)

    ``g`` is only read, unless ``direction``. A function of its arguments only, for
    ``torch.compile`` (one generated loop reads ``w, g, m, v`` and writes ``w, m, v``, as fused
    AdamW does); ``csrc/dolphinflow_rule.h`` is the same operations in C.
    """
    decay, one_minus_mu, mu, beta2, one_minus_beta2, scale, eps, c = s.unbind()
    w32 = w.to(s.dtype)
    g_in = g
    g = a * g - b * w32 if a is not None and b is not None else c * g
    m_new = m + one_minus_mu * (g - m)
    n = g + mu * (m_new - g) if nesterov else m_new
    u = scale * n
    if adaptive:
        assert v is not None
        v_new = beta2 * v + one_minus_beta2 * g * g
        u = u / (v_new.sqrt() + eps)
        v.copy_(v_new)
    m.copy_(m_new)
    if direction:
        g_in.copy_(u)
    else:
        w.copy_((w32 * decay - u).to(w.dtype))


def dolphinflow_rule_each(
    ws: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    ss: list[Tensor],
    as_: list[Tensor] | None = None,
    bs: list[Tensor] | None = None,
    *,
    nesterov: bool,
    adaptive: bool = True,
    direction: bool = False,
) -> None:
    """:func:`dolphinflow_rule` for each parameter of the lists: one compiled call for them all
    (the compiled backend compiles this function, i.e. the reference rule itself)."""
    for i, (w, g, m, s) in enumerate(zip(ws, gs, ms, ss)):
        dolphinflow_rule(
            w,
            g,
            m,
            None if vs is None else vs[i],
            s,
            None if as_ is None else as_[i],
            None if bs is None else bs[i],
            nesterov=nesterov,
            adaptive=adaptive,
            direction=direction,
        )


def dolphinflow_rule_foreach(
    ws: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor | None],
    as_: list[Tensor | None],
    bs: list[Tensor | None],
    rows: list[tuple[float, ...]],
    *,
    nesterov: bool,
    adaptive: bool = True,
    direction: bool = False,
) -> None:
    """:func:`dolphinflow_rule` on lists with ``torch._foreach_*`` kernels: the same operations
    in the same order (one list pass each), the scalars as Python floats (``rows``: one
    :func:`dolphinflow_rule` ``s`` per parameter). Checked against the rule by
    ``tests/test_backends.py``. All tensors of one dtype and device."""
    decay, omm, mu, beta2, omb2, scale, eps, c = (list(x) for x in zip(*rows))
    w32 = ws
    if any(a is not None for a in as_):  # ⊥Grad folded: per-row coefficients, per tensor
        g2 = [
            a * g - b * w if a is not None and b is not None else g * k
            for w, g, a, b, k in zip(ws, gs, as_, bs, c)
        ]
    else:
        g2 = torch._foreach_mul(gs, c)
    d = torch._foreach_sub(g2, ms)
    torch._foreach_mul_(d, omm)
    torch._foreach_add_(ms, d)
    if nesterov:
        d = torch._foreach_sub(ms, g2)
        torch._foreach_mul_(d, mu)
        n = torch._foreach_add(g2, d)
    else:
        n = list(ms)
    u = torch._foreach_mul(n, scale)
    del d, n
    if adaptive:
        sq = torch._foreach_mul(g2, omb2)
        torch._foreach_mul_(sq, g2)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_add_(vs, sq)
        del sq
        den = torch._foreach_sqrt(vs)
        torch._foreach_add_(den, eps)
        torch._foreach_div_(u, den)
    if direction:
        torch._foreach_copy_(gs, u)
    else:
        torch._foreach_mul_(w32, decay)
        torch._foreach_sub_(w32, u)


def orthograd_sums_each(grads: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """Row-wise :func:`~shardflow.ops.orthogonalize.orthograd_sums` of each pair (the flat
    sums are their column sums)."""
    return [orthograd_sums(g, w, rowwise=True) for g, w in zip(grads, weights)]


def sq_norms_each(grads: list[Tensor]) -> list[Tensor]:
    """``‖g‖²`` of each flat gradient, as four interleaved partial sums: one generated loop that
    reads four streams of a tensor at once. On a 28 M-element gradient it is 34–36 % faster than
    a BLAS dot on one CPU thread, and within ±10 % of it on two (memory-level parallelism;
    ``python -m bench.kernels``, ``bench/results/kernels-cpu2-2026-11-23.md``)."""
    out = []
    for g in grads:
        cut = g.shape[0] - g.shape[0] % 4
        body, tail = g[:cut].view(4, -1), g[cut:]
        out.append((body * body).sum(0).sum() + (tail * tail).sum())
    return out


LARGE = 1 << 20
"""Elements from which the compiled norm pass reads a gradient with :func:`sq_norms_each`
(below it a BLAS dot per tensor costs less than a compiled call)."""


def _streams_well(g: Tensor) -> bool:
    return g.numel() >= LARGE and g.is_contiguous() and g.dtype in _RAW_DTYPES


def _row_sums(
    grads: list[Tensor],
    weights: list[Tensor],
    ops: ListOps,
    comps: list[Tensor | None] | None = None,
) -> list[Tensor]:
    """Row-wise ⊥Grad sums of each pair on the step's backend: through
    :func:`~shardflow.ops.compiling.each` when compiling (except empty shards: a 0-row tensor
    would be a graph of its own), the native kernel where it takes the pair, else torch's ops.
    A low-precision weight counts with its Kahan compensation (``comps``, None: none)."""
    comps = comps or [None] * len(weights)
    weights = [w.detach() for w in weights]
    out: list[Tensor | None] = [None] * len(grads)
    if ops.native and not ops.compiled:
        for i, (g, w, c) in enumerate(zip(grads, weights, comps)):
            if g.numel() and (
                dolphinflow_native.usable(g, w) or dolphinflow_native.takes_bf16(w, g, c)
            ):
                out[i] = dolphinflow_native.row_sums(g, w, c)
    weights = [
        lowp.working_copy(w, c) if w.dtype in lowp.LOW_PRECISION and o is None else w
        for w, c, o in zip(weights, comps, out)
    ]
    if ops.compiled:
        full = [i for i, g in enumerate(grads) if g.numel()]
        done = each(orthograd_sums_each, [grads[i] for i in full], [weights[i] for i in full])
        for i, x in zip(full, done):
            out[i] = x
    for i, (g, w) in enumerate(zip(grads, weights)):
        if out[i] is None:
            out[i] = orthograd_sums(g, w)
    return out  # type: ignore[return-value]


_RAW_DTYPES = (torch.float32, torch.float64)
"""Gradient dtypes the compiled pass reads directly (others are copied to fp32 first)."""


def _make_scratch(items: list[Item], ops: ListOps) -> None:
    """Give ``items`` clipped scratch gradients in the compute dtype (the base's default)."""
    if not items:
        return
    copies = ops.clone_scaled(
        [it.grad for it in items], items[0].grad_scale, _compute_dtype(items[0].grad)
    )
    for it, g in zip(items, copies):
        it.grad, it.grad_scale = g, 1.0


def _folds(
    sums: list[Tensor], restore_norm: bool, scales: list[float], compiled: bool
) -> list[tuple[Tensor, Tensor]]:
    """:func:`~shardflow.ops.orthogonalize.orthograd_fold` of each parameter's sums times its
    ``scale`` (the clip factor still to apply to a raw gradient: ``c·g⊥ = (c·a)·g − (c·b)·w``),
    computed on all rows at once: one compiled kernel (:func:`scaled_fold`) when ``compiled``
    and the scales agree, else a dozen small kernels per group, not per parameter."""
    if len({x.dtype for x in sums}) > 1:
        folds = [orthograd_fold(x, restore_norm=restore_norm) for x in sums]
        return [(a * c, b * c) for (a, b), c in zip(folds, scales)]
    rows = [x.shape[0] for x in sums]
    cat = torch.cat(sums)
    if compiled and len(set(scales)) == 1:
        c = torch.tensor(scales[0], dtype=cat.dtype, device=cat.device)
        a, b = compile_once(scaled_fold)(cat, c, restore_norm=restore_norm)
        return list(zip(a.split(rows), b.split(rows)))
    a, b = orthograd_fold(cat, restore_norm=restore_norm)
    if any(c != 1.0 for c in scales):
        per_row = torch.tensor(scales, dtype=a.dtype, device=a.device).repeat_interleave(
            torch.tensor(rows, device=a.device), output_size=a.shape[0]
        )
        a, b = a * per_row, b * per_row
    return list(zip(a.split(rows), b.split(rows)))


def scaled_fold(sums: Tensor, c: Tensor, *, restore_norm: bool) -> tuple[Tensor, Tensor]:
    """:func:`~shardflow.ops.orthogonalize.orthograd_fold` with both coefficients times the
    0-d ``c``: a function of its arguments, for ``torch.compile`` (one loop over the rows)."""
    a, b = orthograd_fold(sums, restore_norm=restore_norm)
    return a * c, b * c


def _scalar_rows(grads: list[Tensor], rows: list[tuple[float, ...]]) -> list[Tensor]:
    """Each row of step scalars as a 1-D tensor in its gradient's compute dtype and device: one
    tensor for them all when those agree (one copy, not one per parameter)."""
    kinds = {(_compute_dtype(g), g.device) for g in grads}
    if len(kinds) == 1:
        dtype, device = kinds.pop()
        return list(torch.tensor(rows, dtype=dtype, device=device).unbind(0))
    return [
        torch.tensor(row, dtype=_compute_dtype(g), device=g.device) for g, row in zip(grads, rows)
    ]


def _values(scalars: list[Tensor]) -> list[float]:
    """The values of 0-d tensors (one copy for them all, not one ``float()`` each)."""
    return torch.stack(scalars).tolist() if scalars else []


def _same_kind(tensors: list[Tensor]) -> bool:
    """All of one dtype and device (the foreach kernels take them in one call)."""
    return len({(t.dtype, t.device) for t in tensors}) <= 1
