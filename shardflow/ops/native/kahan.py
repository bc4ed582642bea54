"""A native CPU kernel for bf16 weights with Kahan compensation: the fp32 working copy and its
write-back in one pass each (``csrc/kahan.c``).

Why: in torch ops the load is a conversion and a mixed-dtype add, the write-back a conversion,
a mixed-dtype subtraction and another conversion — five passes, and the mixed-dtype ones slow
on the CPU (~0.6 s of a 1.2 s bf16 DolphinFlow step on one SmolLM2-135M layer, one thread,
``python -m bench.precision step``). The arithmetic is :mod:`shardflow.ops.precision`'s: the
same bits (round to nearest, ties to even). ``SHARDFLOW_NATIVE=0`` switches it off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shardflow.ops.native.build import I64, PTR, NativeLibrary, ptr

_library = NativeLibrary(
    "kahan",
    "kahan.c",
    {"sfk_load": [I64, PTR, PTR, PTR], "sfk_store": [I64, PTR, PTR, PTR]},
    fallback="bf16 working copies use torch's ops (slower, the same bits)",
)


def available() -> bool:
    return _library() is not None


def usable(w: Tensor, compensation: Tensor | None) -> bool:
    """Whether the kernel takes this weight (and buffer): contiguous bf16 on the CPU."""
    return (
        w.dtype == torch.bfloat16
        and w.device.type == "cpu"
        and w.is_contiguous()
        and (
            compensation is None
            or (
                compensation.dtype == torch.bfloat16
                and compensation.is_contiguous()
                and compensation.shape == w.shape
            )
        )
        and _library() is not None
    )


def load(w: Tensor, compensation: Tensor | None) -> Tensor:
    """A new fp32 tensor ``w + compensation`` (:func:`usable` tensors)."""
    out = torch.empty(w.shape, dtype=torch.float32)
    if w.numel():
        _library().sfk_load(w.numel(), ptr(w), ptr(compensation), ptr(out))
    return out


def store(x: Tensor, w: Tensor, compensation: Tensor | None) -> None:
    """``w ← round(x)``, ``compensation ← round(x − w)`` in place (``x``: contiguous fp32 of
    ``w``'s size)."""
    if w.numel():
        _library().sfk_store(w.numel(), ptr(x), ptr(w), ptr(compensation))
