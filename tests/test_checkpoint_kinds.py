"""A test optimizer holding every kind of state a ShardFlow optimizer keeps, and a simulated placement.

``KindsOpt`` keeps, per parameter: a step counter, a dense fp32 moment, packed 1-bit signs
``(rows, ⌈cols/8⌉)``, a row factor ``(rows,)``, a column factor ``(cols,)`` reduced over the shards
(replicated), a projection seed (int64, replicated) with low-rank moments ``(rows, r)``, 8-bit
codes with per-row block scales ``(rows, nblocks)``, and a non-tensor counter (JSON). Its update
is row-local except the column factor, so it is world-size invariant — the same shape of rule as
the factored, low-rank and 8-bit optimizers.

``SimPlacement`` says which rows of which parameter a simulated rank holds: FSDP2-style chunks
(``fsdp``) or whole parameters owned round-robin (``ddp``), so that several ranks' slices can be
built in one process.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from shardflow.distributed.placement import LocalPlacement
from shardflow.optim.base import Layout, ShardFlowOptimizer, step_counter


def _matrix(t: Tensor) -> Tensor:
    """``(rows, cols)`` view: 1-D tensors are one column (works for 0-row shards too)."""
    return t.flatten(1) if t.ndim > 1 else t.unsqueeze(1)


def pack_signs(positive: Tensor) -> Tensor:
    """``(rows, cols)`` bools → ``(rows, ⌈cols/8⌉)`` uint8, bit j of byte k = column 8k + j."""
    rows, cols = positive.shape
    padded = torch.zeros(rows, math.ceil(cols / 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = positive.to(torch.uint8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def quantize8(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-row blocks of ``block`` columns, absmax-scaled onto 0..254 codes."""
    rows, cols = x.shape
    nblocks = math.ceil(cols / block)
    padded = torch.zeros(rows, nblocks * block)
    padded[:, :cols] = x
    blocks = padded.reshape(rows, nblocks, block)
    absmax = blocks.abs().amax(-1).clamp_min(1e-12)
    codes = (blocks / absmax[..., None] * 127).round().add(127).to(torch.uint8)
    return codes.reshape(rows, -1)[:, :cols], absmax


def dequantize8(codes: Tensor, absmax: Tensor, block: int) -> Tensor:
    rows, cols = codes.shape
    scale = absmax.repeat_interleave(block, dim=1)[:, :cols]
    return (codes.float() - 127) / 127 * scale


class KindsOpt(ShardFlowOptimizer):
    state_layout: ClassVar[dict[str, Layout]] = {
        "step": "replicated",
        "exp_avg": "rows",
        "sign": "rows",
        "row_sq": "rows",
        "col_sq": "replicated",
        "seed": "replicated",
        "low_rank": "rows",
        "codes": "rows",
        "absmax": "rows",
        "refresh": "replicated",
    }

    def __init__(self, params, lr: float = 1e-2, rank: int = 2, block: int = 3, **kw: Any):
        super().__init__(params, dict(lr=lr, rank=rank, block=block), **kw)

    def _init_state(self, param, local, group, state) -> None:
        rows, cols = _matrix(local).shape
        state["step"] = step_counter()
        state["exp_avg"] = torch.zeros_like(local, dtype=torch.float32)
        state["sign"] = torch.zeros(rows, math.ceil(cols / 8), dtype=torch.uint8)
        state["row_sq"] = torch.zeros(rows)
        state["col_sq"] = torch.zeros(cols)
        state["seed"] = torch.tensor(1000 + cols, dtype=torch.int64)
        state["low_rank"] = torch.zeros(rows, group["rank"])
        state["codes"] = torch.full((rows, cols), 127, dtype=torch.uint8)
        state["absmax"] = torch.zeros(rows, math.ceil(cols / group["block"]))
        state["refresh"] = 0

    def _update_group(self, group, items, ops) -> None:
        rows_total = [self.placement.global_shape(it.param)[0] for it in items]
        col_sums = [_matrix(it.grad).square().sum(0) for it in items]
        sizes = [c.numel() for c in col_sums]
        reduced = self.placement.sum_over_shards(torch.cat(col_sums)).split(sizes)
        for it, col, n in zip(items, reduced, rows_total):
            s, g = it.state, _matrix(it.grad)
            s["step"] += 1
            s["exp_avg"].lerp_(it.grad, 0.1)
            s["sign"].copy_(pack_signs(g > 0))
            s["row_sq"].lerp_(g.square().mean(1), 0.1)
            s["col_sq"].lerp_(col / n, 0.1)
            gen = torch.Generator().manual_seed(int(s["seed"]) + s["refresh"])
            proj = torch.randn(g.shape[1], group["rank"], generator=gen)
            s["low_rank"].lerp_(g @ proj, 0.1)
            codes, absmax = quantize8(_matrix(s["exp_avg"]), group["block"])
            s["codes"].copy_(codes)
            s["absmax"].copy_(absmax)
            if int(s["step"]) % 3 == 0:
                s["refresh"] += 1
            scale = (s["row_sq"][:, None] * s["col_sq"][None, :]).sqrt().add(1e-8)
            update = dequantize8(s["codes"], s["absmax"], group["block"]) / scale
            update = update + 0.01 * (s["low_rank"] @ proj.T)
            it.local.sub_(group["lr"] * update.clamp(-3, 3).reshape(it.local.shape))


