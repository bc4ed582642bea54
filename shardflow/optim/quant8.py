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


def quantize_(codes: Tensor, absmax: Tensor, x: Tensor, blocks: RowBlocks, signed: bool) -> None:
    """Quantize ``x`` (``(rows, cols)``, any float dtype) into ``codes`` and ``absmax`` in place."""
    rows = x.shape[0]
    if rows == 0:
        return
    code = dynamic_map(signed, x.device)
    x = x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()
    h, hb = blocks.head, blocks.head_blocks
    if blocks.tail == 0:
        c, qs = bnbf.quantize_blockwise(x.contiguous(), code=code, blocksize=HEAD_BLOCK)
        codes.copy_(c.view(rows, -1))
        absmax.copy_(qs.absmax.view(rows, -1))
        return
    if h:
        c, qs = bnbf.quantize_blockwise(x[:, :h].contiguous(), code=code, blocksize=HEAD_BLOCK)
        codes[:, :h].copy_(c)
        absmax[:, :hb].copy_(qs.absmax.view(rows, hb))
    tail = x.new_zeros((rows, blocks.tail_padded))
    tail[:, : blocks.tail].copy_(x[:, h:])
    c, qs = bnbf.quantize_blockwise(tail, code=code, blocksize=TAIL_BLOCK)
    codes[:, h:].copy_(c)
    absmax[:, hb:].copy_(qs.absmax.view(rows, -1))


def dequantize(
    codes: Tensor, absmax: Tensor, blocks: RowBlocks, signed: bool, dtype: torch.dtype
) -> Tensor:
    """A new ``(rows, cols)`` tensor of ``dtype``: the values ``codes`` and ``absmax`` encode."""
    rows = codes.shape[0]
    if rows == 0:
        return torch.zeros((0, blocks.cols), dtype=dtype, device=codes.device)
    code = dynamic_map(signed, codes.device)
    h, hb = blocks.head, blocks.head_blocks
    if blocks.tail == 0:
        out = bnbf.dequantize_blockwise(
            codes, absmax=absmax.view(-1), code=code, blocksize=HEAD_BLOCK
        ).view(rows, h)
        return out if dtype == torch.float32 else out.to(dtype)
    out = torch.empty((rows, blocks.cols), dtype=dtype, device=codes.device)
    if h:
        out[:, :h] = bnbf.dequantize_blockwise(
            codes[:, :h].contiguous(),
            absmax=absmax[:, :hb].contiguous().view(-1),
            code=code,
            blocksize=HEAD_BLOCK,
        ).view(rows, h)
    tail = bnbf.dequantize_blockwise(
        codes[:, h:].contiguous(),
        absmax=absmax[:, hb:].contiguous().view(-1),
        code=code,
        blocksize=TAIL_BLOCK,
    ).view(rows, blocks.tail_padded)
    out[:, h:] = tail[:, : blocks.tail]
    return out
