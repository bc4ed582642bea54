"""Row-aligned 8-bit blockwise quantization of optimizer state, through bitsandbytes.

bitsandbytes' blockwise dynamic quantization (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", arXiv 2110.02861) cuts a tensor into blocks of ``B`` values, keeps each block's
absolute maximum in fp32 and maps every value divided by it onto a 256-entry *dynamic* code
table (an exponent plus a linear fraction: relative precision over seven decades). It works on
the flattened tensor, so its blocks cross row boundaries. Under row sharding (FSDP2 ``Shard(0)``)
a block crossing the boundary between two ranks' rows would get two different scales, and the
numbers would depend on the world size.

**Row-aligned blocks.** Here every row (dim-0 slice, the rest flattened: ``cols`` values) is cut
into its own blocks, so a row shard holds exactly the blocks that the unsharded tensor has for
those rows, whatever the world size, and a checkpoint can slice codes and scales by rows:

- the *head*, the first ``256·⌊cols/256⌋`` values, in blocks of 256 (bitsandbytes' optimizer
  block size);
- the *tail*, the remaining ``cols mod 256`` values, padded with zeros to a multiple of 64 and
  cut into blocks of 64 (the smallest block bitsandbytes' CUDA kernels take).

A row of 576 values (SmolLM2's hidden size) is 256 + 256 + 64: three scales, 588 bytes per state
(1.021 B/value); a row of 1536 is six blocks of 256 (1.016 B/value). Blocks of 64 for every row
would cost 1.0625 B/value per state. Codes are stored as ``(rows, code_cols)`` uint8 with
``code_cols = head + padded tail``, scales as ``(rows, blocks)`` fp32: both follow the
parameter's rows.

bitsandbytes only takes fp16/bf16/fp32 tensors on one device (never DTensors): callers pass the
local shard, and fp64 values are quantized through fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

try:
    import bitsandbytes.functional as bnbf
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("DolphinFlow8bit needs bitsandbytes: pip install 'shardflow[bnb]'") from exc

HEAD_BLOCK = 256
"""Block size along a row's head (bitsandbytes' optimizer block size)."""
TAIL_BLOCK = 64
"""Block size of a row's tail (the remainder of the row past the last block of 256)."""


@dataclass(frozen=True, slots=True)
class RowBlocks:
    """How every row of ``cols`` values is cut into quantization blocks (see module docstring)."""

    cols: int

    @property
    def head(self) -> int:
        """Values of a row quantized in blocks of :data:`HEAD_BLOCK`."""
        return self.cols - self.cols % HEAD_BLOCK

    @property
    def tail(self) -> int:
        """Values of a row past the head."""
        return self.cols % HEAD_BLOCK

    @property
    def tail_padded(self) -> int:
        """The tail rounded up to a multiple of :data:`TAIL_BLOCK`."""
        return math.ceil(self.tail / TAIL_BLOCK) * TAIL_BLOCK

    @property
    def code_cols(self) -> int:
        """Codes stored per row (padding included)."""
        return self.head + self.tail_padded

    @property
    def blocks(self) -> int:
        """Scales stored per row."""
        return self.head // HEAD_BLOCK + self.tail_padded // TAIL_BLOCK

    @property
    def head_blocks(self) -> int:
        return self.head // HEAD_BLOCK

    def bytes_per_value(self) -> float:
        """State bytes per parameter value for one quantized state."""
        return (self.code_cols + 4 * self.blocks) / self.cols


@cache
def _code(signed: bool, device: torch.device) -> Tensor:
    return bnbf.create_dynamic_map(signed=signed).to(device)


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' 256-entry dynamic code table: signed (momentum) or unsigned (second moment)."""
    return _code(signed, torch.device(device))


def empty_state(rows: int, blocks: RowBlocks, device: torch.device) -> tuple[Tensor, Tensor]:
    """Zero codes ``(rows, code_cols)`` uint8 and zero scales ``(rows, blocks)`` fp32.

    A zero scale dequantizes every code to 0, so this is the quantized zero tensor.
    """
    codes = torch.zeros((rows, blocks.code_cols), dtype=torch.uint8, device=device)
    absmax = torch.zeros((rows, blocks.blocks), dtype=torch.float32, device=device)
    return codes, absmax