def chunk_rows(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """FSDP2's ``Shard(0)`` split: chunks of ⌈n/W⌉ rows, the last ones short or empty."""
    chunk = math.ceil(n / world_size)
    start = min(n, rank * chunk)
    return start, min(n, start + chunk)


class SimPlacement(LocalPlacement):
    """One simulated rank's view: global shapes and the rows of each parameter it holds."""

    def __init__(self, rank: int, world_size: int, shapes: dict, ranges: dict) -> None:
        self.rank, self.world_size = rank, world_size
        self.shapes, self.ranges = shapes, ranges

    def global_shape(self, param: Tensor) -> torch.Size:
        return self.shapes[param]

    def row_range(self, param: Tensor) -> tuple[int, int] | None:
        return self.ranges[param]

    def owns(self, param: Tensor) -> bool:
        return self.ranges[param] is not None


def rank_view(named: list[tuple[str, Tensor]], kind: str, rank: int, world_size: int):
    """Rank ``rank``'s parameters and placement: FSDP2 row chunks, or DDP whole-param owners."""
    params, shapes, ranges = [], {}, {}
    for i, (name, p) in enumerate(named):
        if kind == "fsdp":
            start, stop = chunk_rows(p.shape[0], world_size, rank)
            mine = torch.nn.Parameter(p.detach()[start:stop].clone())
            ranges[mine] = (start, stop)
        else:
            mine = torch.nn.Parameter(p.detach().clone())
            ranges[mine] = (0, p.shape[0]) if i % world_size == rank else None
        shapes[mine] = p.shape
        params.append((name, mine))
    return params, SimPlacement(rank, world_size, shapes, ranges)


def build_rank(named, kind: str, rank: int, world_size: int, **config):
    """A KindsOpt for one simulated rank; non-owners' state is poisoned (it must never be saved)."""
    params, placement = rank_view(named, kind, rank, world_size)
    opt = KindsOpt(params, **config)
    opt.placement = placement
    for _, p in params:
        if not placement.owns(p):
            for value in opt.state[p].values():
                if isinstance(value, Tensor) and value.is_floating_point():
                    value.fill_(float("nan"))
    return opt, params


def scatter_state(reference: KindsOpt, ref_params, opt: KindsOpt, params) -> None:
    """Copy the reference (single-process) state's slices into a simulated rank's optimizer."""
    for (_, rp), (_, p) in zip(ref_params, params):
        rows = opt.placement.row_range(p)
        if rows is None:
            continue
        for key, value in reference.state[rp].items():
            if not isinstance(value, Tensor):
                opt.state[p][key] = value
            elif KindsOpt.state_layout[key] == "rows" and value.ndim:
                opt.state[p][key] = value[rows[0] : rows[1]].clone()
            else:
                opt.state[p][key] = value.clone()


# -- the helpers themselves -----------------------------------------------------------------------


def test_pack_signs_sets_one_bit_per_column():
    positive = torch.tensor([[True, False, True] + [False] * 6 + [True]])
    packed = pack_signs(positive)
    assert packed.shape == (1, 2)
    assert packed.tolist() == [[0b101, 0b10]]


def test_quantize8_round_trips_within_half_a_code():
    x = torch.randn(5, 7)
    codes, absmax = quantize8(x, 3)
    assert codes.shape == (5, 7) and absmax.shape == (5, 3)
    err = (dequantize8(codes, absmax, 3) - x).abs()
    assert (err <= absmax.repeat_interleave(3, 1)[:, :7] / 254 + 1e-6).all()


def test_chunk_rows_matches_fsdp2_split():
    assert [chunk_rows(5, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
