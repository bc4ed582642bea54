"""A native CPU kernel for FactoredAdam's step: one pass over each factored matrix.

Why: the compiled pass (``compiled=True``) still makes ~5 passes over a matrix (~36 B per
element) plus ~0.3 ms of dynamo per call, and the eager path ~20: 4-9x fused AdamW on the CPU
(bench/results/factored-cpu-2026-11-23.md). Here one row loop does everything: per 8 columns
of a row it reconstructs ``m = ±r_m·c_m`` (sign from the packed bit) and ``v = r_v·c_v``,
applies Adam's rule, updates the weights, packs the new signs with one ``movemask``, and
accumulates the new row sums and the column partial sums of ``|m|`` and ``v``: the gradient
and the weights are read once, the weights written once, the signs read and written once
(≈12.25 B per element; fused AdamW moves 28).

**Arithmetic** (fp32, in the order of the torch path: :func:`~shardflow.optim.factored.
factored_chunk_update` with :func:`~shardflow.optim.factored.adam_direction` and
``_Factored._apply``):

    g ← g·grad_scale;  m ← r_m·c_m (sign flipped where the bit is set);  v ← r_v·c_v
    m ← fma(1−β₁, g − m, m)                     (torch.lerp's vectorized formula, weight < ½)
    v ← fma((1−β₂)·g, g, v·β₂)                  (addcmul's vectorized formula)
    u ← m / (√v·den_scale + den_eps)
    w ← fma(−lr, u, w·(1 − lr·wd))              (mul_, then add_ with alpha)

with ``c_m``, ``c_v`` the stored column factors divided by their sums in the kernel (summed in
8 lanes, so they may differ from ``factored._normalized``'s by an ulp), and the new signs, row
sums and column partial sums of ``|m|`` and ``v``. Row sums are summed
in 8 lanes then across them; column sums per block of ``block_rows`` rows, the blocks then added
in order: neither depends on the thread count (the blocks of every matrix of a group, in one
:func:`adam_many` call, are the tasks of torch's OpenMP threads), but both differ from torch's
reduction order by fp32 rounding (≈1e-7 relative). Rows go two at a time, so a column group's
partial sums stay in registers; weights and gradients are prefetched 4 KiB ahead. Measured
(bench/results/factored-cpu-2026-11-23.md, Run 7): SmolLM2-135M's step 1.28–1.59× (median
1.36×) fused AdamW on one thread, 1.07–1.37× on two (wall).

Only FactoredAdam's plain rule (no AdEMAMix, atan2, Grams; ``scale = 1``), fp32 weights and
gradients, on contiguous matrices: everything else takes the torch path. The kernel is the C
file ``csrc/factored.c``, built and loaded by :mod:`shardflow.ops.native.build` (AVX2 + FMA,
``SHARDFLOW_NATIVE=0`` switches it off); this module holds its ctypes structures and
signatures and :func:`adam_many`.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
from torch import Tensor

from shardflow.ops.native.build import FLAGS, I64, PTR, NativeLibrary


class _Rule(ctypes.Structure):
    _fields_ = [
        *(
            (name, ctypes.c_float)
            for name in (
                "grad_scale",
                "one_minus_beta1",
                "beta2",
                "one_minus_beta2",
                "den_scale",
                "den_eps",
                "decay",
                "neg_lr",
            )
        ),
        ("decay_on", ctypes.c_int32),
    ]


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("rule", _Rule),
        *((name, ctypes.c_int64) for name in ("rows", "cols", "block_rows", "blocks")),
        *(
            (name, ctypes.c_void_p)
            for name in ("w", "g", "rm", "rv", "cm_raw", "cv_raw", "signs", "out")
        ),
    ]


_SIGNATURES: dict[str, list[type]] = {
    # n, matrices, their elements in all
    "sff_adam_many": [I64, PTR, I64],
}

_library = NativeLibrary(
    "factored",
    "factored.c",
    _SIGNATURES,
    fallback="FactoredAdam uses the torch path (slower, same results to fp32 rounding)",
    flags=[*FLAGS, "-mfma"],
)
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`.build`)."""


