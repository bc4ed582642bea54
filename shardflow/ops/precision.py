"""Low-precision helpers every optimizer shares: stochastic rounding to bfloat16.

**Stochastic rounding.** A bf16 number keeps the upper 16 bits of an fp32 number. Rounding to
nearest loses every update smaller than half a unit in the last place, so a bf16 weight stops
moving once ``lr·u`` is below ``2⁻⁹·|w|``. Stochastic rounding adds a uniform random integer in
``[0, 2¹⁶)`` to the fp32 bit pattern and truncates the lower 16 bits: the result rounds up with
probability equal to the discarded fraction, so it is unbiased, ``E[round(x)] = x``
(Gupta et al. 2015, "Deep Learning with Limited Numerical Precision", arXiv 1502.02551). The bit
trick works for negative numbers too: it acts on the magnitude bits.

**Random bits that do not depend on the shard.** The random integer for an element is a hash of
``(seed, global element index)`` — a counter-based stream, not a generator's state — so a row
shard that starts at global element ``offset`` draws exactly the bits the unsharded tensor draws
for those elements. Rounding therefore gives the same weights on 1, 2 or 4 ranks, and a resumed
run draws what the uninterrupted one would (the seed is built from the parameter's index and the
step). The hash is ``lowbias32`` (C. Wellons, "Prospecting for hash functions", 2018): evaluated
in int64 with products kept below 2⁶³ where all 32 bits are needed (:func:`hash32`), and in int32
with wrapping products where 16 bits of noise are (:func:`hash32_low16`, bit-identical, ~10
int32 passes instead of ~25 int64 ones).

**Low-precision weights** (the idea of optimi's Kahan summation, Zamirai et al. 2020 "Revisiting
BFloat16 Training", arXiv 2010.06192; our code). A bf16/fp16 weight is read into an fp32 working
copy (:func:`working_copy`), the update rule runs on that copy, and :func:`store_weight_` writes
it back in one of three ways (:data:`PRECISIONS`):

- ``"kahan"`` — round to nearest and keep what rounding lost in a compensation buffer of the
  weight's dtype (2 B/param for bf16); the next working copy is ``w + c``, so the pair holds the
  weight to about 16 significant bits and tiny updates accumulate instead of vanishing;
- ``"sr"`` — stochastic rounding (no state): unbiased, ``E[w] = x``; bf16 by the bit trick above,
  fp16 by choosing between the two fp16 neighbours of ``x`` with the same counter-based bits;
- ``"nearest"`` — round to nearest: an update below half a unit in the last place is lost.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shardflow.ops.native import kahan as native_kahan
from shardflow.ops.native import rounding as native_rounding

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B
_C2_INT32 = _C2 - (1 << 32)
"""``_C2`` as a signed int32 (its wrapping products are the same bits)."""


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x · c) mod 2³²`` for int64 ``x`` in ``[0, 2³²)`` without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x: Tensor) -> Tensor:
    """``lowbias32`` of each int64 element of ``x`` (values in ``[0, 2³²)``), as int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def hash32_low16(x: Tensor) -> Tensor:
    """The low 16 bits of :func:`hash32` of each element (``[0, 2³²)`` values), as int32.

    The same function in int32 with wrapping multiplies, arithmetic shifts made logical by
    masking.
    """
    x = x.to(torch.int32)
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _C2_INT32
    return (x ^ (x >> 16)) & 0xFFFF


def hash32_int(x: int) -> int:
    """:func:`hash32` of one Python int (reduced to 32 bits first)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def mix_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (e.g. parameter index, step, stream)."""
    h = 0x9E3779B9
    for part in parts:
        h = hash32_int(h ^ hash32_int(part))
    return h


def random_bits(numel: int, seed: int, offset: int, device: torch.device | str) -> Tensor:
    """``numel`` pseudo-random 32-bit integers (int64) for global elements ``offset, offset+1, …``.

    Element ``i`` gets ``hash32(lo32(offset + i) ^ key)`` with ``key = hash32(seed ^ hi32(offset
    + i))``: a pure function of ``(seed, global index)``, whatever slice asks for it.
    """
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    if offset + numel <= 1 << 32:
        key: Tensor | int = hash32_int(seed)
    else:
        key = hash32(((index >> 32) ^ seed) & _M32)
    return hash32((index & _M32) ^ key)


def round_bf16_stochastic(x: Tensor, seed: int, offset: int = 0) -> Tensor:
    """``x`` (fp32) rounded stochastically to bf16; ``offset`` is the global index of ``x[0]``.

    Unbiased: each element rounds up with probability equal to the fraction the truncation
    drops. Deterministic in ``(seed, offset)``; see the module docstring.
    """
    x = x.detach()
    if offset + x.numel() <= 1 << 32:
        return bf16_stochastic(x, hash32_int(seed), offset)
    x = x.to(torch.float32).contiguous()
    bits = random_bits(x.numel(), seed, offset, x.device).reshape(x.shape)
    noise = (bits & 0xFFFF).to(torch.int32)
    rounded = (x.view(torch.int32) + noise) & -65536
    return rounded.view(torch.float32).to(torch.bfloat16)


