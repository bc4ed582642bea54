"""Orthogonalization primitives: Newton-Schulz (full-matrix and block-wise) and ⊥Grad.

All functions are pure: they take local tensors and return new ones (or modify a buffer they
were explicitly given). Placement (which rank computes what) lives in ``shardflow.distributed``.

Newton-Schulz
    The quintic iteration ``X ← a·X + (b·A + c·A²)·X`` with ``A = X·Xᵀ`` and the coefficients
    ``(a, b, c) = (3.4445, −4.7750, 2.0315)`` found by Keller Jordan et al. for Muon
    (https://kellerjordan.github.io/posts/muon/). The input is first divided by its Frobenius
    norm (so every singular value is ≤ 1), and the iteration runs on the short side (a tall
    matrix is transposed), so ``A`` is ``min(m, n)²``. These coefficients trade exactness for
    speed: singular values do not converge to 1 but into a band around it, documented as
    :data:`NS_BAND` and checked by the tests.

Per-iteration coefficients (``coeffs="polar_express"``)
    Polar Express (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal Matrix Sign
    Methods and Their Application to the Muon Algorithm", arXiv 2505.16932, Algorithm 1):
    iteration ``t`` uses its own quintic ``(aₜ, bₜ, cₜ)``, the minimax-optimal odd polynomial for
    the singular values' interval at that point, so the composition converges to 1 (Muon's
    fixed coefficients plateau in a band). The paper's table for degree 5 is
    :data:`POLAR_EXPRESS_COEFFS`: its first seven polynomials divided by its safety factor 1.01
    (``a/1.01, b/1.01³, c/1.01⁵``, for bf16), the eighth repeated for every later iteration; the
    input is normalized by ``1.01·‖X‖_F`` as the paper does. The cost per iteration is Muon's.

Adaptive step count (the measured criterion)
    After ``min_steps`` iterations, each further iteration first measures the orthogonality
    error ``e = ‖A − I‖_F / √k`` (``k = min(m, n)``) on the ``A`` it has to compute anyway, i.e.
    the root-mean-square of ``σᵢ² − 1``. Each matrix of a batch stops (is frozen) as soon as it
    has ``e ≤ tol`` (default :data:`NS_TOL`); the batch stops when every matrix has, and never
    runs more than ``max_steps`` iterations.
    The check costs one scalar read from the device per extra iteration and nothing else.

⊥Grad
    Prieto et al., "Grokking at the Edge of Numerical Stability" (arXiv 2501.04697): remove from
    the gradient its component along the weight, ``g⊥ = g − (⟨g, w⟩ / ‖w‖²)·w``, so that the step
    cannot simply scale the weights up (naïve loss minimization). ``rowwise`` does this for every
    output row of a matrix separately (shard-local under row sharding); ``flat`` treats the whole
    tensor as one vector, as the paper does. ``restore_norm`` rescales ``g⊥`` to ``‖g‖``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

NS_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""Quintic Newton-Schulz coefficients (a, b, c) from Muon."""

_PE_SAFETY = 1.01
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = tuple(
    (a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5)
    for a, b, c in (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    )
) + ((1.875, -1.25, 0.375),)
"""Polar Express degree-5 coefficients per iteration (arXiv 2505.16932, Algorithm 1, with the
paper's safety factor); iterations past the table repeat the last row."""

NS_SCHEDULES = ("muon", "polar_express")
"""Names of the coefficient schedules :func:`newton_schulz` takes as ``coeffs``."""


def ns_coefficients(coeffs: str, steps: int) -> list[tuple[float, float, float]]:
    """The ``(a, b, c)`` of each of ``steps`` iterations for the schedule named ``coeffs``."""
    if coeffs == "muon":
        return [NS_COEFFS] * steps
    if coeffs == "polar_express":
        table = POLAR_EXPRESS_COEFFS
        return [table[min(i, len(table) - 1)] for i in range(steps)]
    raise ValueError(f"coeffs={coeffs!r} is invalid: pass one of {', '.join(NS_SCHEDULES)}.")


