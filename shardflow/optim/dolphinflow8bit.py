"""DolphinFlow8bit: DolphinFlow with its momentum and second moment stored in 8 bits.

The update rule is :class:`~shardflow.optim.dolphinflow.DolphinFlow`'s, unchanged (Nesterov,
⊥Grad, Newton-Schulz, dynamic momentum, trust region, every option). Only the storage of the two
moments differs: between steps, ``exp_avg`` (momentum, bitsandbytes' *signed* dynamic map) and
``exp_avg_sq`` (second moment, *unsigned* map) are uint8 codes with one fp32 scale per block, in
the row-aligned blocks of :mod:`shardflow.ops.quant8`. Each step dequantizes them, runs
DolphinFlow's update on the fp32 values, and requantizes the result:

- **the fused route** (element-wise and vector routes with ``adaptive_lr`` and no trust region:
  DolphinFlow's ``_fused_update``). On the CPU, where the native kernel is available
  (:mod:`~shardflow.ops.native.quant8`: x86-64 with AVX2 or AVX-512 and a C compiler) and
  the weights, gradients and ⊥Grad coefficients are contiguous fp32, each parameter is one native loop over
  its blocks, whatever ``compiled`` says: dequantize both moments, DolphinFlow's element-wise
  rule (the eager rule's operations in its order), requantize, every value read and written
  once; rows are split over ``torch.get_num_threads()`` threads. Otherwise it goes slab by slab
  — :data:`SLAB_ELEMENTS` values of a parameter's rows at a time: dequantize both moments, apply
  the element-wise rule (DolphinFlow's compiled :func:`~shardflow.optim.dolphinflow.fused_update`
  when ``compiled``, else the same maths as in-place eager ops), requantize. A slab's working
  tensors stay in the CPU's caches and no fp32 copy of a whole moment is made. Every value's
  update is row-local, so neither the slab size nor the threads change a result (tested
  bitwise).
- **the step-by-step route** (Newton-Schulz, trust region, no ``adaptive_lr``: the whole
  direction is needed before the weights move) and dynamic momentum (it reads every moment
  first) dequantize a chunk's moments whole, run DolphinFlow's update, requantize.

**Which parameters are quantized** is decided on the parameter's *global* shape, never on the
local shard (torchao decides per shard, so its numerics change with the world size): a
parameter of 2 or more dims with at least ``min_8bit_size`` elements (default 4096, as in
bitsandbytes). Smaller ones, and 1-D ones (biases, norm gains, whose "rows" are single values),
keep fp32 state. Since blocks never cross a row, a row shard's codes and scales are exactly the
rows of the unsharded ones: the result does not depend on the world size, and checkpoints slice
codes and scales by rows (``state_layout``: ``"rows"``).

**Memory.** State: ≈2.03–2.04 B/param on LLM shapes (1 code byte + 4/256 or 4/192 scale bytes
per moment) against 8 for DolphinFlow. During the step, fp32 working copies exist for one slab
(fused route) or at most ``chunk_elements`` quantized elements at a time (8 B each, step-by-step
route): a group's parameters are updated in chunks, so the peak does not grow with the model.
Each chunk is one call of DolphinFlow's update, with its own batched reductions; chunks are cut
from global sizes in parameter order, so every rank cuts the same chunks.

**Speed** (``python -m bench.dolphinflow8bit step``, 2 SmolLM2 layers against DolphinFlow
32-bit with the same ``compiled``, median per-round ratios). On a 2-core Ice Lake Xeon with the
kernel's AVX-512 VBMI build: 0.45–0.61× eager, 1.26–1.39× compiled on one thread and 1.19–1.44× on
two (bench/results/dolphinflow8bit-icelake2-2026-12-06.md; the AVX2 build there: 2.2–3.1×
compiled); on a 2-core AMD Zen3 (AVX2 only): 0.57–0.73× eager, 1.8–2.5× compiled
(bench/results/dolphinflow8bit-cpu2-2026-11-23.md, runs 7–8). The torch path: 2.1–3.1× eager,
7–13× compiled. The issue's ≤ 1.5×: met eager on both CPUs measured; compiled on the AVX-512
one, not on the AVX2-only one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

from shardflow.ops import quant8
from shardflow.ops.compiling import each
from shardflow.ops.listops import ListOps
from shardflow.optim._validate import check_int_at_least
from shardflow.optim.base import Item, Layout, _compute_dtype
from shardflow.optim.dolphinflow import DolphinFlow, fused_update_each

MOMENTS: dict[str, bool] = {"exp_avg": True, "exp_avg_sq": False}
"""The quantized state keys and whether their code table is signed."""


def absmax_key(key: str) -> str:
    """State key of the per-block scales of the quantized state ``key``."""
    return f"{key}_absmax"


class DolphinFlow8bit(DolphinFlow):
    """DolphinFlow with 8-bit momentum and second moment (see the module docstring).

    Takes every argument of :class:`~shardflow.optim.dolphinflow.DolphinFlow`, with the same
    defaults, plus:

    Args:
        min_8bit_size: parameters (of 2+ dims) with fewer elements than this keep fp32 state.
        chunk_elements: at most this many quantized elements are dequantized at once on the
            step-by-step route (fp32 working memory ≈ 8 bytes each; the fused route works in
            slabs of :data:`SLAB_ELEMENTS`); ``None``: a whole param group at once.
    """

    scratch_grads: ClassVar[bool] = False
    """As DolphinFlow: the compiled pass reads the raw gradient (times ``Item.grad_scale``)."""

    state_layout: ClassVar[dict[str, Layout]] = {
        **DolphinFlow.state_layout,
        **{absmax_key(k): "rows" for k in MOMENTS},
    }

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        min_8bit_size: int = 4096,
        chunk_elements: int | None = 2**26,
        **kwargs: Any,
    ) -> None:
        check_int_at_least("min_8bit_size", min_8bit_size, 0)
        if chunk_elements is not None:
            check_int_at_least("chunk_elements", chunk_elements, 1)
        self.min_8bit_size = min_8bit_size
        self.chunk_elements = chunk_elements
        super().__init__(params, *args, **kwargs)

    # -- state ------------------------------------------------------------------------------

    def row_blocks(self, param: Tensor) -> quant8.RowBlocks | None:
        """The row blocks of ``param``'s quantized state, or None when its state stays fp32."""
        shape = self.placement.global_shape(param)
        if len(shape) < 2 or shape.numel() < self.min_8bit_size:
            return None
        return quant8.RowBlocks(shape.numel() // shape[0])

    def _init_state(self, param: Tensor, local: Tensor, group: dict[str, Any], state: dict) -> None:
        super()._init_state(param, local, group, state)
        blocks = self.row_blocks(param)
        if blocks is None:
            return
        for key in MOMENTS:
            if key in state:
                state[key], state[absmax_key(key)] = quant8.empty_state(
                    local.shape[0], blocks, local.device
                )

    # -- the step ---------------------------------------------------------------------------

    def _update_group(self, group: dict[str, Any], items: list[Item], ops: ListOps) -> None:
        """DolphinFlow's update, chunk by chunk (see the module docstring for who dequantizes)."""
        for chunk in self._chunks(items):
            if not group["dynamic_momentum"]:
                super()._update_group(group, chunk, ops)
                continue
            # dynamic momentum reads every moment before the update: dequantize them all first
            working = [self._dequantized(it) for it in chunk]
            super()._update_group(group, working, ops)
            for it, work in zip(chunk, working):
                self._store(it, work)

    def _fused_update(
        self,
        group: dict[str, Any],
        items: list[Item],
        mus: list[float],
        lr: float,
        folds: dict[int, tuple[Tensor, Tensor]],
        ops: ListOps,
    ) -> None:
        """The fused route: quantized moments in slabs of rows (:meth:`_slab_update`), others
        (fp32 moments, or non-contiguous tensors: dequantized whole) through DolphinFlow's."""
        direct = [self._blocks(it) is not None and _contiguous(it) for it in items]
        if any(direct):
            self._slab_update(
                group,
                [it for it, d in zip(items, direct) if d],
                [mu for mu, d in zip(mus, direct) if d],
                lr,
                folds,
            )
        if not all(direct):
            rest = [it for it, d in zip(items, direct) if not d]
            working = [self._dequantized(it) for it in rest]
            folds = {id(w): folds[id(it)] for it, w in zip(rest, working) if id(it) in folds}
            mus = [mu for mu, d in zip(mus, direct) if not d]
            super()._fused_update(group, working, mus, lr, folds, ops)
            for it, work in zip(rest, working):
                self._store(it, work)

    def _stepwise_update(
        self,
        group: dict[str, Any],
        items: list[Item],
        mus: list[float],
        lr: float,
        routes: dict[Tensor, str],
        ops: ListOps,
    ) -> None:
        """Newton-Schulz, trust region, no ``adaptive_lr``: the whole direction is needed before
        the weights move, so the chunk's moments are dequantized whole, then requantized."""
        working = [self._dequantized(it) for it in items]
        super()._stepwise_update(group, working, mus, lr, routes, ops)
        for it, work in zip(items, working):
            self._store(it, work)

    def _slab_update(
        self,
        group: dict[str, Any],
        items: list[Item],
        mus: list[float],
        lr: float,
        folds: dict[int, tuple[Tensor, Tensor]],
    ) -> None:
        """Steps 3-7 of DolphinFlow's rule on quantized moments, :data:`SLAB_ELEMENTS` at a time.

        Per slab of rows: dequantize ``m`` and ``v`` (padded layout), apply the element-wise rule
        of :func:`~shardflow.optim.dolphinflow.fused_update` (compiled when DolphinFlow's pass is:
        the same kernel; else in-place eager ops in DolphinFlow's eager order), requantize. The
        bias corrections are folded into scalars as in DolphinFlow's fused pass; the gradient is
        ``a·g − b·w`` with ⊥Grad's per-row coefficients ``a, b`` (the clip factor still to apply
        to a raw gradient already in them), else ``c·g``.
        """
        weights = self._nesterov_weights(group, items, mus)
        beta2, eps, decay = group["beta2"], group["eps"], 1.0 - lr * self.decay(group)
        compiled = self._use_compiled(items[0].grad)
        rowwise = group["vector_mode"] == "rowwise"
        for it, mu, weight in zip(items, mus, weights):
            corr = 1.0 - beta2 ** float(it.state["step"])
            c = it.grad_scale
            scalars = (decay, 1.0 - mu, beta2, lr * corr**0.5 / weight, eps * corr**0.5, c)
            fold = folds.get(id(it))  # per row, or (flat ⊥Grad) one pair for the whole tensor
            decay_on = bool(self.decay(group) and lr)
            if self._native_step(it, fold, scalars, group["nesterov"], decay_on):
                continue
            if fold is not None:
                rows = it.local.shape[0] if not rowwise else -1
                fold = tuple(f.unsqueeze(1).expand(rows, 1) for f in fold)
            if compiled:
                dtype = _compute_dtype(it.grad)
                s = torch.tensor(scalars, dtype=dtype, device=it.grad.device)
                rule = functools.partial(_compiled_rule, s=s, nesterov=group["nesterov"])
            else:
                rule = functools.partial(
                    _eager_rule, s=scalars, nesterov=group["nesterov"], decay_on=decay_on
                )
            self._slabs(it, fold, rule)

    def _native_step(
        self,
        item: Item,
        fold: tuple[Tensor, Tensor] | None,
        scalars: tuple[float, ...],
        nesterov: bool,
        decay_on: bool,
    ) -> bool:
        """The whole fused step of ``item`` in the native CPU kernel, if it takes these tensors
        (fp32 weights, gradients and folds, contiguous, on the CPU); returns whether it ran.
        ``fold``: ``(a, b)`` with one value per row, or one for all rows (flat ⊥Grad)."""
        blocks = self._blocks(item)
        w, g = item.local.detach(), item.grad
        states = tuple((item.state[k], item.state[absmax_key(k)]) for k in MOMENTS)
        if not quant8.native.usable(w, g, *(fold or ()), *(t for s in states for t in s)):
            return False
        rows = w.shape[0]
        if rows:
            quant8.native.step_rows(
                w.view(rows, blocks.cols),
                g.view(rows, blocks.cols),
                states,
                fold,
                scalars,
                blocks,
                nesterov=nesterov,
                decay_on=decay_on,
            )
        return True

    def _slabs(
        self, item: Item, fold: tuple[Tensor, Tensor] | None, rule: Callable[..., None]
    ) -> None:
        """Run ``rule(w, g, m, v, a, b)`` over ``item`` slab by slab, ``m, v`` dequantized."""
        blocks = self._blocks(item)
        rows = item.local.shape[0]
        w = item.local.detach().view(rows, blocks.cols)
        g = item.grad.view(rows, blocks.cols)
        step = max(1, SLAB_ELEMENTS // blocks.code_cols)
        for start in range(0, rows, step):
            r = slice(start, start + step)
            states = [
                (item.state[key][r], item.state[absmax_key(key)][r], signed)
                for key, signed in MOMENTS.items()
            ]
            moments = quant8.dequantize_many(states, blocks, g.dtype)
            m, v = moments[..., : blocks.cols]
            a, b = (None, None) if fold is None else (fold[0][r], fold[1][r])
            rule(w[r], g[r], m, v, a, b)
            quant8.quantize_many_(states, moments, blocks)

    def _blocks(self, item: Item) -> quant8.RowBlocks | None:
        """The row blocks of ``item``'s moments, or None when they are stored in fp32."""
        if item.state["exp_avg"].dtype != torch.uint8:
            return None
        return self.row_blocks(item.param)

    def _chunks(self, items: list[Item]) -> Iterator[list[Item]]:
        """Consecutive runs of items holding at most ``chunk_elements`` quantized elements."""
        chunk: list[Item] = []
        size = 0
        for it in items:
            blocks = self._blocks(it)
            n = self.placement.global_shape(it.param).numel() if blocks else 0
            if chunk and self.chunk_elements is not None and size + n > self.chunk_elements:
                yield chunk
                chunk, size = [], 0
            chunk.append(it)
            size += n
        if chunk:
            yield chunk

    def _dequantized(self, item: Item) -> Item:
        """``item`` with fp32 (fp64 for fp64 params) working copies of its quantized moments."""
        blocks = self._blocks(item)
        if blocks is None:
            return item
        state = dict(item.state)
        dtype = _compute_dtype(item.grad)
        for key, signed in MOMENTS.items():
            if key in state:
                values = quant8.dequantize(
                    state[key], state[absmax_key(key)], blocks, signed, dtype
                )
                state[key] = values.view(item.local.shape)
        return Item(item.param, item.local, item.grad, state, item.grad_scale)

    def _store(self, item: Item, work: Item) -> None:
        """Requantize the working moments into ``item.state``; keep its other entries' values."""
        if work is item:
            return
        blocks = self._blocks(item)
        for key, value in work.state.items():
            if key in MOMENTS and blocks is not None:
                rows = value.view(value.shape[0], blocks.cols)
                quant8.quantize_(
                    item.state[key], item.state[absmax_key(key)], rows, blocks, MOMENTS[key]
                )
            else:
                item.state[key] = value


SLAB_ELEMENTS = 2**18
"""Quantized elements per slab of the fused route: small enough that a slab's working tensors
stay in the CPU's caches between the ~30 passes over them (measured best of 2¹⁷–2¹⁹ on the
shared 2-core CPU)."""


def _contiguous(item: Item) -> bool:
    return item.local.is_contiguous() and item.grad.is_contiguous()


def _compiled_rule(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    *,
    s: Tensor,
    nesterov: bool,
) -> None:
    """DolphinFlow's compiled element-wise pass on one slab, called as DolphinFlow calls it for a
    single parameter (flattened without ⊥Grad): the same compiled graphs serve both."""
    tensors = [w, g, m, v]
    if a is None and all(t.is_contiguous() for t in tensors):
        tensors = [t.view(-1) for t in tensors]
    folded = [] if a is None or b is None else [[a], [b]]
    each(fused_update_each, *([t] for t in tensors), [s], *folded, nesterov=nesterov)


def _eager_rule(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    *,
    s: tuple[float, ...],
    nesterov: bool,
    decay_on: bool,
) -> None:
    """:func:`~shardflow.optim.dolphinflow.fused_update`'s maths as in-place eager ops on one slab,
    in the order of DolphinFlow's eager pass; ``g`` is only read."""
    decay, one_minus_mu, beta2, scale, eps, c = s
    if a is not None and b is not None:  # the fold carries the clip factor
        g = (g * a).addcmul_(b, w, value=-1)
    else:
        g = g * c
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    m.lerp_(g, one_minus_mu)
    n = g.lerp_(m, 1.0 - one_minus_mu) if nesterov else m
    denom = v.sqrt().add_(eps)
    if decay_on:
        w.mul_(decay)
    if w.dtype == n.dtype:
        w.addcdiv_(n, denom, value=-scale)
    else:
        w.add_(denom.reciprocal_().mul_(n).to(w.dtype), alpha=-scale)