def available() -> bool:
    """Whether the native kernel can run here (built on first call)."""
    return _library() is not None


MAX_BLOCKS = 32
"""Column partial sums are kept per block of rows: at most this many blocks per matrix."""
MIN_BLOCK_ROWS = 16


def block_rows(rows: int) -> int:
    """Rows per column-sum block: a function of ``rows`` only (never of the thread count)."""
    return max(MIN_BLOCK_ROWS, -(-rows // MAX_BLOCKS))


class Job(NamedTuple):
    """One fp32 matrix for :func:`adam_many`.

    ``w`` ``(rows, cols)`` and its gradient ``g`` (times ``scalars``' ``grad_scale``); the
    state's factors as stored: ``row_factors = (r_m, r_v)`` ``(rows,)`` (``|m|``'s bf16, ``v``'s
    fp32), ``col_factors = (c_m, c_v)`` ``(cols,)`` (the same dtypes; divided by their sums in
    the kernel, as ``factored._normalized`` does, summed in another order), ``signs`` ``(rows,
    ⌈cols/8⌉)`` uint8; ``scalars = (grad_scale, 1−β₁, β₂, den_scale, den_eps, 1 − lr·wd, lr)``
    (``den_scale = bc₁/√bc₂``, ``den_eps = eps·bc₁`` as :class:`StepScalars`)."""

    w: Tensor
    g: Tensor
    row_factors: tuple[Tensor, Tensor]
    col_factors: tuple[Tensor, Tensor]
    signs: Tensor
    scalars: tuple[float, ...]


def adam_many(jobs: list[Job]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """FactoredAdam's step on every matrix of ``jobs`` in one call, in place: the weights, the
    signs, and ``v``'s row factor (overwritten with the new row sums of ``v``).

    Returns, per job, the new row sums of ``|m|`` and the column sums of ``|m|`` and ``v`` over
    these rows (fp32; the caller rounds ``|m|``'s into its bf16 factor and reduces the columns
    over shards). The blocks of rows of all matrices are shared among torch's OpenMP threads.
    """
    mats = (_Matrix * len(jobs))()
    sizes = []
    for job in jobs:
        rows, cols = job.w.shape
        per_block = block_rows(rows)
        blocks = -(-rows // per_block)
        sizes.append((rows, cols, rows + 4 * cols + 2 * blocks * cols))
    out = torch.empty(sum(n for _, _, n in sizes), dtype=torch.float32)
    pieces = out.split([n for _, _, n in sizes])
    for mat, job, (rows, cols, _), piece in zip(mats, jobs, sizes, pieces):
        grad_scale, omb1, beta2, den_scale, den_eps, decay, lr = job.scalars
        mat.rule = _Rule(
            grad_scale, omb1, beta2, 1.0 - beta2, den_scale, den_eps, decay, -lr, decay != 1.0
        )
        mat.rows, mat.cols = rows, cols
        mat.block_rows = block_rows(rows)
        mat.blocks = -(-rows // mat.block_rows)
        mat.w, mat.g, mat.signs, mat.out = (
            job.w.data_ptr(), job.g.data_ptr(), job.signs.data_ptr(), piece.data_ptr()
        )  # fmt: skip
        mat.rm, mat.rv = job.row_factors[0].data_ptr(), job.row_factors[1].data_ptr()
        mat.cm_raw, mat.cv_raw = job.col_factors[0].data_ptr(), job.col_factors[1].data_ptr()
    numel = sum(rows * cols for rows, cols, _ in sizes)
    _library().sff_adam_many(len(jobs), ctypes.addressof(mats), numel)
    return [
        (piece[:rows], piece[rows : rows + cols], piece[rows + cols : rows + 2 * cols])
        for (rows, cols, _), piece in zip(sizes, pieces)
    ]


def usable(w: Tensor, g: Tensor) -> bool:
    """Whether the kernel takes this matrix: CPU, contiguous, fp32 weights and gradient."""
    return (
        available()
        and w.device.type == "cpu"
        and g.device.type == "cpu"
        and w.dtype == torch.float32
        and g.dtype == torch.float32
        and w.is_contiguous()
        and g.is_contiguous()
    )