def _input_scale(coeffs: str) -> float:
    """The Frobenius norm's multiplier before the iteration (Polar Express: its safety 1.01)."""
    return _PE_SAFETY if coeffs == "polar_express" else 1.0


NS_TOL: float = 0.35
"""Default stop tolerance on ``‖XXᵀ − I‖_F / √k``: RMS of ``σ² − 1`` over the singular values."""

NS_BAND: tuple[float, float] = (0.55, 1.25)
"""Band that singular values lie in after the iteration has met :data:`NS_TOL` (tested)."""

_EPS = 1e-7


def newton_schulz(
    x: Tensor,
    *,
    min_steps: int = 3,
    max_steps: int = 5,
    tol: float = NS_TOL,
    dtype: torch.dtype | None = None,
    coeffs: str = "muon",
) -> Tensor:
    """Approximately orthogonalize ``x`` (shape ``(..., m, n)``) with quintic Newton-Schulz.

    ``coeffs`` names the coefficient schedule: ``"muon"`` (the fixed quintic) or
    ``"polar_express"`` (per iteration; see the module docstring).

    Leading dimensions are a batch: every matrix in it is orthogonalized separately and stops
    on its own (a matrix that meets the criterion is frozen while the others go on), so a
    matrix's result does not depend on which batch it travels in — the sharded placements
    batch matrices differently on each rank and must give the single-device numbers. ``dtype`` is the
    compute dtype (``torch.bfloat16`` halves memory traffic on GPUs; ``None`` keeps fp32 or
    higher). Returns a tensor of ``x``'s shape and dtype whose singular values lie in
    :data:`NS_BAND` once the criterion is met.
    """
    if x.ndim < 2:
        raise ValueError(
            f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(x.shape)}"
        )
    schedule = ns_coefficients(coeffs, max_steps)
    if x.numel() == 0:
        return torch.zeros_like(x)
    tall = x.size(-2) > x.size(-1)
    y = ns_start(x, coeffs=coeffs, dtype=dtype)
    k = y.size(-2)
    eye = torch.eye(k, dtype=y.dtype, device=y.device) if max_steps > min_steps else None
    done = None  # per matrix: met the criterion, frozen from then on
    for step, (a, b, c) in enumerate(schedule):
        gram = y @ y.mT
        if eye is not None and step >= min_steps:
            err = torch.linalg.matrix_norm((gram - eye).float()) / math.sqrt(k)
            done = err <= tol if done is None else done | (err <= tol)
            if bool(done.all()):
                break
        nxt = ns_iterate(y, gram, (a, b, c))
        y = nxt if done is None else torch.where(done[..., None, None], y, nxt)
    if tall:
        y = y.mT
    return y.to(x.dtype)


def ns_start(x: Tensor, *, coeffs: str = "muon", dtype: torch.dtype | None = None) -> Tensor:
    """The iteration's starting point: ``x`` on its short side (a tall matrix transposed), in the
    compute dtype (``dtype``, else fp32 or higher), divided by its Frobenius norm (times the
    schedule's safety factor), so that every singular value is ≤ 1."""
    compute = dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
    y = (x.mT if x.size(-2) > x.size(-1) else x).to(compute)
    norm = torch.linalg.vector_norm(y.float(), dim=(-2, -1), keepdim=True).to(compute)
    return y / (norm * _input_scale(coeffs) + _EPS)


def ns_iterate(y: Tensor, gram: Tensor, abc: tuple[float, float, float]) -> Tensor:
    """One quintic iteration ``a·Y + (b·A + c·A²)·Y`` with ``A = gram = Y·Yᵀ`` (batched or not)."""
    a, b, c = abc
    poly = (
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        if gram.ndim == 3
        else b * gram + c * (gram @ gram)
    )
    return torch.baddbmm(y, poly, y, beta=a) if y.ndim == 3 else a * y + poly @ y


def orthogonality_error(x: Tensor) -> Tensor:
    """``‖XXᵀ − I‖_F / √k`` on the short side, per matrix: the RMS of ``σᵢ² − 1``."""
    y = x.mT if x.size(-2) > x.size(-1) else x
    y = y.double()
    k = y.size(-2)
    return torch.linalg.matrix_norm(
        y @ y.mT - torch.eye(k, dtype=y.dtype, device=y.device)
    ) / math.sqrt(k)


