"""DolphinFlow8bit: DolphinFlow with its momentum and second moment stored in 8 bits.

The update rule is :class:`~shardflow.optim.dolphinflow.DolphinFlow`'s, unchanged (Nesterov,
⊥Grad, Newton-Schulz, dynamic momentum, trust region, every option). Only the storage of the two
moments differs: between steps, ``exp_avg`` (momentum, bitsandbytes' *signed* dynamic map) and
``exp_avg_sq`` (second moment, *unsigned* map) are uint8 codes with one fp32 scale per block, in
the row-aligned blocks of :mod:`shardflow.optim.quant8`. Each step dequantizes them into fp32
working tensors, runs DolphinFlow's update on those, and requantizes the result.

**Which parameters are quantized** is decided on the parameter's *global* shape, never on the
local shard (torchao decides per shard, so its numerics change with the world size): a
parameter of 2 or more dims with at least ``min_8bit_size`` elements (default 4096, as in
bitsandbytes). Smaller ones, and 1-D ones (biases, norm gains, whose "rows" are single values),
keep fp32 state. Since blocks never cross a row, a row shard's codes and scales are exactly the
rows of the unsharded ones: the result does not depend on the world size, and checkpoints slice
codes and scales by rows (``state_layout``: ``"rows"``).

**Memory.** State: ≈2.03–2.04 B/param on LLM shapes (1 code byte + 4/256 or 4/192 scale bytes
per moment) against 8 for DolphinFlow. During the step, fp32 working copies exist for at most
``chunk_elements`` quantized elements at a time (8 B each): a group's parameters are updated in
chunks, so the peak does not grow with the model. Each chunk is one call of DolphinFlow's update,
with its own batched reductions; chunks are cut from global sizes in parameter order, so every
rank cuts the same chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

from shardflow.optim import quant8
from shardflow.optim._listops import ListOps
from shardflow.optim._validate import check_int_at_least
from shardflow.optim.base import Item, Layout
from shardflow.optim.dolphinflow import DolphinFlow

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
        chunk_elements: at most this many quantized elements are dequantized at once during a
            step (fp32 working memory ≈ 8 bytes each); ``None``: a whole param group at once.
    """

    scratch_grads: ClassVar[bool] = True
    """Its working items are built from scratch gradients (the base's default)."""

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
        """DolphinFlow's update, chunk by chunk, on dequantized moments; requantize after."""
        for chunk in self._chunks(items):
            working = [self._dequantized(it) for it in chunk]
            super()._update_group(group, working, ops)
            for it, work in zip(chunk, working):
                self._store(it, work)

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
        for key, signed in MOMENTS.items():
            if key in state:
                values = quant8.dequantize(
                    state[key], state[absmax_key(key)], blocks, signed, item.grad.dtype
                )
                state[key] = values.view(item.local.shape)
        return Item(item.param, item.local, item.grad, state)

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