def bf16_stochastic(x: Tensor, key: Tensor | int, offset: Tensor | int) -> Tensor:
    """:func:`round_bf16_stochastic` with ``key = hash32_int(seed)`` given, for ``offset + numel ≤
    2³²`` (bit-identical there). ``key`` and ``offset`` may be 0-d tensors, so that a compiled
    kernel does not recompile for every step's seed."""
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape)
    noise = hash32_low16(((index + offset) & _M32) ^ key)
    bits = (x.to(torch.float32).contiguous().view(torch.int32) + noise) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def add_stochastic_(
    param: Tensor, update: Tensor, alpha: float = 1.0, *, seed: int, offset: int = 0
) -> Tensor:
    """``param ← round(param + alpha·update)`` in place; returns ``param``.

    For a bf16 ``param`` the sum is formed in fp32 and rounded stochastically
    (:func:`round_bf16_stochastic` with ``seed`` and ``offset``, the global flat index of
    ``param``'s first element, which makes the rounding independent of how the tensor is
    sharded). Any other dtype is updated with an ordinary rounded ``add_``.
    """
    if param.dtype != torch.bfloat16:
        return param.add_(update.to(param.dtype), alpha=alpha)
    exact = param.to(torch.float32).add_(update.to(torch.float32), alpha=alpha)
    return param.copy_(round_bf16_stochastic(exact, seed, offset))


PRECISIONS = ("kahan", "sr", "nearest")
"""How an update reaches a low-precision weight (see the module docstring)."""

WORKING_COPY_FRACTION = 0.25
"""Share of a group's low-precision weight elements whose fp32 working copies exist at once: the
group is updated in chunks (about four), so the copies cost about 1 B per parameter, not 4 (a
chunk holds at least one whole parameter: a parameter larger than the share is one chunk)."""

LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Weight dtypes that get an fp32 working copy and a :data:`PRECISIONS` write-back."""


def is_low_precision(t: Tensor) -> bool:
    return t.dtype in LOW_PRECISION


def working_copy(w: Tensor, compensation: Tensor | None = None) -> Tensor:
    """A new fp32 tensor holding the value of the low-precision weight ``w`` (``w + c`` with a
    Kahan compensation buffer ``c``)."""
    if native_kahan.usable(w, compensation):
        return native_kahan.load(w, compensation)  # the same bits, one pass in C
    x = w.to(torch.float32, copy=True)
    if compensation is not None:
        x.add_(compensation)
    return x


def store_weight_(
    w: Tensor,
    x: Tensor,
    precision: str,
    *,
    compensation: Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
) -> None:
    """Write the fp32 ``x`` into the low-precision weight ``w`` in place (``x`` is scratch).

    ``precision`` is one of :data:`PRECISIONS`; ``"kahan"`` needs ``compensation`` (same dtype
    and shape as ``w``, updated in place); ``"sr"`` draws its bits from ``(seed, offset + i)``,
    ``offset`` being the global flat index of ``w``'s first element (so a row shard rounds as
    the whole tensor would).
    """
    if (
        precision in ("kahan", "nearest")
        and x.is_contiguous()
        and native_kahan.usable(w, compensation)
    ):
        native_kahan.store(x, w, compensation if precision == "kahan" else None)  # one pass in C
    elif precision == "kahan":
        w.copy_(x)
        compensation.copy_(x.sub_(w))  # exact in fp32: x and round(x) are neighbours
    elif precision == "sr":
        pieces = [(w, x, hash32_int(seed), offset)]
        if offset + x.numel() <= 1 << 32 and native_rounding.usable(pieces):
            native_rounding.bf16_stochastic_many(pieces)  # the same bits, one pass in C
        else:
            w.copy_(round_stochastic(x, w.dtype, seed, offset))
    else:
        w.copy_(x)


def round_stochastic(x: Tensor, dtype: torch.dtype, seed: int, offset: int = 0) -> Tensor:
    """``x`` (fp32) rounded stochastically to ``dtype`` (bf16 or fp16), unbiased, deterministic
    in ``(seed, offset)`` (``offset``: the global flat index of ``x``'s first element)."""
    if dtype == torch.bfloat16:
        return round_bf16_stochastic(x, seed, offset)
    if dtype != torch.float16:
        raise ValueError(f"round_stochastic: dtype={dtype} is not bf16 or fp16.")
    x = x.to(torch.float32)
    near = x.to(torch.float16)
    base = near.to(torch.float32)
    toward = torch.where(base < x, torch.inf, -torch.inf).to(torch.float16)
    other = torch.nextafter(near, toward)
    gap = (other.to(torch.float32) - base).abs()
    p_other = torch.where(gap > 0, (x - base).abs() / gap, 0.0)
    bits = random_bits(x.numel(), seed, offset, x.device).reshape(x.shape)
    u = (bits >> 8).to(torch.float32) * 2.0**-24  # 24 uniform bits in [0, 1)
    return torch.where(u < p_other, other, near)
