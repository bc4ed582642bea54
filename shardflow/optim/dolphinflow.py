"""DolphinFlow: ⊥Grad or Newton-Schulz orthogonalization, Nesterov momentum, Adam-like scaling.

The update rule, for one parameter ``w`` with gradient ``g`` (after global clipping), step ``t``:

1. **Route.** Hidden matrices (2+ dims, not an embedding or head) follow the group's
   ``ortho_mode``; everything else is element-wise (see :mod:`shardflow.optim.routing`).
2. **⊥Grad** (``ortho_mode="vector"``): ``g ← g − (⟨g,w⟩/‖w‖²)·w``, per row (``vector_mode=
   "rowwise"``, the default) or over the whole tensor (``"flat"``), rescaled to ``‖g‖`` when
   ``restore_norm`` (Prieto et al., arXiv 2501.04697).
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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from shardflow.ops.compiling import compile_once, each
from shardflow.ops.listops import ListOps
from shardflow.ops.orthogonalize import (
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
    check_nonnegative,
    check_optional_positive,
    check_unit_interval,
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
        loss_aware_schedule: lower the lr when the loss stalls (needs ``step(closure)``);
            see :class:`~shardflow.optim.schedule.LossAwareSchedule`.
        verbose: log per-step summaries to the ``shardflow`` logger.
        foreach: use ``torch._foreach_*`` kernels (None: when all tensors share a device).
        compiled: run the element-wise pass of the element-wise and vector routes (with
            ``adaptive_lr`` and no ``trust_region``) through ``torch.compile`` — one generated
            loop per parameter instead of ~10 list passes (:func:`fused_update`), eight
            parameters per call, the ⊥Grad row sums taken in the clipping-norm pass (those
            gradients are read twice per step, the others twice too: norm and update); None:
            on CUDA only. The first step pays the compilation (seconds with a warm inductor
            cache, about a minute cold on a 2-core CPU).
    """
        + SHARED_ARGS_DOC
    )

    scratch_grads: ClassVar[bool] = False
    """The compiled pass reads the raw gradient; other paths copy it (:func:`_make_scratch`)."""

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
        process_group: Any = None,
        foreach: bool | None = None,
        compiled: bool | None = None,
        grads_reduced: bool = False,
        precision: str | None = None,
        decouple_lr: bool = False,
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
        )
        check_bool("loss_aware_schedule", loss_aware_schedule)
        check_bool("verbose", verbose)
        if compiled is not None and not isinstance(compiled, bool):
            raise ValueError(
                f"compiled={compiled!r} is invalid: pass True, False or None (compile on CUDA only)."
            )
        self.verbose = verbose
        self.compiled = compiled
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
        )
        self.loss_schedule = LossAwareSchedule(self) if loss_aware_schedule else None

    # -- validation and state ---------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        if not isinstance(group["lr"], (int, float)) or not group["lr"] >= 0:
            raise ValueError(
                f"lr={group['lr']!r} is invalid: pass a learning rate >= 0, e.g. 1e-4."
            )
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
            or not all(isinstance(b, (int, float)) for b in bounds)
            or not 0 <= bounds[0] <= bounds[1] < 1
        ):
            raise ValueError(
                f"momentum_bounds={bounds!r} is invalid: pass (low, high) with 0 <= low <= high < 1, "
                "e.g. (0.7, 0.98)."
            )
        check_optional_positive("trust_region", group["trust_region"])
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

    def _reads_raw(self, group: dict[str, Any], grad: Tensor) -> bool:
        """Whether the compiled fused pass reads this element-wise/vector gradient raw (no
        scratch copy): every other path works in a clipped copy (dynamic momentum applies ⊥Grad
        to the gradient itself, so it needs one too)."""
        return (
            not self.scratch_grads
            and self._use_compiled(grad)
            and group["adaptive_lr"]
            and group["trust_region"] is None
            and not group["dynamic_momentum"]
            and grad.dtype in _RAW_DTYPES
        )

    def _local_sq_norm(self, collected: list[Collected], ops: ListOps) -> Tensor:
        """The clipping norm's ``Σ‖g‖²``, with the ⊥Grad row sums of the raw-read vector
        gradients computed in the same pass (compiled, chunked): ``‖g‖²`` of a matrix is the sum
        of its rows' ``‖g‖²``, so those gradients are read once before the update, not twice.
        The sums wait in ``_row_sums`` for :meth:`_orthograd`. Other large gradients go through
        :func:`sq_norms_each` when compiling, the rest through the base's pass."""
        self._row_sums = {}
        vector, large, rest = [], [], []
        for group, params, grads in collected:
            for p, g in zip(params, grads):
                if g.numel() > 0 and self.route(p, group) == "vector" and self._reads_raw(group, g):
                    vector.append((p, g))
                elif _streams_well(g) and self._use_compiled(g):
                    large.append(g.view(-1))
                else:
                    rest.append(g)
        total = _sum_sq(rest, ops)
        if large:
            total = total + torch.stack(each(sq_norms_each, large)).double().sum()
        if vector:
            params, grads = zip(*vector)
            weights = [self.placement.local(p) for p in params]
            sums = _row_sums(list(grads), weights, compiled=True)
            self._row_sums = dict(zip(params, sums))
            total = total + torch.cat([s[:, 2] for s in sums]).double().sum()
        return total

    def _update_group(self, group: dict[str, Any], items: list[Item], ops: ListOps) -> None:
        lr = group["lr"] * group["lr_scale"]
        routes = {it.param: self.route(it.param, group) for it in items}
        fusable = group["adaptive_lr"] and group["trust_region"] is None
        fused = [it for it in items if fusable and routes[it.param] in ("vector", "elementwise")]
        raw = {id(it) for it in fused if self._reads_raw(group, it.grad)}
        if not self.scratch_grads:
            _make_scratch([it for it in items if id(it) not in raw], ops)
        rest = [
            it for it in items if not (fusable and routes[it.param] in ("vector", "elementwise"))
        ]
        vector = [it for it in items if routes[it.param] == "vector"]
        # ⊥Grad is folded into the fused pass, unless dynamic momentum must see g⊥ first
        folds = self._orthograd(group, vector, fold=fusable and not group["dynamic_momentum"])
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

    def _fused_update(
        self,
        group: dict[str, Any],
        items: list[Item],
        mus: list[float],
        lr: float,
        folds: dict[int, tuple[Tensor, Tensor]],
        ops: ListOps,
    ) -> None:
        """Element-wise and vector routes with ``adaptive_lr`` and no trust region: one pass.

        Steps 3-7 of the rule with the bias corrections folded into two scalars per parameter
        (``1 − β₂ᵗ = c``, ``W`` the Nesterov weight):
        ``u = (n/W) / (√(v/c) + eps) = s·n / (√v + eps·√c)`` with ``s = √c / W``, so the update
        is ``w ← w·(1 − lr·wd) − lr·s·n / (√v + eps·√c)``; ⊥Grad enters as ``g ← a·g − b·w``
        (:func:`~shardflow.ops.orthogonalize.orthograd_fold`). Compiled
        (:func:`fused_update`, one loop reading ``w, g, m, v``) or eager (in-place list ops).
        """
        weights = self._nesterov_weights(group, items, mus)
        beta2, eps, decay = group["beta2"], group["eps"], 1.0 - lr * self.decay(group)
        corr = [1.0 - beta2**t for t in _values([it.state["step"] for it in items])]
        scales = [lr * c**0.5 / w for c, w in zip(corr, weights)]
        epss = [eps * c**0.5 for c in corr]
        if self._use_compiled(items[0].grad):
            rows = [
                (decay, 1.0 - mu, beta2, s, e, it.grad_scale)
                for it, mu, s, e in zip(items, mus, scales, epss)
            ]
            self._fused_compiled(group, items, rows, folds)
            return

        grads = [it.grad for it in items]
        for it in items:
            if id(it) in folds:
                self._apply_fold(group, it, folds[id(it)])
        bufs = [it.state["exp_avg"] for it in items]
        sqs = [it.state["exp_avg_sq"] for it in items]
        ops.square_ema_(sqs, grads, beta2)
        ops.lerp_(bufs, grads, _one_or_each([1.0 - mu for mu in mus]))
        if group["nesterov"]:
            ops.lerp_(grads, bufs, _one_or_each(mus))  # n = μ·m + (1−μ)·g, in g
        nums = grads if group["nesterov"] else bufs
        denoms = _sqrt_plus(sqs, epss, ops.foreach)
        locals_ = [it.local for it in items]
        if self.decay(group) and lr:
            ops.mul_(locals_, decay)
        _addcdiv_(locals_, nums, denoms, [-s for s in scales], ops.foreach)

    def _fused_compiled(
        self,
        group: dict[str, Any],
        items: list[Item],
        scalars: list[tuple[float, ...]],
        folds: dict[int, tuple[Tensor, Tensor]],
    ) -> None:
        """The fused pass through :func:`fused_update_each`: parameters with and without ⊥Grad
        in separate calls, each call a chunk of parameters
        (:func:`~shardflow.ops.compiling.each`)."""
        rowwise = group["vector_mode"] == "rowwise"
        args: list[tuple[bool, list[Tensor], list[Tensor]]] = []  # (folded, w g m v, a b)
        rows: list[tuple[float, ...]] = []
        for it, row in zip(items, scalars):
            # detach: parameters would get static shapes (one graph per shape)
            tensors = [it.local.detach(), it.grad, it.state["exp_avg"], it.state["exp_avg_sq"]]
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
            calls[folded].append((*tensors, s, *ab))
        for batch in calls.values():
            if batch:
                each(fused_update_each, *map(list, zip(*batch)), nesterov=group["nesterov"])

    @staticmethod
    def _apply_fold(group: dict[str, Any], it: Item, fold: tuple[Tensor, Tensor]) -> None:
        rowwise = group["vector_mode"] == "rowwise"
        scale = group["restore_norm"]
        apply_fold_(_rows(it.grad, rowwise), _rows(it.local, rowwise), *fold, scale=scale)

    def _use_compiled(self, t: Tensor) -> bool:
        return self.compiled if self.compiled is not None else t.device.type == "cuda"

    def _stepwise_update(
        self,
        group: dict[str, Any],
        items: list[Item],
        mus: list[float],
        lr: float,
        routes: dict[Tensor, str],
        ops: ListOps,
    ) -> None:
        """Every route and option, one list pass per operation (Newton-Schulz, trust region and
        the RMS normalization need the whole direction before the weights move)."""
        ortho = [it for it in items if routes[it.param] in ("matrix", "block")]
        plain = [it for it in items if routes[it.param] in ("vector", "elementwise")]
        weights = self._nesterov_weights(group, items, mus)
        if group["adaptive_lr"] and self._use_compiled(items[0].grad):
            self._direction_compiled(group, items, mus, weights)
        else:
            self._direction(group, items, mus, weights, ops)
        if not group["adaptive_lr"]:
            self._normalize_rms(plain, ops)
        self._orthogonalize(group, ortho, routes)
        self._trust_region(group, items, lr, ops)
        self._apply(group, items, lr, ops)

    def _direction(
        self,
        group: dict[str, Any],
        items: list[Item],
        mus: list[float],
        weights: list[float],
        ops: ListOps,
    ) -> None:
        """Steps 3-5 of the rule in place, one list pass per operation: the moments, then
        ``g ← (n/W) / (√(v/(1 − β₂ᵗ)) + eps)`` (``adaptive_lr``) or ``g ← n/W``."""
        grads = [it.grad for it in items]
        if group["adaptive_lr"]:
            ops.square_ema_([it.state["exp_avg_sq"] for it in items], grads, group["beta2"])
        bufs = [it.state["exp_avg"] for it in items]
        ops.lerp_(bufs, grads, _one_or_each([1.0 - mu for mu in mus]))
        if group["nesterov"]:
            ops.lerp_(grads, bufs, _one_or_each(mus))  # g ← μ·m + (1−μ)·g
        else:
            for g, m in zip(grads, bufs):
                g.copy_(m)
        ops.mul_(grads, [1.0 / w for w in weights])
        if group["adaptive_lr"]:
            steps = _values([it.state["step"] for it in items])
            debias = [1.0 / (1.0 - group["beta2"] ** t) for t in steps]
            ops.div_by_rms_denominator_(
                grads, [it.state["exp_avg_sq"] for it in items], debias, group["eps"]
            )

    def _direction_compiled(
        self, group: dict[str, Any], items: list[Item], mus: list[float], weights: list[float]
    ) -> None:
        """:meth:`_direction` with ``adaptive_lr`` as one compiled pass per chunk of parameters
        (:func:`direction_update_each`): the matrices reach Newton-Schulz after one read of
        ``g, m, v`` instead of six list passes."""
        steps = _values([it.state["step"] for it in items])
        beta2, eps = group["beta2"], group["eps"]
        todo, rows = [], []
        for it, mu, w, t in zip(items, mus, weights, steps):
            if it.grad.numel():
                todo.append([it.grad, it.state["exp_avg"], it.state["exp_avg_sq"]])
                rows.append((1.0 - mu, beta2, 1.0 / w, 1.0 / (1.0 - beta2**t), eps))
        if not todo:
            return
        todo = [
            [t.view(-1) for t in ts] if all(t.is_contiguous() for t in ts) else ts for ts in todo
        ]
        scalars = _scalar_rows([ts[0] for ts in todo], rows)
        each(direction_update_each, *map(list, zip(*todo)), scalars, nesterov=group["nesterov"])

    def _orthograd(
        self, group: dict[str, Any], items: list[Item], fold: bool
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """⊥Grad for the vector route: applied to ``it.grad`` now, or (``fold``) returned as
        per-row coefficients ``(a, b)`` by ``id(item)`` for the fused pass to apply."""
        if not items:
            return {}
        rowwise = group["vector_mode"] == "rowwise"
        # raw-read gradients: the sums came with the clipping norm (_local_sq_norm)
        sums = [self._row_sums.pop(it.param, None) for it in items]
        todo = [i for i, x in enumerate(sums) if x is None]
        grads, weights = [items[i].grad for i in todo], [items[i].local for i in todo]
        for i, x in zip(todo, _row_sums(grads, weights, self._use_compiled(items[0].grad))):
            sums[i] = x
        if not rowwise:  # the flat sums: over the rows, then over the ranks holding rows
            flat = torch.cat([x.sum(0, keepdim=True) for x in sums])
            sums = list(self.placement.sum_over_shards(flat).split(1))
        if fold:
            scales = [it.grad_scale for it in items]
            compiled = self._use_compiled(items[0].grad)
            folds = _folds(sums, group["restore_norm"], scales, compiled)
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


def _state_dtype(local: Tensor) -> torch.dtype:
    return torch.float64 if local.dtype == torch.float64 else torch.float32


def _default_ns_dtype(t: Tensor) -> torch.dtype:
    if t.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if t.device.type == "cuda" else torch.float32


def fused_update(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    s: Tensor,
    *,
    nesterov: bool,
) -> None:
    """One element-wise pass of DolphinFlow's step, in place on ``w``, ``m`` and ``v``.

    A function of its arguments only, written for ``torch.compile`` (one generated loop reads
    ``w, g, m, v`` and writes ``w, m, v``, as fused AdamW does). ``s`` holds the step's scalars as
    one tensor, ``(1 − lr·wd, 1 − μ, β₂, lr·√(1 − β₂ᵗ)/W, eps·√(1 − β₂ᵗ), c)``, so new values never
    recompile; ``c`` scales the gradient (the clip factor, when ``g`` is the raw gradient). With
    ``a, b`` (per-row coefficients of ⊥Grad, broadcastable against ``g``, ``c`` already in them;
    :func:`~shardflow.ops.orthogonalize.orthograd_fold`) the gradient is ``a·g − b·w``
    instead (folding ``c`` into the per-row coefficients keeps the generated loop as short as
    fused AdamW's; a loop computing ``c·(a·g − b·w)`` ran slower in a one-off CPU check). Then ``v ← β₂v + (1−β₂)g²``, ``m ← m + (1−μ)(g − m)``, ``n = g + μ(m − g)``
    (Nesterov) or ``m``, ``w ← w·(1 − lr·wd) − s₃·n / (√v + s₄)``.
    """
    decay, one_minus_mu, beta2, scale, eps, c = s.unbind()
    w32 = w.to(s.dtype)
    g = a * g - b * w32 if a is not None and b is not None else c * g
    v_new = beta2 * v + (1 - beta2) * g * g
    m_new = m + one_minus_mu * (g - m)
    n = g + (1 - one_minus_mu) * (m_new - g) if nesterov else m_new
    w.copy_((w32 * decay - scale * n / (v_new.sqrt() + eps)).to(w.dtype))
    m.copy_(m_new)
    v.copy_(v_new)


def fused_update_each(
    ws: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    ss: list[Tensor],
    as_: list[Tensor] | None = None,
    bs: list[Tensor] | None = None,
    *,
    nesterov: bool,
) -> None:
    """:func:`fused_update` for each parameter of the lists: one compiled call for them all."""
    for i, (w, g, m, v, s) in enumerate(zip(ws, gs, ms, vs, ss)):
        a = None if as_ is None else as_[i]
        b = None if bs is None else bs[i]
        fused_update(w, g, m, v, a, b, s, nesterov=nesterov)


def direction_update(g: Tensor, m: Tensor, v: Tensor, s: Tensor, *, nesterov: bool) -> None:
    """Steps 3-5 of DolphinFlow's rule with ``adaptive_lr``, in place, one element-wise pass:
    ``v ← β₂v + (1−β₂)g²``, ``m ← m + (1−μ)(g − m)``, ``n = g + μ(m − g)`` (Nesterov) or ``m``,
    ``g ← (n/W) / (√(v/(1 − β₂ᵗ)) + eps)``: the direction Newton-Schulz and the trust region
    take. ``s = (1 − μ, β₂, 1/W, 1/(1 − β₂ᵗ), eps)``, one tensor (new values never recompile)."""
    one_minus_mu, beta2, inv_weight, debias, eps = s.unbind()
    v_new = beta2 * v + (1 - beta2) * g * g
    m_new = m + one_minus_mu * (g - m)
    n = g + (1 - one_minus_mu) * (m_new - g) if nesterov else m_new
    g.copy_(n * inv_weight / ((v_new * debias).sqrt() + eps))
    m.copy_(m_new)
    v.copy_(v_new)


def direction_update_each(
    gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], ss: list[Tensor], *, nesterov: bool
) -> None:
    """:func:`direction_update` for each parameter of the lists: one compiled call for them all."""
    for g, m, v, s in zip(gs, ms, vs, ss):
        direction_update(g, m, v, s, nesterov=nesterov)


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