def newton_schulz_many(mats: Sequence[Tensor], **ns_kwargs) -> list[Tensor]:
    """Orthogonalize each matrix in ``mats``, batching those of equal shape into one call."""
    out: list[Tensor | None] = [None] * len(mats)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    for idx in by_shape.values():
        batch = torch.stack([mats[i] for i in idx]) if len(idx) > 1 else mats[idx[0]].unsqueeze(0)
        result = newton_schulz(batch, **ns_kwargs)
        for j, i in enumerate(idx):
            out[i] = result[j]
    return out  # type: ignore[return-value]


def as_matrix(t: Tensor) -> Tensor:
    """View a tensor of 2 or more dims as ``(out, rest)``; convolution filters flatten this way."""
    return t if t.ndim == 2 else t.flatten(1)


def block_view(m: Tensor, block_size: int) -> list[tuple[slice, slice]]:
    """Row/column slices of the ``block_size``-square tiles covering ``m``, ragged edges included."""
    rows, cols = m.shape[-2], m.shape[-1]
    return [
        (slice(r, min(r + block_size, rows)), slice(c, min(c + block_size, cols)))
        for r in range(0, rows, block_size)
        for c in range(0, cols, block_size)
    ]


def block_newton_schulz(m: Tensor, block_size: int, **ns_kwargs) -> Tensor:
    """Orthogonalize every ``block_size × block_size`` tile of ``m`` separately.

    Edge tiles are smaller (ragged); tiles of equal shape are batched. Each tile's result is
    scaled by ``√max(tile rows, tile cols)`` when ``scale_rms`` is requested by the caller via
    :func:`orthogonal_update`; this function returns the plain orthogonalized tiles.
    """
    tiles = block_view(m, block_size)
    results = newton_schulz_many([m[r, c] for r, c in tiles], **ns_kwargs)
    out = torch.empty_like(m)
    for (r, c), res in zip(tiles, results):
        out[r, c] = res
    return out


def rms_scale(shape: Sequence[int]) -> float:
    """Factor that gives an orthogonal ``(m, n)`` matrix an RMS of 1: ``√max(m, n)``.

    An orthogonal matrix has ``min(m, n)`` singular values equal to 1, so its RMS is
    ``√(min/(m·n)) = 1/√max(m, n)``.
    """
    return math.sqrt(max(shape[-2], shape[-1]))


def block_rms_scale(m: Tensor, block_size: int) -> Tensor:
    """Per-element RMS factors for a block-orthogonalized matrix (``√max`` of each tile's shape)."""
    scale = torch.empty(m.shape[-2:], dtype=m.dtype, device=m.device)
    for r, c in block_view(m, block_size):
        scale[r, c] = math.sqrt(max(r.stop - r.start, c.stop - c.start))
    return scale


def orthograd_sums(grad: Tensor, weight: Tensor, *, rowwise: bool = True) -> Tensor:
    """Partial sums ⊥Grad needs, ``(⟨g, w⟩, ‖w‖², ‖g‖²)``: one row per matrix row, or one in all.

    Shape ``(rows, 3)`` when ``rowwise`` and the tensor has 2 or more dims, else ``(1, 3)``. Under
    row sharding the row-wise sums are complete on every rank; the flat ones are summed over the
    ranks first (one batched reduction for every parameter). The squares are norm reductions and
    the dot a ``vecdot``: no ``g·w`` or ``w²`` temporary is built.
    """
    g, w = _rows(grad, rowwise), _rows(weight, rowwise).to(grad.dtype)
    return torch.stack(
        [
            torch.linalg.vecdot(g, w, dim=1),
            torch.linalg.vector_norm(w, dim=1).square(),
            torch.linalg.vector_norm(g, dim=1).square(),
        ],
        dim=1,
    )


