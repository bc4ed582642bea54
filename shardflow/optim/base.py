"""The base every ShardFlow optimizer shares: bookkeeping, never maths.

A subclass supplies three things:

- ``_check_group(group)``: validate one param group's hyperparameters (``ValueError`` naming the
  argument, the value and the fix);
- ``_init_state(param, local, group, state)``: create the state of one parameter from its local
  tensor, eagerly, at construction (so ``state_dict()`` keys are the same on every rank);
- ``_update_group(group, items, ops)``: apply one step to the parameters of a group, given
  :class:`Item` records (local param, scratch fp32 gradient already clipped, state). With
  bf16/fp16 weights it may be called more than once per group and step, on consecutive chunks
  of the items (their fp32 working copies are bounded, see ``_working_copy_chunks``): a
  per-group sum over the step accumulates across calls.

A rule that only reads the gradient may set ``scratch_grads = False``: it then gets the raw
local gradients (never to be written) with the clip factor in ``Item.grad_scale`` and saves the
copy — one allocation and one full pass over the gradients per step.

and may override ``_ns_tile(param, group, name)`` (which parameters Newton-Schulz orthogonalizes,
and in which tiles: the sharded placements balance their owner plan on it; the default reads
the ``ortho_mode``/``block_size`` group keys of the DolphinFlow family).

**Collectives and skipped groups.** ``_update_group`` runs only for groups where this rank has
something to update (under the DDP-aware owner plan a rank may own nothing of a group), so a
reduction point that needs every rank (``sum_over_model``) must not be called from there: do
such reductions once per step in ``_after_step`` (FactoredProdigy's ``d``). ``sum_over_shards``
and ``orthogonalize`` are safe: every rank holding pieces of a parameter updates its group.

**State under sharding.** ``_init_state`` runs for every parameter on every rank, with ``local``
holding the rows this rank keeps — 0 rows on a DDP rank that does not own the parameter, or on an
empty FSDP2 shard — so every rank has the same state keys. ``Item.state`` holds plain local
tensors: under FSDP2, ``optimizer.state`` keeps row-layout state (``state_layout`` "rows") as
DTensors with the parameter's placement and ``Item.state`` holds their local tensors, so a rule
updates state **in place** (``state["m"].mul_(...)``); a key it assigns anew is written back
(and re-wrapped) after ``_update_group``.

**Low-precision weights** (every optimizer, every placement): a bf16/fp16 parameter reaches the
rule as an fp32 working copy in ``Item.local`` (its value plus its Kahan compensation), and the
base writes the copy back after ``_update_group`` as the group's ``precision`` says —
``"kahan"`` (the default for low-precision weights: a compensation buffer ``state["kahan"]`` of
the weight's dtype, sharded like the weight), ``"sr"`` (stochastic rounding, no state) or
``"nearest"`` (:mod:`shardflow.ops.precision`). A rule whose own pass writes low-precision weights
in one of these ways says so in ``_stores_weight`` and gets the weight itself.

**Fully decoupled weight decay** (``decouple_lr=True``, optimi's definition): the decay per step
is ``weight_decay·lr/max_lr`` instead of ``weight_decay·lr`` — ``max_lr`` is the group's lr at
construction (or set it per group) — so ``weight_decay`` reads as the decay per step at peak lr,
whatever the lr's scale. A rule reads the coefficient it multiplies by ``lr`` from
:meth:`ShardFlowOptimizer.decay`.

The base does the rest, the same way for every optimizer: it resolves the placement from
``process_group`` once, checks gradients for NaN/inf (a non-finite gradient skips the whole
step, weights and state untouched, counts it in :attr:`nonfinite_steps` and warns once), applies
global gradient clipping from the same single reduction, multiplies ``lr`` by the group's
``lr_scale`` (set by :class:`~shardflow.optim.schedule.LossAwareSchedule`), and keeps state dtypes
exact across ``load_state_dict`` (torch would cast fp32 state to a bf16 param's dtype).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from shardflow.distributed.placement import LocalPlacement, resolve_placement
from shardflow.ops import backend
from shardflow.ops import precision as lowp
from shardflow.ops.compiling import compile_settings
from shardflow.ops.listops import ListOps
from shardflow.ops.native import norm as norm_native
from shardflow.optim._validate import (
    check_bool,
    check_choice,
    check_optional_positive,
    check_real_params,
)
from shardflow.optim.loading import state_dict_problem
from shardflow.optim.routing import is_hidden_matrix

logger = logging.getLogger("shardflow")

Collected = tuple[dict[str, Any], list[Tensor], list[Tensor]]
"""One param group as a step sees it: ``(group, params this rank updates, their local grads)``."""

Layout = Literal["rows", "replicated"]
"""How a state tensor reshards: ``rows`` — dim 0 follows the parameter's rows (it is sliced the
way the parameter is); ``replicated`` — identical wherever the parameter's state lives."""