def _segments(blocks: RowBlocks) -> list[tuple[slice, slice, int]]:
    """Per block size of a row: (code columns, scale columns, block size); head first."""
    segments = []
    if blocks.head:
        segments.append((slice(0, blocks.head), slice(0, blocks.head_blocks), HEAD_BLOCK))
    if blocks.tail:
        segments.append(
            (slice(blocks.head, blocks.code_cols), slice(blocks.head_blocks, None), TAIL_BLOCK)
        )
    return segments


@cache
def _scale_columns(blocks: RowBlocks, device: torch.device) -> Tensor:
    """For each run of :data:`TAIL_BLOCK` code columns, the column of its block's scale.

    A head block of 256 spans 4 runs, a tail block 1: ``(code_cols / 64,)`` int32.
    """
    runs = HEAD_BLOCK // TAIL_BLOCK
    head = torch.arange(blocks.head_blocks).repeat_interleave(runs)
    tail = blocks.head_blocks + torch.arange(blocks.tail_padded // TAIL_BLOCK)
    return torch.cat([head, tail]).int().to(device)


def _run_scales(absmax: Tensor, blocks: RowBlocks) -> Tensor:
    """``(rows, code_cols / 64)``: the scale of each run of 64 codes (see :func:`_scale_columns`)."""
    return absmax.index_select(1, _scale_columns(blocks, absmax.device))


def pad_rows(x: Tensor, blocks: RowBlocks) -> Tensor:
    """``x`` ``(rows, cols)`` in the padded layout ``(rows, code_cols)`` (zeros past ``cols``)."""
    if x.shape[1] == blocks.code_cols:
        return x
    return torch.nn.functional.pad(x, (0, blocks.code_cols - x.shape[1]))


def quantize_(codes: Tensor, absmax: Tensor, x: Tensor, blocks: RowBlocks, signed: bool) -> None:
    """Quantize ``x`` into ``codes`` and ``absmax`` in place.

    ``x``: any float dtype, ``(rows, cols)`` or already padded ``(rows, code_cols)`` (its padding
    columns must hold zeros, as :func:`dequantize_padded` leaves them).
    """
    rows = x.shape[0]
    if rows == 0:
        return
    x = pad_rows(x, blocks)
    if x.device.type != "cpu":
        for cols, scales, size in _segments(blocks):
            out, scale = _quantize_blocks(x[:, cols].reshape(rows, -1, size), signed)
            codes[:, cols].copy_(out.view(rows, -1))
            absmax[:, scales].copy_(scale)
        return
    # CPU: the absmax of every run of 64 values, then of 4 runs for a head block of 256
    runs = x.float().reshape(rows, -1, TAIL_BLOCK)
    run_max = runs.abs().amax(-1)
    head = 4 * blocks.head_blocks
    absmax[:, : blocks.head_blocks] = run_max[:, :head].view(rows, -1, 4).amax(-1)
    absmax[:, blocks.head_blocks :] = run_max[:, head:]
    scale = _run_scales(absmax, blocks)
    normed = runs / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    codes.copy_(_nearest(normed, signed).view(rows, -1))


def dequantize_padded(
    codes: Tensor, absmax: Tensor, blocks: RowBlocks, signed: bool, dtype: torch.dtype
) -> Tensor:
    """A new ``(rows, code_cols)`` tensor of ``dtype``: the values ``codes`` and ``absmax`` encode,
    padding columns included (they hold zeros: the code of 0)."""
    rows = codes.shape[0]
    code = dynamic_map(signed, codes.device)
    if rows == 0:
        return torch.empty((0, blocks.code_cols), dtype=dtype, device=codes.device)
    if codes.device.type != "cpu":
        out = torch.empty((rows, blocks.code_cols), dtype=torch.float32, device=codes.device)
        for cols, scales, size in _segments(blocks):
            values = _dequantize_blocks(
                codes[:, cols].reshape(rows, -1, size), absmax[:, scales], signed
            )
            out[:, cols] = values.view(rows, -1)
        return out.to(dtype)
    values = torch.index_select(code, 0, codes.reshape(-1).int()).view(rows, -1, TAIL_BLOCK)
    values.mul_(_run_scales(absmax, blocks).unsqueeze(-1))
    return values.view(rows, blocks.code_cols).to(dtype)


def dequantize(
    codes: Tensor, absmax: Tensor, blocks: RowBlocks, signed: bool, dtype: torch.dtype
) -> Tensor:
    """A new ``(rows, cols)`` tensor of ``dtype``: the values ``codes`` and ``absmax`` encode."""
    values = dequantize_padded(codes, absmax, blocks, signed, dtype)
    if blocks.code_cols == blocks.cols:
        return values
    return values[:, : blocks.cols].contiguous()


# -- bitsandbytes' kernels (CUDA): (rows, blocks, size) values <-> codes + (rows, blocks) scales --


def _quantize_blocks(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Codes ``(rows, n, size)`` uint8 and scales ``(rows, n)`` fp32 of ``x`` ``(rows, n, size)``,
    through bitsandbytes' kernel: each block divided by its absolute maximum, every value rounded
    to the nearest entry of the dynamic map."""
    flat = x.float().contiguous().view(-1)
    out, state = bnbf.quantize_blockwise(
        flat, code=dynamic_map(signed, x.device), blocksize=x.shape[-1]
    )
    return out.view(x.shape), state.absmax.view(x.shape[:-1])


def _dequantize_blocks(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """fp32 values ``(rows, n, size)`` of codes ``(rows, n, size)`` with scales ``(rows, n)``."""
    out = bnbf.dequantize_blockwise(
        codes.contiguous().view(-1),
        absmax=absmax.contiguous().view(-1),
        code=dynamic_map(signed, codes.device),
        blocksize=codes.shape[-1],
    )
    return out.view(codes.shape)


# -- the CPU quantizer --------------------------------------------------------------------------


@cache
def _fp16_table(signed: bool) -> tuple[Tensor, Tensor]:
    """For each of the 65536 fp16 bit patterns: its lower candidate code and the threshold.

    An fp32 value ``v`` in [−1, 1] rounds to the fp16 value ``h`` nearest to it, so ``v`` lies
    within half an fp16 step of ``h`` (2⁻¹¹ relative, or 3·10⁻⁸ absolute below 6·10⁻⁵). Over
    that interval the nearest entry of the dynamic map is one of at most two neighbouring codes
    ``i`` and ``i + 1`` (the map's entries are ≥ 0.35% apart, relative and 3·10⁻⁷ absolute;
    checked here), so the nearest code of ``v`` is ``i + (v > (code[i] + code[i+1]) / 2)``: one
    table look-up and one comparison per value instead of a binary search over the map.
    Indexed by the fp16 bits read as uint16.
    """
    code = dynamic_map(signed).double()
    mids = (code[1:] + code[:-1]) / 2
    patterns = torch.arange(2**16, dtype=torch.int32)
    magnitude = patterns & 0x7FFF
    sign = patterns & 0x8000

    def value(bits: Tensor) -> Tensor:
        return bits.to(torch.uint16).view(torch.float16).double()

    here = value(patterns)
    step_up = (value(sign | (magnitude + 1).clamp_max(0x7BFF)) - here).abs()
    step_down = (here - value(sign | (magnitude - 1).clamp_min(0))).abs()
    # patterns past ±1 (never met: |v| ≤ 1), inf and nan: the end codes (nan: code of 0)
    inside = here.abs() <= 1
    half = torch.where(inside, torch.maximum(step_up, step_down) / 2, 0.0)
    here = here.nan_to_num(0.0).clamp(-1.0, 1.0)
    low, high = (here - half).clamp(-1.0, 1.0), (here + half).clamp(-1.0, 1.0)
    lower = torch.bucketize(low, mids)  # index of the nearest code (ties: the lower one)
    upper = torch.bucketize(high, mids)
    if int((upper - lower).max()) > 1:
        raise RuntimeError("an fp16 rounding interval spans two midpoints of the dynamic map")
    threshold = torch.where(upper > lower, mids[lower.clamp_max(len(mids) - 1)], torch.inf)
    return lower.to(torch.uint8), threshold.float()


def _nearest(normed: Tensor, signed: bool) -> Tensor:
    """Index of the dynamic-map entry nearest to each value of ``normed`` (fp32, in [−1, 1])."""
    lower, threshold = _fp16_table(signed)
    index = normed.to(torch.float16).view(torch.uint16).int().view(-1)
    codes = torch.index_select(lower, 0, index).view(normed.shape)
    above = normed > torch.index_select(threshold, 0, index).view(normed.shape)
    return codes.add_(above)
