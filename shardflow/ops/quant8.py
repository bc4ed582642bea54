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

**On the CPU** a native kernel (:mod:`~shardflow.ops.native.quant8`: AVX2 or AVX-512, built on
first use) quantizes and dequantizes when it is available, with bitwise the same codes. Otherwise the same
rounding (nearest entry of the map; bitsandbytes' own CPU kernel sometimes picks a neighbour)
is done in torch, over the padded layout viewed as runs of 64 values: the absmax of every run,
of 4 runs for a head block; every value divided by its block's scale and rounded through an
fp16-bits table (:func:`_fp16_table`: two look-ups and one comparison instead of a search).
:func:`quantize_many_` and :func:`dequantize_many` serve several states of one shape (a step's
two moments) with one pass per operation, through concatenated tables. Measured on the shared
2-core CPU (one thread): ≈4.5 ns per value to quantize, ≈1.5 ns to dequantize, against ≈20 ns
for bitsandbytes' CPU kernel and ≈1.2 / 0.6 ns for the native kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

try:
    import bitsandbytes.functional as bnbf
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("DolphinFlow8bit needs bitsandbytes: pip install 'shardflow[bnb]'") from exc

from shardflow.ops.native import quant8 as native  # noqa: E402

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


State = tuple[Tensor, Tensor, bool]
"""One quantized tensor: codes ``(rows, code_cols)`` uint8, scales ``(rows, blocks)`` fp32, and
whether its code table is signed."""


def pad_rows(x: Tensor, blocks: RowBlocks) -> Tensor:
    """``x`` ``(..., rows, cols)`` in the padded layout ``(..., rows, code_cols)`` (zeros past
    ``cols``)."""
    if x.shape[-1] == blocks.code_cols:
        return x
    return torch.nn.functional.pad(x, (0, blocks.code_cols - x.shape[-1]))


def quantize_(codes: Tensor, absmax: Tensor, x: Tensor, blocks: RowBlocks, signed: bool) -> None:
    """Quantize ``x`` (any float dtype, ``(rows, cols)`` or padded ``(rows, code_cols)``) into
    ``codes`` and ``absmax`` in place."""
    quantize_many_([(codes, absmax, signed)], pad_rows(x, blocks).unsqueeze(0), blocks)


def dequantize(
    codes: Tensor, absmax: Tensor, blocks: RowBlocks, signed: bool, dtype: torch.dtype
) -> Tensor:
    """A new ``(rows, cols)`` tensor of ``dtype``: the values ``codes`` and ``absmax`` encode."""
    values = dequantize_many([(codes, absmax, signed)], blocks, dtype)[0]
    if blocks.code_cols == blocks.cols:
        return values
    return values[:, : blocks.cols].contiguous()


def quantize_many_(states: Sequence[State], x: Tensor, blocks: RowBlocks) -> None:
    """Quantize ``x[i]`` into ``states[i]`` in place, for every ``i`` at once.

    ``x``: ``(len(states), rows, code_cols)``, any float dtype, in the padded layout (padding
    columns hold zeros, as :func:`dequantize_many` leaves them). On the CPU one pass per
    operation serves every state (a step quantizes two moments of the same shape).
    """
    rows = x.shape[1]
    if rows == 0:
        return
    if x.device.type != "cpu":
        for (codes, absmax, signed), values in zip(states, x):
            for cols, scales, size in _segments(blocks):
                out, scale = _quantize_blocks(values[:, cols].reshape(rows, -1, size), signed)
                codes[:, cols].copy_(out.view(rows, -1))
                absmax[:, scales].copy_(scale)
        return
    if native.usable(*(t for codes, absmax, _ in states for t in (codes, absmax))):
        values = x.float().contiguous()
        for (codes, absmax, signed), v in zip(states, values):
            native.quantize_rows(codes, absmax, v, blocks, signed)
        return
    # the absmax of every run of 64 values, then of 4 runs for a head block of 256
    runs = x.float().reshape(len(states), rows, -1, TAIL_BLOCK)
    run_max = runs.abs().amax(-1)
    head = 4 * blocks.head_blocks
    absmax = torch.cat(
        [run_max[..., :head].reshape(len(states), rows, -1, 4).amax(-1), run_max[..., head:]], -1
    )
    lower, threshold = _fp16_tables(tuple(signed for _, _, signed in states))
    codes = _encode(
        runs, _run_scales(absmax, blocks), lower, threshold, _offsets(len(states), 2**16, x.device)
    )
    for (out, out_absmax, _), c, a in zip(states, codes, absmax):
        out.copy_(c.view(rows, -1))
        out_absmax.copy_(a)


def dequantize_many(states: Sequence[State], blocks: RowBlocks, dtype: torch.dtype) -> Tensor:
    """A new ``(len(states), rows, code_cols)`` tensor of ``dtype``: the values each state
    encodes, in the padded layout (padding columns hold zeros: the code of 0)."""
    first = states[0][0]
    rows, device = first.shape[0], first.device
    if rows == 0:
        return torch.empty((len(states), 0, blocks.code_cols), dtype=dtype, device=device)
    if device.type != "cpu":
        out = torch.empty((len(states), rows, blocks.code_cols), device=device)
        for (codes, absmax, signed), values in zip(states, out):
            for cols, scales, size in _segments(blocks):
                part = codes[:, cols].reshape(rows, -1, size)
                values[:, cols] = _dequantize_blocks(part, absmax[:, scales], signed).view(rows, -1)
        return out.to(dtype)
    if native.usable(*(t for codes, absmax, _ in states for t in (codes, absmax))):
        out = torch.empty((len(states), rows, blocks.code_cols), device=device)
        for (codes, absmax, signed), values in zip(states, out):
            native.dequantize_rows(codes, absmax, blocks, signed, values)
        return out.to(dtype)
    codes = torch.stack([codes for codes, _, _ in states]).view(len(states), rows, -1, TAIL_BLOCK)
    absmax = torch.stack([absmax for _, absmax, _ in states])
    maps = _maps(tuple(signed for _, _, signed in states), device)
    values = _decode(codes, _run_scales(absmax, blocks), maps, _offsets(len(states), 256, device))
    return values.view(len(states), rows, blocks.code_cols).to(dtype)


def _run_scales(absmax: Tensor, blocks: RowBlocks) -> Tensor:
    """``(..., rows, code_cols / 64)``: the scale of each run of 64 codes
    (see :func:`_scale_columns`)."""
    return absmax.index_select(-1, _scale_columns(blocks, absmax.device))


@cache
def _offsets(n: int, step: int, device: torch.device) -> Tensor:
    """``(n, 1, 1, 1)`` int32: ``0, step, 2·step, …`` (where state ``i``'s part of concatenated
    tables starts)."""
    return (torch.arange(n, dtype=torch.int32) * step).view(n, 1, 1, 1).to(device)


@cache
def _maps(signs: tuple[bool, ...], device: torch.device) -> Tensor:
    """The dynamic maps of ``signs``, concatenated."""
    return torch.cat([dynamic_map(s, device) for s in signs])


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


def _encode(
    runs: Tensor, scale: Tensor, lower: Tensor, threshold: Tensor, offsets: Tensor
) -> Tensor:
    """Codes ``(k, rows, n, 64)`` uint8 of ``runs`` (fp32, same shape) over ``scale`` ``(k, rows,
    n)``: for every value, the index of the dynamic-map entry nearest to ``runs / scale`` (in
    [−1, 1]; a zero scale divides by 1), through the fp16-bits tables of :func:`_fp16_tables`
    (``offsets[i]``: where state ``i``'s tables start)."""
    normed = runs / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    index = normed.to(torch.float16).view(torch.uint16).int().add_(offsets).view(-1)
    codes = torch.index_select(lower, 0, index).view(normed.shape)
    return codes.add_(normed > torch.index_select(threshold, 0, index).view(normed.shape))


def _decode(codes: Tensor, scale: Tensor, maps: Tensor, offsets: Tensor) -> Tensor:
    """fp32 values ``(k, rows, n, 64)`` of ``codes`` (uint8, same shape) with ``scale`` ``(k,
    rows, n)``: ``maps[offsets[i] + code] · scale``."""
    values = torch.index_select(maps, 0, codes.int().add_(offsets).view(-1)).view(codes.shape)
    return values.mul_(scale.unsqueeze(-1))


@cache
def _fp16_tables(signs: tuple[bool, ...]) -> tuple[Tensor, Tensor]:
    """:func:`_fp16_table` of each of ``signs``, concatenated."""
    tables = [_fp16_table(s) for s in signs]
    return torch.cat([t[0] for t in tables]), torch.cat([t[1] for t in tables])
