"""Gradient release: run the optimizer's update inside ``backward`` and free each gradient.

The ordinary step holds every gradient of the model until ``optimizer.step()``. With gradient
release (after optimi's, whose names :func:`prepare_for_gradient_release` and
:func:`remove_gradient_release` follow), a ``register_post_accumulate_grad_hook`` on every
parameter notes each gradient as it lands; once every parameter of a **bucket** has its gradient,
the bucket is updated — by the optimizer's own update (``ShardFlowOptimizer._update_params``,
the same code as the ordinary step, so every optimizer and backend works) — and its gradients
are freed. Only the gradients of buckets still waiting are alive at any moment.

**Buckets.** The unit of release. ``buckets="param"`` (the default on one process) makes every
parameter its own bucket; an integer caps a bucket's gradient bytes, filling buckets in reverse
parameter order (the order gradients land in a backward pass, as DDP buckets them): the default
under the DDP-aware owner plan (25 MiB), where each bucket's gradients travel to their owners in
one all-to-all per dtype — collectives per step grow with the number of buckets, not of
parameters. A list of parameter lists gives the buckets explicitly. A Newton-Schulz matrix is
one parameter, so it is always whole in its bucket.

**The user's loop does not change.** ``loss.backward()`` updates; ``optimizer.step()`` finishes
what the hooks did not: a bucket whose parameters did not all get a gradient (a parameter unused
this step) is updated with those that did, the placement publishes the updated weights (the
owner plan's all-gather), and the per-step hooks run (``_after_step``: Prodigy's ``d``, the
loss-aware schedule, WhiteFlow's projection cache). ``zero_grad()`` is harmless (the gradients
are already gone). A parameter without a gradient keeps its state, as in the ordinary step.

**Clipping.** Global gradient clipping needs the whole norm before the first update, which
release cannot see. ``clipping="none"`` (the default, optimi's choice) does not clip;
``clipping="bucket"`` clips each bucket to the optimizer's ``gradient_clipping`` by the bucket's
own norm (one bucket holding every parameter is exactly global clipping). The runtime uses
``"bucket"``. ``optimizer.last_grad_norm`` is still the global norm, summed over the buckets.

**NaN/inf.** A non-finite gradient skips its bucket (weights and state untouched) and counts in
:attr:`GradientRelease.skipped_buckets` and ``optimizer.nonfinite_steps``; other buckets update.

**Refused** (``ValueError``/``RuntimeError`` before any state changes): fp16 parameters (they need
a GradScaler, which unscales after ``backward`` — too late: release updates during it), a DDP-wrapped model or ``grads_reduced=True`` (DDP averages the
gradients at the end of ``backward``, after the hooks ran; let the owner plan reduce them), FSDP2
parameters (not yet: FSDP2 assigns sharded gradients without running these hooks), and a second
``backward`` reaching a parameter before ``step`` (unless optimizer accumulation is on). A
GradScaler with fp32 parameters fails at ``scaler.step`` (it finds no gradient to unscale); by
then that step's hooks have applied scaled gradients — the runtime refuses fp16 with release in
its config check, before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from shardflow.optim._validate import check_choice

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""The bucket cap under a sharded placement (DDP's default bucket size)."""

CLIPPINGS = ("none", "bucket")