@dataclass(slots=True)
class Item:
    """One parameter as an update rule sees it."""

    param: Tensor
    """The parameter as the user holds it (possibly a DTensor)."""
    local: Tensor
    """The part of the parameter this rank updates, a plain tensor (updated in place)."""
    grad: Tensor
    """Scratch copy of the local gradient in the compute dtype, clipped; the rule may overwrite it
    (with ``scratch_grads = False``: the raw local gradient, read-only, times ``grad_scale``)."""
    state: dict[str, Any]
    """The parameter's state as plain local tensors (update in place; see the module doc)."""
    grad_scale: float = 1.0
    """The clip factor still to apply to ``grad`` (1.0 when ``grad`` is a scratch copy)."""


SHARED_ARGS_DOC = """
        process_group: ProcessGroup or 1-D DeviceMesh to shard over; None: one process.
        grads_reduced: with a process_group and a DDP-wrapped model, True says DDP has already
            averaged the gradients (the optimizer then sends none itself).
        precision: how updates reach bf16/fp16 weights: ``"kahan"`` (the default for them:
            a compensation buffer of the weight's dtype, +2 B/param for bf16), ``"sr"``
            (stochastic rounding, no state) or ``"nearest"`` (round to nearest: updates below
            half a unit in the last place are lost). No effect on fp32 weights.
        decouple_lr: fully decoupled weight decay: decay ``weight_decay·lr/max_lr`` per step
            (``max_lr``: the group's lr at construction) instead of ``weight_decay·lr``.
        gradient_release: update each parameter during ``backward`` as its gradient lands and
            free the gradient (:mod:`shardflow.optim.release`; no global clipping)."""
"""The keyword arguments every ShardFlow optimizer takes, for the subclasses' docstrings."""