def _row_sums(grads: list[Tensor], weights: list[Tensor], compiled: bool) -> list[Tensor]:
    """Row-wise ⊥Grad sums of each pair; ``compiled``: through
    :func:`~shardflow.ops.compiling.each`, except empty shards (a 0-row tensor would be a graph
    of its own)."""
    weights = [w.detach() for w in weights]
    if not compiled:
        return orthograd_sums_each(grads, weights)
    full = [i for i, g in enumerate(grads) if g.numel()]
    out = [orthograd_sums(g, w) if not g.numel() else None for g, w in zip(grads, weights)]
    done = each(orthograd_sums_each, [grads[i] for i in full], [weights[i] for i in full])
    for i, x in zip(full, done):
        out[i] = x
    return out


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


def _one_or_each(values: list[float]) -> float | list[float]:
    """One scalar when every value is equal (the foreach kernels take it), else the list."""
    return values[0] if values and all(v == values[0] for v in values) else values


def _sqrt_plus(xs: list[Tensor], adds: list[float], foreach: bool) -> list[Tensor]:
    """New tensors ``√x + add``, one ``add`` per tensor."""
    if foreach and xs:
        out = torch._foreach_sqrt(xs)
        torch._foreach_add_(out, adds)
        return out
    return [x.sqrt().add_(a) for x, a in zip(xs, adds)]


def _addcdiv_(
    xs: list[Tensor], nums: list[Tensor], dens: list[Tensor], values: list[float], foreach: bool
) -> None:
    """``x += value · num / den`` per tensor; ``x`` may be of a lower precision (bf16 weights)."""
    if foreach and xs and xs[0].dtype == nums[0].dtype:
        torch._foreach_addcdiv_(xs, nums, dens, values)
        return
    for x, n, d, v in zip(xs, nums, dens, values):
        if x.dtype == n.dtype:
            x.addcdiv_(n, d, value=v)
        else:
            x.add_(d.reciprocal_().mul_(n).to(x.dtype), alpha=v)