PARALLEL_TOL = 1024.0
"""⊥Grad treats a gradient row as parallel to its weight when ``‖g⊥‖²/‖g‖² ≤ PARALLEL_TOL·ε``
(fp32: 1.2e-4, i.e. ``g⊥`` under 1.1 % of ``g``): below that the computed ``‖g⊥‖²`` is mostly
cancellation error (``‖g‖² − ⟨g,w⟩²/‖w‖²``, about ``√n·ε`` of ``‖g‖²``)."""


def orthograd_fold(sums: Tensor, *, restore_norm: bool = False) -> tuple[Tensor, Tensor]:
    """⊥Grad folded into two coefficients per row, ``(a, b)`` with ``result = a·g − b·w``.

    From :func:`orthograd_sums` ``(⟨g,w⟩, ‖w‖², ‖g‖²)``: ``c = ⟨g,w⟩/‖w‖²`` (0 for a zero weight
    row), ``f = √(‖g‖² / ‖g⊥‖²)`` with ``‖g⊥‖² = ‖g‖² − c·⟨g,w⟩`` when ``restore_norm`` (else
    ``f = 1``; a zero gradient row keeps ``f = 1``), and ``a = f``, ``b = f·c``. Both have shape
    ``(rows,)``. Folding lets an update apply ⊥Grad inside the pass it makes anyway.

    A row whose gradient is parallel to its weight, to working precision (``‖g⊥‖² ≤
    PARALLEL_TOL·ε·‖g‖²``, ε the dtype's epsilon), has no orthogonal component: with
    ``restore_norm`` its result is 0 (``a = b = 0``), never rounding noise scaled up to ``‖g‖``.
    """
    gw, ww, gg = sums.unbind(1)
    tiny = torch.finfo(sums.dtype).tiny
    coef = torch.where(ww > 0, gw / ww.clamp_min(tiny), torch.zeros_like(gw))
    if not restore_norm:
        return torch.ones_like(coef), coef
    after = gg - coef * gw
    parallel = after <= gg * (PARALLEL_TOL * torch.finfo(sums.dtype).eps)
    factor = torch.where(gg > 0, (gg / after.clamp_min(tiny)).sqrt(), torch.ones_like(gg))
    factor = torch.where(parallel & (gg > 0), torch.zeros_like(gg), factor)
    return factor, factor * coef


def orthograd_(
    grad: Tensor,
    weight: Tensor,
    *,
    rowwise: bool = True,
    restore_norm: bool = False,
    sums: Tensor | None = None,
) -> Tensor:
    """⊥Grad in place: remove from ``grad`` its component along ``weight``; returns ``grad``.

    ``rowwise`` projects each row (dim-0 slice) of a tensor of 2 or more dims separately;
    otherwise the whole tensor is one vector (1-D tensors always are). ``sums`` may carry
    :func:`orthograd_sums`, already reduced across ranks. A zero weight (row) leaves the gradient
    unchanged. With ``restore_norm`` the result is rescaled to the original gradient's norm, using
    ``‖g⊥‖² = ‖g‖² − ⟨g, w⟩²/‖w‖²`` so that no second reduction is needed. Two passes over ``g``
    (``g ← a·g``, ``g ← g − b·w``; see :func:`orthograd_fold`), no temporary.
    """
    if sums is None:
        sums = orthograd_sums(grad, weight, rowwise=rowwise)
    a, b = orthograd_fold(sums, restore_norm=restore_norm)
    apply_fold_(_rows(grad, rowwise), _rows(weight, rowwise), a, b, scale=restore_norm)
    return grad


def apply_fold_(g: Tensor, w: Tensor, a: Tensor, b: Tensor, *, scale: bool = True) -> Tensor:
    """``g ← a·g − b·w`` per row of the ``(rows, rest)`` views ``g`` and ``w``; ``a`` is skipped
    when ``scale`` is False (it is all ones)."""
    if scale:
        g.mul_(a.unsqueeze(1))
    return g.addcmul_(b.unsqueeze(1), w, value=-1)


def _rows(t: Tensor, rowwise: bool) -> Tensor:
    """``(rows, rest)`` view when row-wise and 2 or more dims, else ``(1, numel)``."""
    return t.flatten(1) if (rowwise and t.ndim >= 2) else t.reshape(1, -1)