class ShardFlowOptimizer(torch.optim.Optimizer):
    """Base class of every ShardFlow optimizer (see the module docstring for the contract)."""

    scratch_grads: ClassVar[bool] = True
    """False: ``_update_group`` gets the raw gradients and ``Item.grad_scale`` (module doc)."""

    last_grad_norm: float | None = None
    """The global gradient norm of the last step, before clipping (from the step's one reduction;
    NaN/inf when that step was skipped; None before the first step)."""

    state_layout: ClassVar[dict[str, Layout]] = {"kahan": "rows"}
    """For every state key the subclass creates, how it reshards (checkpoints read this). The
    base's own keys (``kahan``) are merged into every subclass's declaration."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.state_layout = {**ShardFlowOptimizer.state_layout, **cls.state_layout}

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        process_group: Any = None,
        grads_reduced: bool = False,
        foreach: bool | None = None,
        gradient_clipping: float | None = None,
        precision: str | None = None,
        decouple_lr: bool = False,
        gradient_release: bool = False,
    ) -> None:
        check_optional_positive("gradient_clipping", gradient_clipping)
        check_bool("gradient_release", gradient_release)
        defaults = {**defaults, "precision": precision, "decouple_lr": decouple_lr}
        self._warned_precision = False
        self.foreach = backend.check_foreach(foreach)
        self.gradient_clipping = gradient_clipping
        self.process_group = process_group
        self.grads_reduced = grads_reduced
        self.nonfinite_steps = 0
        """How many steps were skipped because a gradient held NaN or inf."""
        self._constructed = False
        super().__init__(params, defaults)
        self.placement: LocalPlacement = resolve_placement(
            self.param_groups, process_group, self._ns_tile, grads_reduced=grads_reduced
        )
        for group in self.param_groups:
            self._init_group_state(group)
        self._constructed = True
        self._warn_precision_without_effect()
        self.release: Any = None
        """The :class:`~shardflow.optim.release.GradientRelease` running this optimizer's updates
        inside ``backward``, or None (the ordinary step)."""
        if gradient_release:
            from shardflow.optim.release import GradientRelease  # noqa: PLC0415 - cycle

            GradientRelease(self)

    def _warn_precision_without_effect(self) -> None:
        """One warning when ``precision`` is set but no parameter is bf16/fp16 (a no-op)."""
        asked = {g["precision"] for g in self.param_groups} - {None}
        low = any(p.dtype in lowp.LOW_PRECISION for g in self.param_groups for p in g["params"])
        if asked and not low and not self._warned_precision:
            self._warned_precision = True
            warnings.warn(
                f"{type(self).__name__}: precision={sorted(asked)[0]!r} has no effect: every "
                "parameter is fp32/fp64 and is updated exactly. It applies to bf16/fp16 "
                "parameters; leave precision unset for fp32 weights.",
                UserWarning,
                stacklevel=3,
            )

    # -- param groups and state -----------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_constructed", False) and self.process_group is not None:
            raise ValueError(
                "add_param_group after construction is not supported with process_group: the "
                "owner plan is fixed at construction. Pass every group to the constructor."
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("lr_scale", 1.0)
        group.setdefault("max_lr", group["lr"])
        self._check_shared(group)
        self._check_group(group)
        if self._constructed:
            self._init_group_state(group)

    def _check_shared(self, group: dict[str, Any]) -> None:
        """Validate the keys every ShardFlow optimizer shares."""
        check_real_params(type(self).__name__, group)
        check_choice("precision", group["precision"], (*lowp.PRECISIONS, None))
        check_bool("decouple_lr", group["decouple_lr"])
        max_lr = group["max_lr"]
        if group["decouple_lr"] and (
            isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or not max_lr > 0
        ):
            raise ValueError(
                f"max_lr={max_lr!r} is invalid with decouple_lr=True: the decay per step is "
                "weight_decay·lr/max_lr, so pass a group lr > 0 at construction or set the "
                "group's max_lr > 0 (the peak learning rate)."
            )

    def precision_of(self, param: Tensor, group: dict[str, Any]) -> str | None:
        """How updates reach ``param``: one of :data:`~shardflow.ops.precision.PRECISIONS` for a
        bf16/fp16 parameter (``"kahan"`` unless the group says otherwise), None for others."""
        if param.dtype not in lowp.LOW_PRECISION:
            return None
        return group["precision"] or "kahan"

    def decay(self, group: dict[str, Any]) -> float:
        """The weight-decay coefficient the rule multiplies by ``lr`` this step: the group's
        ``weight_decay``, or ``weight_decay/max_lr`` with ``decouple_lr`` (fully decoupled)."""
        if group["decouple_lr"]:
            return group["weight_decay"] / group["max_lr"]
        return group["weight_decay"]

    def _stores_weight(self, group: dict[str, Any], item: Item, ops: ListOps) -> bool:
        """Whether the rule reads and writes this low-precision weight itself this step, as
        ``precision_of`` says (then ``item.local`` is the weight, not an fp32 working copy, and
        a Kahan compensation is ``item.state["kahan"]`` as usual). Default: no."""
        return False

    def _init_group_state(self, group: dict[str, Any]) -> None:
        """State for every parameter on every rank (0 rows where this rank keeps none)."""
        for p in group["params"]:
            state = self.state[p]
            if state:
                continue
            local = self.placement.local(p)
            self._init_state(p, local, group, state)
            if self.precision_of(p, group) == "kahan":
                state["kahan"] = torch.zeros_like(local)
            for key, value in state.items():
                state[key] = self.placement.wrap_state(p, value, self.state_layout.get(key, ""))

    def _ns_tile(
        self, param: Tensor, group: dict[str, Any], name: str | None
    ) -> tuple[int, int] | None:
        """Newton-Schulz tiles of ``param`` (None: not orthogonalized), for the owner plan.

        The default follows the DolphinFlow family: hidden matrices (see
        :func:`~shardflow.optim.routing.is_hidden_matrix`) of a group whose ``ortho_mode`` is
        ``"matrix"``/``"full"`` are one tile, ``"block"`` ones are ``block_size`` squares.
        """
        mode = group.get("ortho_mode")
        if mode not in ("matrix", "full", "block") or not is_hidden_matrix(param, name):
            return None
        if mode == "block":
            return (group["block_size"], group["block_size"])
        return (param.shape[0], math.prod(param.shape[1:]))

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one group's hyperparameters; subclasses extend."""

    def _init_state(self, param: Tensor, local: Tensor, group: dict[str, Any], state: dict) -> None:
        raise NotImplementedError

    def _update_group(self, group: dict[str, Any], items: list[Item], ops: ListOps) -> None:
        raise NotImplementedError

    def check_param_group(self, group: dict[str, Any]) -> None:
        """The constructor's checks on one param group's hyperparameters (``ValueError``);
        checkpoints run it on the groups they load before loading anything."""
        self._check_shared(group)
        self._check_group(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch, but keep every state tensor's saved dtype (fp32 stays fp32).

        Checked first, and refused with a ``ValueError`` on every rank alike (nothing loaded):
        another optimizer's state or other parameters' (param groups, group keys, state keys,
        tensor shapes: :func:`~shardflow.optim.loading.state_dict_problem`), hyperparameters the
        constructor would refuse, a change of orthogonalization under a process group (the owner
        plan is fixed at construction), and ranks whose loaded hyperparameters differ.
        """
        problem = state_dict_problem(self, state_dict)
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        self.placement.agree(problem, groups if isinstance(groups, list) else [])
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for key, value in saved.get(pid, {}).items():
                if isinstance(value, Tensor) and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(
                        device=self.state[p][key].device, dtype=value.dtype
                    )

    # -- the step ---------------------------------------------------------------------------

    def _ops_for(self, tensors: list[Tensor]) -> ListOps:
        """The step's backend (:func:`shardflow.ops.backend.choose`, once per step): foreach,
        compiled (a subclass's ``compiled`` attribute, if it has one) and native."""
        return backend.choose(
            tensors, foreach=self.foreach, compiled=getattr(self, "compiled", None)
        )

    def _collect(self, only: set[Tensor] | None = None) -> list[Collected]:
        """Per group: the owned params (of ``only``, None: all) that have a gradient and their
        local gradients."""
        out = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if only is not None and p not in only:
                    continue
                grad = self.placement.grad(p)
                if grad is None or not self.placement.owns(p):
                    continue
                params.append(p)
                grads.append(self.placement.local(grad))
            out.append((group, params, grads))
        return out

    def _local_sq_norm(self, collected: list[Collected], ops: ListOps) -> Tensor:
        """``Σ‖g‖²`` over this rank's local gradients, a 0-d float64 tensor.

        The base reads every gradient once for it (:func:`_sq_norms`). A rule that reads the
        gradients anyway before its update may override this to take the sum from that pass
        and keep what else the pass computed for ``_update_group`` (DolphinFlow's compiled
        path: the ⊥Grad row sums hold ``‖g‖²`` of every row).
        """
        return _sum_sq([g for _, _, grads in collected for g in grads], ops)

    def _grad_scale(
        self, collected: list[Collected], ops: ListOps, max_norm: float | None
    ) -> float | None:
        """One reduction: the gradients' norm, and the clip factor to ``max_norm`` (None: no
        clipping). None when the norm is not finite (skip the update)."""
        total = float(self.placement.sum_over_model(self._local_sq_norm(collected, ops)))
        self.last_grad_norm = norm = math.sqrt(total)
        if not math.isfinite(total):
            return None
        scale = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
        if getattr(self, "verbose", False):
            logger.info("%s: grad norm %.4g, clip scale %.4g", type(self).__name__, norm, scale)
        return scale

    def _skip_nonfinite(self) -> None:
        self.nonfinite_steps += 1
        if self.nonfinite_steps == 1:
            warnings.warn(
                f"{type(self).__name__}: a gradient holds NaN or inf; the step (under gradient "
                "release: that bucket) was skipped (weights and state untouched). Further skips "
                "are counted in optimizer.nonfinite_steps without another warning.",
                RuntimeWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self.compile_context():
            if self.release is not None:
                self.release.finish_step(loss)
            else:
                self._step(loss)
        return loss

    def compile_context(self) -> contextlib.AbstractContextManager:
        """Dynamo's settings where this optimizer's passes may compile, else a no-op context."""
        return compile_settings() if self._may_compile() else contextlib.nullcontext()

    def _may_compile(self) -> bool:
        """Whether this step may run ``torch.compile``d passes (``compiled=True``, or ``None``
        with parameters on CUDA): only then are dynamo's settings entered (importing dynamo
        costs ~1.5 s once, entering the settings ~0.1 ms per step)."""
        params = (p for g in self.param_groups for p in g["params"])
        return backend.may_compile(getattr(self, "compiled", False), params)

    def _step(self, loss: Any) -> None:
        """The step proper: clip, skip on NaN/inf, update each group (see :meth:`step`)."""
        self.placement.before_update(self)
        updated = self._update_params(None, self.gradient_clipping)
        self.placement.after_update(self, updated=updated)
        if updated:
            self._after_step(loss)

    def _update_params(self, only: set[Tensor] | None, max_norm: float | None) -> bool:
        """Update the parameters of ``only`` (None: all) that have a gradient, clipped to
        ``max_norm`` by their joint norm (one ``sum_over_model``: every rank calls this alike).
        A NaN/inf gradient among them skips them all, state untouched, and counts in
        :attr:`nonfinite_steps`; returns whether they were updated. Gradient release
        (:mod:`shardflow.optim.release`) calls this once per bucket."""
        collected = self._collect(only)
        all_grads = [g for _, _, gs in collected for g in gs]
        ops = self._ops_for(all_grads)
        scale = self._grad_scale(collected, ops, max_norm)
        if scale is None:
            self._skip_nonfinite()
            return False
        for group, params, grads in collected:
            if not params:
                continue
            if self.scratch_grads:
                grads, grad_scale = ops.clone_scaled(grads, scale, _compute_dtype(grads[0])), 1.0
            else:
                grad_scale = scale
            items = [
                Item(
                    p,
                    self.placement.local(p),
                    g,
                    self.placement.state_view(self.state[p]),
                    grad_scale,
                )
                for p, g in zip(params, grads)
            ]
            seen = [None if it.state is self.state[it.param] else dict(it.state) for it in items]
            for chunk in self._working_copy_chunks(items):
                weights = self._working_copies(group, chunk, ops)
                self._update_group(group, chunk, ops)
                self._store_weights(group, weights)
            for it, before in zip(items, seen):
                self._store_state(it, before)
        return True

    def _working_copy_chunks(self, items: list[Item]) -> list[list[Item]]:
        """``items`` cut so that their fp32 working copies at once hold at most
        :data:`~shardflow.ops.precision.WORKING_COPY_FRACTION` of the group's low-precision
        elements (one chunk without bf16/fp16 weights). Cut by global sizes, so every rank of a
        sharded placement cuts alike."""
        sizes = [
            self.placement.global_shape(it.param).numel()
            if it.local.dtype in lowp.LOW_PRECISION
            else 0
            for it in items
        ]
        budget = sum(sizes) * lowp.WORKING_COPY_FRACTION
        chunks: list[list[Item]] = [[]]
        size = 0
        for it, n in zip(items, sizes):
            if chunks[-1] and size + n > budget:
                chunks.append([])
                size = 0
            chunks[-1].append(it)
            size += n
        return chunks

    def _working_copies(
        self, group: dict[str, Any], items: list[Item], ops: ListOps
    ) -> list[tuple[Item, Tensor]]:
        """Give each low-precision item an fp32 working copy as ``local`` (unless the rule
        stores it itself, :meth:`_stores_weight`); returns the pairs ``(item, weight)`` to write
        back (:meth:`_store_weights`)."""
        out = []
        for it in items:
            if it.local.dtype not in lowp.LOW_PRECISION or self._stores_weight(group, it, ops):
                continue
            out.append((it, it.local))
            it.local = lowp.working_copy(it.local, it.state.get("kahan"))
        return out

    def _store_weights(self, group: dict[str, Any], weights: list[tuple[Item, Tensor]]) -> None:
        """Write the working copies back, as each parameter's precision says."""
        for it, weight in weights:
            mode = self.precision_of(it.param, group)
            seed = offset = 0
            if mode == "sr":
                seed = lowp.mix_seed(
                    self._param_index(it.param), int(it.state["step"]), _SR_WEIGHTS
                )
                shape = self.placement.global_shape(it.param)
                offset = self.placement.row_range(it.param)[0] * (
                    shape[1:].numel() if len(shape) else 1
                )
            lowp.store_weight_(
                weight, it.local, mode, compensation=it.state.get("kahan"), seed=seed, offset=offset
            )
            it.local = weight

    def _param_index(self, param: Tensor) -> int:
        """The parameter's position in the optimizer (the same on every rank): seeds rounding."""
        index = getattr(self, "_index", None)
        if index is None or param not in index:
            flat = [p for g in self.param_groups for p in g["params"]]
            self._index = index = {p: i for i, p in enumerate(flat)}
        return index[param]

    def _store_state(self, item: Item, before: dict[str, Any] | None) -> None:
        """Write back the state keys the rule assigned anew (in-place updates need nothing)."""
        state = self.state[item.param]
        if before is None:
            return
        for key, value in item.state.items():
            if before.get(key) is not value:
                layout = self.state_layout.get(key, "")
                state[key] = self.placement.wrap_state(item.param, value, layout)

    def _after_step(self, loss: Any) -> None:
        """Hook run after a successful step (the loss-aware schedule uses it)."""

    def had_grad(self, param: Tensor) -> bool:
        """Whether ``param`` got a gradient this step (under gradient release, where it is freed
        once applied: whether one landed)."""
        if self.release is not None and self.release.stepped(param):
            return True
        return self.placement.grad(param) is not None

    # -- accounting -------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (tensors only)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, Tensor) and value.numel() > 1:
                    total += self.placement.local(value).numel() * value.element_size()
        return total

    def param_count(self) -> int:
        """Elements of the parameters whose state this rank holds."""
        return sum(
            self.placement.local(p).numel()
            for g in self.param_groups
            for p in g["params"]
            if self.placement.owns(p)
        )

    def state_bytes_per_param(self) -> float:
        """State bytes divided by the parameter elements they serve (0-d scalars not counted)."""
        n = self.param_count()
        return self.state_bytes() / n if n else 0.0


def _sum_sq(grads: list[Tensor], ops: ListOps) -> Tensor:
    """``Σ‖g‖²`` over ``grads`` as a 0-d float64 tensor (0 for no gradients). Contiguous fp32
    CPU gradients are read by :mod:`.norm_native`'s kernel in one call, where it builds."""
    native, rest = [], []
    for g in grads:
        (native if norm_native.usable(g) else rest).append(g)
    total = norm_native.sq_norms(native).sum() if native else torch.zeros((), dtype=torch.float64)
    if rest:
        total = total + torch.stack([n.double() for n in _sq_norms(rest, ops)]).sum()
    return total


def _sq_norms(grads: list[Tensor], ops: ListOps) -> list[Tensor]:
    """``‖g‖²`` of each gradient. On the CPU a BLAS dot (``g·g``) reads a contiguous fp32/fp64
    gradient faster than a norm kernel (this pass is memory-bound; its cost in a step is in
    ``bench/results/step-profile-cpu2-2026-11-23.md``); elsewhere one foreach norm launch serves
    every tensor."""
    if not grads or grads[0].device.type != "cpu":
        return ops.sq_norms(grads)
    return [
        torch.dot(g.view(-1), g.view(-1))
        if g.is_contiguous() and g.dtype in (torch.float32, torch.float64)
        else torch.linalg.vector_norm(g).square()
        for g in grads
    ]


_SR_WEIGHTS = 0x5EED_0001
"""Stream id of the weights' stochastic rounding (mixed into the seed with index and step)."""


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def step_counter() -> Tensor:
    """A fresh per-parameter step counter: a 0-d fp32 CPU tensor, as torch.optim keeps it."""
    return torch.zeros((), dtype=torch.float32)