class GradientRelease:
    """The hooks that update ``optimizer``'s parameters during ``backward`` (module docstring).

    Attaching replaces any release the optimizer already had. :meth:`remove` restores the
    ordinary step.
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        buckets: str | int | Sequence[Sequence[Tensor]] | None = None,
        clipping: str = "none",
    ) -> None:
        check_choice("clipping", clipping, CLIPPINGS)
        _check_supported(optimizer)
        if optimizer.release is not None:
            optimizer.release.remove()
        self.optimizer = optimizer
        self.clipping = clipping
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.buckets: list[list[Tensor]] = make_buckets(params, buckets, _is_sharded(optimizer))
        self._bucket_of = {p: k for k, bucket in enumerate(self.buckets) for p in bucket}
        self._landed: list[list[Tensor]] = [[] for _ in self.buckets]
        self._stepped: set[Tensor] = set()
        self._sq_norm = 0.0
        self.skipped_buckets = 0
        """Buckets skipped because a gradient held NaN or inf (since attaching)."""
        self.released_buckets = 0
        """Bucket updates run (since attaching)."""
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in params if p.requires_grad
        ]
        optimizer.release = self

    # -- the hooks --------------------------------------------------------------------------

    def _on_grad(self, param: Tensor) -> None:
        """A gradient landed: note it, and update its bucket once the bucket is complete."""
        k = self._bucket_of[param]
        if param in self._stepped or any(p is param for p in self._landed[k]):
            raise RuntimeError(
                f"{type(self.optimizer).__name__} with gradient release: backward reached a "
                "parameter a second time before optimizer.step() (its first gradient was already "
                "applied, and accumulating gradients is what release removes). Call "
                "optimizer.step() after every backward, or set optimizer.optimizer_accumulation "
                "= True to accumulate micro-batches, or remove_gradient_release(model)."
            )
        self._landed[k].append(param)
        expected = sum(1 for p in self.buckets[k] if p.requires_grad)
        if len(self._landed[k]) >= expected:
            self._release(k)

    @torch.no_grad()
    def _release(self, k: int) -> None:
        """Update bucket ``k``'s landed parameters and free their gradients."""
        opt, params = self.optimizer, self._landed[k]
        self._landed[k] = []
        only = set(params)
        max_norm = opt.gradient_clipping if self.clipping == "bucket" else None
        with opt.compile_context():
            opt.placement.before_bucket(params)
            try:
                updated = opt._update_params(only, max_norm)
            finally:
                opt.placement.after_bucket()
        norm = opt.last_grad_norm
        self._sq_norm += norm * norm if norm is not None else 0.0
        self.released_buckets += 1
        self.skipped_buckets += 0 if updated else 1
        for p in params:
            p.grad = None
        self._stepped.update(params)

    # -- the step ---------------------------------------------------------------------------

    def finish_step(self, loss: Any) -> None:
        """``optimizer.step()`` under release: update incomplete buckets, publish the weights,
        run the per-step hooks, and start a new step."""
        opt = self.optimizer
        for k in self._pending_buckets():
            self._release(k)
        opt.placement.after_update(opt, updated=bool(self._stepped))
        opt.last_grad_norm = math.sqrt(self._sq_norm)
        if self._stepped or not self.released_buckets:
            opt._after_step(loss)
        self._stepped = set()
        self._sq_norm = 0.0

    def _pending_buckets(self) -> list[int]:
        """Buckets with landed gradients not yet updated; on every rank alike (a sharded
        placement agrees on them with one all-reduce of a flag per bucket)."""
        flags = torch.tensor([float(bool(lst)) for lst in self._landed], dtype=torch.float64)
        if _is_sharded(self.optimizer) and len(flags):
            flags = self.optimizer.placement.sum_over_model(flags)
        return [k for k, f in enumerate(flags.tolist()) if f > 0]

    def stepped(self, param: Tensor) -> bool:
        """Whether ``param`` got a gradient (and was updated or skipped) in the current step."""
        return param in self._stepped

    def remove(self) -> None:
        """Remove the hooks; the optimizer takes the ordinary step again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.optimizer.release is self:
            self.optimizer.release = None

    def live_grad_bytes(self) -> int:
        """Bytes of gradients landed and waiting for their bucket (what release keeps alive)."""
        return sum(p.grad.numel() * p.grad.element_size() for b in self._landed for p in b)


def make_buckets(
    params: list[Tensor],
    buckets: str | int | Sequence[Sequence[Tensor]] | None,
    sharded: bool,
) -> list[list[Tensor]]:
    """The buckets of ``params`` (module docstring): ``"param"``, a byte cap, or explicit."""
    if buckets is None:
        buckets = DEFAULT_BUCKET_BYTES if sharded else "param"
    if buckets == "param":
        return [[p] for p in reversed(params)]
    if isinstance(buckets, int) and not isinstance(buckets, bool):
        if buckets < 1:
            raise ValueError(
                f"buckets={buckets!r} is invalid: pass a bucket cap in bytes >= 1, 'param' (one "
                "bucket per parameter) or a list of parameter lists."
            )
        return _capped(params, buckets)
    if isinstance(buckets, str) or not isinstance(buckets, Iterable):
        raise ValueError(
            f"buckets={buckets!r} is invalid: pass 'param', a bucket cap in bytes, or a list of "
            "parameter lists covering the optimizer's parameters."
        )
    return _explicit(params, buckets)


def module_buckets(model: nn.Module) -> list[list[Tensor]]:
    """Buckets that follow the model's blocks: each element of every ``nn.ModuleList`` (a
    decoder layer) is one bucket; every other parameter (embeddings, final norm, head) is its
    own. Gradients alive at once: about one block's (the runtime's choice)."""
    seen: set[int] = set()
    out: list[list[Tensor]] = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for block in module:
            params = [p for p in block.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                out.append(params)
    out += [[p] for p in model.parameters() if id(p) not in seen]
    return out


def _capped(params: list[Tensor], cap: int) -> list[list[Tensor]]:
    out: list[list[Tensor]] = [[]]
    size = 0
    for p in reversed(params):
        n = p.numel() * p.element_size()
        if out[-1] and size + n > cap:
            out.append([])
            size = 0
        out[-1].append(p)
        size += n
    return [b for b in out if b]


def _explicit(params: list[Tensor], buckets: Iterable[Iterable[Tensor]]) -> list[list[Tensor]]:
    out = [list(b) for b in buckets]
    ids = [id(p) for b in out for p in b]
    if sorted(ids) != sorted(id(p) for p in params):
        raise ValueError(
            f"buckets is invalid: its {len(ids)} entries must hold each of the optimizer's "
            f"{len(params)} parameters exactly once (the same tensors, not copies)."
        )
    return out


def _is_sharded(optimizer: Any) -> bool:
    return optimizer.placement.world_size > 1


def _check_supported(optimizer: Any) -> None:
    """Refuse what release cannot honour, before any hook exists (module docstring)."""
    name = type(optimizer).__name__
    if optimizer.grads_reduced:
        raise ValueError(
            f"{name}: gradient release with grads_reduced=True is not supported: a DDP wrapper "
            "averages gradients at the end of backward, after the release hooks have run. Drop "
            "the DDP wrapper and build the optimizer with process_group and grads_reduced=False "
            "(the owner plan reduces each bucket's gradients itself)."
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        if p.dtype == torch.float16:
            raise ValueError(
                f"{name}: gradient release with fp16 parameters is not supported: fp16 needs a "
                "GradScaler, which unscales and checks gradients after backward, but release "
                "updates during backward. Use bf16 (no scaler) or fp32 parameters."
            )
        if type(p).__name__ == "DTensor":
            raise ValueError(
                f"{name}: gradient release with FSDP2 (DTensor) parameters is not supported yet: "
                "fully_shard assigns the reduce-scattered gradients without running "
                "post-accumulate-grad hooks. Use the ordinary step under FSDP2, or the DDP-aware "
                "owner plan (plain parameters and process_group) with release."
            )


def prepare_for_gradient_release(
    model: nn.Module,
    optimizer: Any,
    *,
    buckets: str | int | Sequence[Sequence[Tensor]] | None = None,
    clipping: str = "none",
) -> GradientRelease:
    """Run ``optimizer``'s updates inside ``model``'s backward pass and free each gradient.

    ``buckets``: ``"param"`` (one process's default), a byte cap (a sharded placement's default,
    25 MiB) or explicit parameter lists; ``clipping``: ``"none"`` or ``"bucket"`` (module
    docstring). Returns the :class:`GradientRelease`; :func:`remove_gradient_release` undoes it.
    """
    if type(model).__name__ == "DistributedDataParallel":
        raise ValueError(
            "model is a DistributedDataParallel wrapper: gradient release cannot see its "
            "reduction (DDP averages gradients at the end of backward, after the hooks ran, and "
            "no_sync hides it). Pass the unwrapped module and give the optimizer the process "
            "group instead (the owner plan reduces each bucket)."
        )
    if not hasattr(optimizer, "release"):
        raise ValueError(
            f"optimizer is a {type(optimizer).__name__}: gradient release needs a ShardFlow "
            "optimizer (shardflow.DolphinFlow, WhiteFlow, FactoredAdam, ...)."
        )
    release = GradientRelease(optimizer, buckets=buckets, clipping=clipping)
    model._shardflow_release = release  # type: ignore[attr-defined]
    return release


def remove_gradient_release(model: nn.Module) -> None:
    """Undo :func:`prepare_for_gradient_release`: the optimizer takes the ordinary step again."""
    release = getattr(model, "_shardflow_release", None)
    if release is None:
        raise ValueError(
            "model has no gradient release to remove: call prepare_for_gradient_release(model, "
            "optimizer) first."
        )
    release.remove()
    del model._shardflow_release
