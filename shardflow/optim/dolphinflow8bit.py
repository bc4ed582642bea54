"""DolphinFlow8bit: DolphinFlow with its momentum and second moment stored in 8 bits.

The update rule is :class:`~shardflow.optim.dolphinflow.DolphinFlow`'s, unchanged (Nesterov,
⊥Grad, Newton-Schulz, dynamic momentum, trust region, every option): this class is a storage
adapter around it, not a second rule. Only the storage of the two moments differs: between
steps, ``exp_avg`` (momentum, bitsandbytes' *signed* dynamic map) and ``exp_avg_sq`` (second
moment, *unsigned* map) are uint8 codes with one fp32 scale per block, in the row-aligned blocks
of :mod:`shardflow.ops.quant8`. Each step dequantizes them, runs DolphinFlow's rule
(:func:`~shardflow.optim.dolphinflow.dolphinflow_rule`) on the fp32 values, and requantizes the
result:

- **the fused route** (element-wise and vector routes with ``adaptive_lr`` and no trust region;
  DolphinFlow's ``_rule_pass``, overridden here). On the CPU, where the native kernel is
  available (:mod:`~shardflow.ops.native.quant8`: x86-64 with AVX2 or AVX-512 and a C compiler)
  and the weights, gradients and ⊥Grad coefficients are contiguous fp32, each parameter is one
  native loop over its blocks, whether or not ``compiled`` is set (inductor's CPU code gathers
  table entries one lane at a time, slower than this kernel): dequantize both moments,
  DolphinFlow's rule (``csrc/dolphinflow_rule.h``, the C form of the same rule, shared with
  DolphinFlow's fp32 kernel), requantize, every value read and written once; rows are split
  over ``torch.get_num_threads()`` threads. Otherwise it goes slab by slab —
  :data:`SLAB_ELEMENTS` values of a parameter's rows at a time: dequantize both moments, the
  rule (compiled when the step compiles, else called eagerly), requantize. A slab's working
  tensors stay in the CPU's caches and no fp32 copy of a whole moment is made. Every value's
  update is row-local, so neither the slab size nor the threads change a result (tested
  bitwise). ``tests/test_backends.py`` checks the native loop against the slab path.
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

**Speed**: ``python -m bench.step`` (rows ``df8-vector``, ``df8-vector-compiled``: SmolLM2
shapes against fused AdamW, bench/results/step-cpu1-2026-12-07.md) and ``python -m
bench.dolphinflow8bit step`` (against DolphinFlow 32-bit; bench/results/dolphinflow8bit-*.md).
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
from shardflow.optim.dolphinflow import DolphinFlow, dolphinflow_rule, dolphinflow_rule_each

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
        """The row blocks of ``param``'s quantized state, or None when its state stays fp32
        (1-D, fewer than ``min_8bit_size`` elements, or none at all)."""
        shape = self.placement.global_shape(param)
        if len(shape) < 2 or shape.numel() < max(self.min_8bit_size, 1):
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like DolphinFlow; a 32-bit DolphinFlow state_dict is quantized on the way in
        (the moments of every parameter this class keeps in 8 bits become codes and scales, as
        a step would store them), so it is never silently kept in fp32."""
        super().load_state_dict(self._quantized(state_dict))

    def _quantized(self, state_dict: Any) -> Any:
        """``state_dict`` with 32-bit moments quantized where this optimizer keeps 8-bit ones;
        anything else (including a malformed state_dict) is passed on unchanged, to be checked."""
        try:
            groups, saved = state_dict["param_groups"], state_dict["state"]
            ids = [pid for g in groups for pid in g["params"]]
        except (KeyError, TypeError):
            return state_dict
        params = [p for g in self.param_groups for p in g["params"]]
        state = dict(saved)
        for pid, p in zip(ids, params):
            entry = saved.get(pid)
            if isinstance(entry, dict) and self._holds_32bit_moments(p, entry):
                state[pid] = self._quantize_entry(p, entry)
        return {**state_dict, "state": state}

    def _holds_32bit_moments(self, param: Tensor, entry: dict[str, Any]) -> bool:
        """Whether ``entry`` has float moments (no scales) where this optimizer keeps codes."""
        mine = self.state.get(param, {})
        return any(
            key in entry
            and absmax_key(key) in mine
            and absmax_key(key) not in entry
            and isinstance(entry[key], Tensor)
            and entry[key].is_floating_point()
            for key in MOMENTS
        )

    def _quantize_entry(self, param: Tensor, entry: dict[str, Any]) -> dict[str, Any]:
        """One parameter's saved state with its float moments quantized (local rows, wrapped
        back the way the placement keeps row-layout state)."""
        blocks = self.row_blocks(param)
        out = dict(entry)
        for key, signed in MOMENTS.items():
            if key not in entry or absmax_key(key) in entry:
                continue
            values = self.placement.local(entry[key])
            rows = values.shape[0] if values.ndim else 1
            if values.numel() != rows * blocks.cols:
                continue  # another shape: load_state_dict's check names it
            codes, absmax = quant8.empty_state(rows, blocks, values.device)
            quant8.quantize_(codes, absmax, values.reshape(rows, blocks.cols), blocks, signed)
            out[key] = self.placement.wrap_state(param, codes, "rows")
            out[absmax_key(key)] = self.placement.wrap_state(param, absmax, "rows")
        return out

    # -- the step ---------------------------------------------------------------------------

    def _stores_weight(self, group: dict[str, Any], item: Item, ops: ListOps) -> bool:
        return False  # the 8-bit passes work on fp32 working copies of bf16 weights

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
        """DolphinFlow's rule on the fused route with 8-bit moments: dequantize, the same rule,
        requantize. Quantized moments of contiguous tensors: the native kernel where it takes
        them (:meth:`_native_step`), else slab by slab (:meth:`_slab_update`); others (fp32
        moments; non-contiguous tensors, their moments dequantized whole) through DolphinFlow's
        pass. The step-by-step route and dynamic momentum reach here with dequantized moments."""
        direct = [
            not direction and self._blocks(it) is not None and _contiguous(it) for it in items
        ]
        for it, row, d in zip(items, rows, direct):
            if d and not (ops.native and self._native_step(group, it, folds.get(id(it)), row)):
                self._slab_update(group, it, row, folds.get(id(it)), ops)
        if all(direct):
            return
        rest = [it for it, d in zip(items, direct) if not d]
        working = [self._dequantized(it) for it in rest]
        folds = {id(w): folds[id(it)] for it, w in zip(rest, working) if id(it) in folds}
        rows = [row for row, d in zip(rows, direct) if not d]
        super()._rule_pass(group, working, rows, folds, ops, direction=direction)
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
        item: Item,
        row: tuple[float, ...],
        fold: tuple[Tensor, Tensor] | None,
        ops: ListOps,
    ) -> None:
        """DolphinFlow's rule (:func:`~shardflow.optim.dolphinflow.dolphinflow_rule`, compiled
        when the step compiles) on one item's quantized moments, :data:`SLAB_ELEMENTS` at a
        time: per slab of rows dequantize ``m`` and ``v`` (padded layout), the rule, requantize.
        ``fold``: ⊥Grad's coefficients (the clip factor in them), per row or one pair."""
        if fold is not None:
            rows = item.local.shape[0] if group["vector_mode"] != "rowwise" else -1
            fold = tuple(f.unsqueeze(1).expand(rows, 1) for f in fold)
        s = torch.tensor(row, dtype=_compute_dtype(item.grad), device=item.grad.device)
        kw = dict(nesterov=group["nesterov"], adaptive=True)
        if ops.compiled:
            rule = functools.partial(_compiled_rule, s=s, **kw)
        else:
            rule = functools.partial(_eager_rule, s=s, **kw)
        self._slabs(item, fold, rule)

    def _native_step(
        self,
        group: dict[str, Any],
        item: Item,
        fold: tuple[Tensor, Tensor] | None,
        row: tuple[float, ...],
    ) -> bool:
        """The whole fused step of ``item`` in the native CPU kernel (dequantize, DolphinFlow's
        rule, requantize in one pass), if it takes these tensors (fp32 weights, gradients and
        folds, contiguous, on the CPU); returns whether it ran. ``fold``: ``(a, b)`` with one
        value per row, or one for all rows (flat ⊥Grad)."""
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
                row,
                blocks,
                nesterov=group["nesterov"],
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
    adaptive: bool,
) -> None:
    """DolphinFlow's compiled rule on one slab, called as DolphinFlow calls it for a single
    parameter (flattened without ⊥Grad): the same compiled graphs serve both."""
    tensors = [w, g, m, v]
    if a is None and all(t.is_contiguous() for t in tensors):
        tensors = [t.view(-1) for t in tensors]
    folded = [] if a is None or b is None else [[a], [b]]
    each(
        dolphinflow_rule_each,
        *([t] for t in tensors),
        [s],
        *folded,
        nesterov=nesterov,
        adaptive=adaptive,
    )


def _eager_rule(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    *,
    s: Tensor,
    nesterov: bool,
    adaptive: bool,
) -> None:
    """DolphinFlow's rule called eagerly on one slab (``g`` only read)."""
    dolphinflow_rule(w, g, m, v, s, a, b, nesterov=nesterov, adaptive=adaptive)
