"""Dry run: the plan of a run without allocating it (model on the meta device).

Prints the param groups and their optimizer routing, the Newton-Schulz owner ranks of the
orthogonalized matrices, and an estimate of memory per rank (weights, gradients, optimizer
state; activations are not included).
"""

from __future__ import annotations

import heapq
import math
from pathlib import Path

import torch

from shardflow.train.config import Config, check_values
from shardflow.train.groups import RoutedGroup, route_params
from shardflow.train.optimizers import (
    ORTHOGONALIZING,
    accepts_process_group,
    check_optimizer_name,
    default_option,
    state_bytes_per_param,
)

GIB = 1024**3


def balance(costs: list[float], ranks: int) -> list[int]:
    """Owner rank per item: longest-processing-time first (largest cost to the idlest rank)."""
    heap = [(0.0, r) for r in range(ranks)]
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + costs[i], rank))
    return owners


def owner_plan(shapes: list[tuple[int, int]], ranks: int) -> list[int]:
    """Newton-Schulz owner rank per matrix, balanced over cost m·n·min(m, n)."""
    return balance([m * n * min(m, n) for m, n in shapes], ranks)


NS_MODES = ("matrix", "full", "block")
"""ortho_mode values that run Newton-Schulz on whole matrices or tiles (owner ranks needed)."""


def _ortho_mode(cfg: Config, group: RoutedGroup) -> str | None:
    """The group's ortho_mode (its own, else the optimizer's default); None: element-wise."""
    if cfg.optim.name.lower() not in ORTHOGONALIZING:
        return None
    if "ortho_mode" in group.options:
        return group.options["ortho_mode"]
    return cfg.optim.hyper.get("ortho_mode", default_option(cfg.optim.name, "ortho_mode"))


def _shard_bytes(param: torch.Tensor, ranks: int) -> int:
    """Bytes of the largest dim-0 shard of ``param`` over ``ranks``."""
    rows = math.ceil(param.shape[0] / ranks) if param.dim() else 1
    return rows * math.prod(param.shape[1:]) * param.element_size()


def _fmt(nbytes: float) -> str:
    return f"{nbytes / GIB:8.2f} GiB"


def _memory(cfg: Config, groups: list[RoutedGroup]) -> list[str]:
    ranks = cfg.run.nproc
    kind = cfg.placement.kind
    state_b = state_bytes_per_param(cfg.optim.name)
    sharded_state = accepts_process_group(cfg.optim.name)
    params = [p for g in groups for p in g.params]
    weights = [0.0] * ranks
    state = [0.0] * ranks
    owners = balance([p.numel() for p in params], ranks)  # ddp: whole params per owner
    for p, owner in zip(params, owners):
        for r in range(ranks):
            if kind == "fsdp":
                weights[r] += _shard_bytes(p, ranks)
                state[r] += _shard_bytes(p, ranks) / p.element_size() * state_b
            else:
                weights[r] += p.numel() * p.element_size()
                if kind == "ddp" and sharded_state:
                    state[r] += p.numel() * state_b if owner == r else 0
                else:
                    state[r] += p.numel() * state_b
    if kind == "offload":
        return _offload_memory(cfg, weights[0], sum(p.numel() for p in params), state_b)
    lines = [
        f"memory per rank (estimate; {state_b:g} B/param of {cfg.optim.name} state; "
        "activations not included):",
        "  rank      weights        grads  optim state        total",
    ]
    for r in range(ranks):
        total = 2 * weights[r] + state[r]
        lines.append(
            f"  {r:4d} {_fmt(weights[r])} {_fmt(weights[r])} {_fmt(state[r])} {_fmt(total)}"
        )
    return lines


def _offload_memory(cfg: Config, weights: float, numel: int, state_b: float) -> list[str]:
    """Device: weights and gradients. Host: float32 master weights, gradient buffers, state."""
    host_state = numel * state_b
    return [
        f"memory (estimate; placement offload: the optimizer runs on the host; {state_b:g} B/param "
        f"of {cfg.optim.name} state; activations not included):",
        f"  device  weights {_fmt(weights)}  grads {_fmt(weights)}  total {_fmt(2 * weights)}",
        f"  host    master  {_fmt(4 * numel)}  grads {_fmt(4 * numel)}  optim state "
        f"{_fmt(host_state)}  total {_fmt(8 * numel + host_state)}"
        f"{'  (pinned)' if cfg.run.device != 'cpu' else ''}",
    ]


def _owner_lines(cfg: Config, matrices: list[tuple[str, torch.Tensor]], owners: list[int]):
    ranks = cfg.run.nproc
    if not matrices:
        return ["Newton-Schulz owners: none (no group uses ortho_mode matrix or block)"]
    lines = [f"Newton-Schulz owner ranks ({len(matrices)} matrices, LPT over m*n*min(m,n)):"]
    for r in range(ranks):
        mine = [(n, p) for (n, p), o in zip(matrices, owners) if o == r]
        cost = sum(math.prod(p.shape) * min(p.shape) for _, p in mine)
        example = ", ".join(n for n, _ in mine[:2]) + (" ..." if len(mine) > 2 else "")
        lines.append(
            f"  rank {r}: {len(mine):4d} matrices, {cost / 1e12:8.3f} TFLOP-units e.g. {example}"
        )
    return lines


def dry_run(cfg: Config) -> str:
    """The plan of ``cfg`` as text; nothing is allocated and no process group is started."""
    from shardflow.train.loop import build_model

    check_values(cfg)
    check_optimizer_name(cfg.optim.name)
    model = build_model(cfg, "meta")
    groups = route_params(model.named_parameters(), cfg.optim.groups)
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"DRY RUN {cfg.run.name}: {n_params / 1e9:.3f}B params "
        f"({cfg.model.kind} model, {cfg.model.dtype}), placement={cfg.placement.kind}, "
        f"{cfg.run.nproc} rank(s), device={cfg.run.device}, optimizer={cfg.optim.name}",
        f"tokens/step: {cfg.train.micro_batch} x {cfg.data.seq_len} x {cfg.train.grad_accum} "
        f"accum x {cfg.run.nproc} ranks = "
        f"{cfg.train.micro_batch * cfg.data.seq_len * cfg.train.grad_accum * cfg.run.nproc:,}",
    ]
    missing = [p for p in cfg.data.paths if not Path(p).expanduser().exists()]
    data = ", ".join(cfg.data.paths) or "embedded corpus (Python standard library)"
    lines.append(f"data: {data}" + (f"  [not found here: {missing}]" if missing else ""))
    lines.append("param groups (first matching pattern wins):")
    matrices = []
    for g in groups:
        mode = _ortho_mode(cfg, g)
        numel = sum(p.numel() for p in g.params)
        route = f"ortho_mode={mode} (2-D tensors)" if mode else "element-wise"
        lines.append(
            f"  [{g.index}] /{g.pattern}/ {g.options or ''}: {len(g.names)} tensors, "
            f"{numel / 1e6:.1f}M params -> {cfg.optim.name}, {route}"
        )
        lines.append(f"      e.g. {', '.join(g.names[:3])}{' ...' if len(g.names) > 3 else ''}")
        if mode in NS_MODES:
            matrices += [(n, p) for n, p in zip(g.names, g.params) if p.dim() == 2]
    owners = owner_plan([tuple(p.shape) for _, p in matrices], cfg.run.nproc)
    lines += _owner_lines(cfg, matrices, owners)
    lines += _memory(cfg, groups)
    return "\n".join(lines)
