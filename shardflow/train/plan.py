"""Dry run: the plan of a run without allocating it (model on the meta device).

Prints the param groups and their optimizer routing, the owner plan the optimizer will use
(built by :mod:`shardflow.distributed.plan` from each parameter's Newton-Schulz tile, as the
optimizer decides it: the same function, the same inputs, so the same owners), and an estimate
of memory per rank (weights, gradients, optimizer state; activations are not included), and
the bytes each rank sends per step by collective and by link (intra- vs inter-node,
:mod:`shardflow.distributed.traffic`). HSDP: both mesh dimensions, the owner plan of one shard
group (every group has the same) and memory per rank of one group.

The optimizer is built for real, in one process, over the meta model's param groups: state is
made on the meta device (no memory), so its bytes per parameter are measured, not assumed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from shardflow.distributed import traffic
from shardflow.distributed.placement import plan_inputs
from shardflow.distributed.plan import OwnerPlan, replicated_plan, sharded_plan
from shardflow.optim.release import module_buckets
from shardflow.train.config import Config, check_values
from shardflow.train.groups import RoutedGroup, own_names, route_params
from shardflow.train.optimizers import (
    ORTHOGONALIZING,
    accepts_process_group,
    build_run_optimizer,
    check_optimizer_name,
    default_option,
    state_bytes_per_param,
)
from shardflow.train.placement import hsdp_shape

GIB = 1024**3


def _ortho_mode(cfg: Config, group: RoutedGroup) -> str | None:
    """The group's ortho_mode (its own, else the optimizer's default); None: element-wise."""
    if cfg.optim.name.lower() not in ORTHOGONALIZING:
        return None
    if "ortho_mode" in group.options:
        return group.options["ortho_mode"]
    return cfg.optim.hyper.get("ortho_mode", default_option(cfg.optim.name, "ortho_mode"))


def plan_optimizer(cfg: Config, groups: list[RoutedGroup]) -> torch.optim.Optimizer:
    """The run's optimizer over ``groups`` (meta parameters), built as the run builds it but in
    one process. Placement offload: over float32 copies, as the run's host-side master."""
    if cfg.placement.kind == "offload":
        groups = [
            RoutedGroup(g.index, g.pattern, g.options, g.names, [p.float() for p in g.params])
            for g in groups
        ]
    return build_run_optimizer(cfg.optim, groups)


def owner_plan(cfg: Config, optimizer: Any) -> tuple[OwnerPlan, str] | None:
    """The owner plan the run's optimizer builds over ``cfg.run.nproc`` ranks, and what its units
    are (``"params"``: DDP-aware, ``"NS units"``: FSDP2-aware); None when the run has none (one
    process, or an optimizer that does not shard). The same inputs as the optimizer's placement
    (:func:`~shardflow.distributed.placement.plan_inputs` with the optimizer's ``_ns_tile``), the
    same functions, hence the same owners."""
    kind = cfg.placement.kind
    if kind not in ("ddp", "fsdp", "hsdp") or not accepts_process_group(cfg.optim.name):
        return None
    params, _, tiles = plan_inputs(optimizer.param_groups, getattr(optimizer, "_ns_tile", None))
    shapes = [p.shape for p in params]
    if kind == "ddp":
        return replicated_plan(shapes, tiles, cfg.run.nproc), "params"
    return sharded_plan(shapes, tiles, _shard_ranks(cfg)), "NS units"


def _shard_ranks(cfg: Config) -> int:
    """Ranks a parameter is sharded over: run.nproc (fsdp), the shard group's size (hsdp)."""
    return hsdp_shape(cfg, cfg.run.nproc)[1] if cfg.placement.kind == "hsdp" else cfg.run.nproc


def _shard_bytes(param: torch.Tensor, ranks: int) -> int:
    """Bytes of the largest dim-0 shard of ``param`` over ``ranks``."""
    rows = math.ceil(param.shape[0] / ranks) if param.dim() else 1
    return rows * math.prod(param.shape[1:]) * param.element_size()


def _fmt(nbytes: float) -> str:
    return f"{nbytes / GIB:8.2f} GiB"


def _memory(
    cfg: Config, groups: list[RoutedGroup], state_b: float, plan: tuple[OwnerPlan, str] | None
) -> list[str]:
    kind = cfg.placement.kind
    ranks = _shard_ranks(cfg) if kind == "hsdp" else cfg.run.nproc
    params = [p for g in groups for p in g.params]
    if kind == "offload":
        return _offload_memory(cfg, params, state_b)
    # ddp with a sharding optimizer: a parameter's state lives on its owner only
    owners = plan[0].owners if plan is not None and kind == "ddp" else None
    weights = [0.0] * ranks
    state = [0.0] * ranks
    for i, p in enumerate(params):
        for r in range(ranks):
            if kind in ("fsdp", "hsdp"):
                weights[r] += _shard_bytes(p, ranks)
                state[r] += _shard_bytes(p, ranks) / p.element_size() * state_b
            else:
                weights[r] += p.numel() * p.element_size()
                if owners is None or owners[i] == r:
                    state[r] += p.numel() * state_b
    lines = [
        f"memory per rank (estimate; {state_b:g} B/param of {cfg.optim.name} state; "
        "activations not included"
        + ("; one shard group: every replica holds the same" if kind == "hsdp" else "")
        + "):",
        "  rank      weights        grads  optim state        total",
    ]
    for r in range(ranks):
        total = 2 * weights[r] + state[r]
        lines.append(
            f"  {r:4d} {_fmt(weights[r])} {_fmt(weights[r])} {_fmt(state[r])} {_fmt(total)}"
        )
    return lines


def _offload_memory(cfg: Config, params: list[torch.Tensor], state_b: float) -> list[str]:
    """Device: weights and gradients. Host: float32 master weights, gradient buffers, state."""
    numel = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    host_state = numel * state_b
    return [
        f"memory (estimate; placement offload: the optimizer runs on the host; {state_b:g} B/param "
        f"of {cfg.optim.name} state; activations not included):",
        f"  device  weights {_fmt(weights)}  grads {_fmt(weights)}  total {_fmt(2 * weights)}",
        f"  host    master  {_fmt(4 * numel)}  grads {_fmt(4 * numel)}  optim state "
        f"{_fmt(host_state)}  total {_fmt(8 * numel + host_state)}"
        f"{'  (pinned)' if cfg.run.device != 'cpu' else ''}",
    ]


def _owner_lines(cfg: Config, plan: tuple[OwnerPlan, str] | None, names: dict[int, str]):
    if plan is None:
        why = (
            f"{cfg.optim.name} keeps every parameter's state on every rank"
            if cfg.placement.kind in ("ddp", "fsdp", "hsdp")
            else f"placement {cfg.placement.kind} runs one process"
        )
        return [f"owner plan: none ({why})"]
    built, unit = plan
    if not built.units:
        return [
            "owner plan: none (no parameter is orthogonalized as a whole matrix or in tiles: "
            "every rank updates its own rows)"
        ]
    what = (
        "DDP-aware: each parameter's state and update on one rank"
        if unit == "params"
        else "FSDP2-aware: each Newton-Schulz matrix or tile orthogonalized on one rank"
    )
    where = f"over {cfg.run.nproc} ranks"
    if cfg.placement.kind == "hsdp":
        replicas, shard = hsdp_shape(cfg, cfg.run.nproc)
        where = (
            f"over the {shard} ranks of each shard group (the same plan in all {replicas} "
            "groups: shard ranks below)"
        )
    return [
        f"owner plan {where} ({what}; LPT over m*n*min(m,n), shardflow.distributed.plan):",
        *("  " + line for line in built.describe(unit, names).splitlines()),
    ]


def _instruct_lines(cfg: Config) -> list[str]:
    """Examples, tokens and the share carrying loss (instruction data; a Hugging Face model's
    tokenizer is needed, so without its folder here they are left out)."""
    from shardflow.train.instruct import plan_lines

    if cfg.model.kind == "hf":
        if not (Path(cfg.model.path).expanduser() / "config.json").is_file():
            return [f"instruction data: not read (no tokenizer at model.path={cfg.model.path!r})"]
        from shardflow.train.hf import HFTokenizer

        return plan_lines(cfg.data, HFTokenizer(cfg.model.path))
    from shardflow.train.data import ByteTokenizer

    return plan_lines(cfg.data, ByteTokenizer())


def dry_run(cfg: Config) -> str:
    """The plan of ``cfg`` as text; nothing is allocated and no process group is started."""
    from shardflow.train.loop import build_model

    check_values(cfg)
    check_optimizer_name(cfg.optim.name)
    model = build_model(cfg, "meta")
    groups = route_params(own_names(model), cfg.optim.groups)
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
    if cfg.data.format == "instruct" and not missing:
        lines += _instruct_lines(cfg)
    lines.append("param groups (first matching pattern wins):")
    for g in groups:
        mode = _ortho_mode(cfg, g)
        numel = sum(p.numel() for p in g.params)
        route = f"ortho_mode={mode} (2-D tensors)" if mode else "element-wise"
        lines.append(
            f"  [{g.index}] /{g.pattern}/ {g.options or ''}: {len(g.names)} tensors, "
            f"{numel / 1e6:.1f}M params -> {cfg.optim.name}, {route}"
        )
        lines.append(f"      e.g. {', '.join(g.names[:3])}{' ...' if len(g.names) > 3 else ''}")
    optimizer = plan_optimizer(cfg, groups)
    plan = owner_plan(cfg, optimizer)
    names = dict(enumerate(n for g in groups for n in g.names))
    lines += _mesh_lines(cfg)
    lines += _owner_lines(cfg, plan, names)
    lines += _memory(cfg, groups, state_bytes_per_param(cfg.optim.name, optimizer), plan)
    lines += _traffic_lines(cfg, model, optimizer, plan)
    if cfg.train.gradient_release:
        lines.append(_release_line(model))
    return "\n".join(lines)


def _release_line(model: torch.nn.Module) -> str:
    """Gradient memory under ``train.gradient_release``: the largest bucket (one decoder block,
    :func:`~shardflow.optim.release.module_buckets`) instead of every gradient."""
    buckets = module_buckets(model)
    sizes = [sum(p.numel() * p.element_size() for p in b) for b in buckets]
    total = sum(sizes)
    peak = max(sizes, default=0)
    return (
        f"gradient release: {len(buckets)} buckets (one per block, other tensors alone); "
        f"gradients alive at most {peak / 2**20:.1f} MiB instead of {total / 2**20:.1f} MiB "
        f"(saves {(total - peak) / 2**20:.1f} MiB, {1 - peak / max(total, 1):.0%}); the grads "
        "column above is the ordinary step's"
    )


def _mesh_lines(cfg: Config) -> list[str]:
    """HSDP: the 2-D mesh, its shard groups (intra-node) and replica groups (across nodes)."""
    if cfg.placement.kind != "hsdp":
        return []
    replicas, shard = hsdp_shape(cfg, cfg.run.nproc)
    first = ", ".join(f"[{r * shard}..{r * shard + shard - 1}]" for r in range(min(replicas, 3)))
    return [
        f"mesh (HSDP): replicate={replicas} x shard={shard} (dims 'replicate', 'shard'); "
        f"shard groups {first}{' ...' if replicas > 3 else ''} (parameters sharded, owner plan "
        f"and Newton-Schulz inside each); replica groups [0, {shard}, ...] (gradient all-reduce "
        "only)",
        f"replica check: every {cfg.placement.replica_check_every} steps"
        if cfg.placement.replica_check_every
        else "replica check: off",
    ]


def _node_size(cfg: Config) -> int:
    """Ranks per node: the HSDP shard group, else LOCAL_WORLD_SIZE when set, else run.nproc."""
    if cfg.placement.kind == "hsdp":
        return hsdp_shape(cfg, cfg.run.nproc)[1]
    return int(os.environ.get("LOCAL_WORLD_SIZE", cfg.run.nproc))


def _traffic_lines(cfg: Config, model, optimizer, plan) -> list[str]:
    """Bytes per rank per step by collective and link (the busiest rank of the owner plan)."""
    kind = cfg.placement.kind
    if kind not in ("ddp", "fsdp", "hsdp") or cfg.run.nproc == 1:
        return []
    blocks = {id(p) for b in model.blocks() for p in b.parameters()}
    params, _, tiles = plan_inputs(optimizer.param_groups, getattr(optimizer, "_ns_tile", None))
    if not accepts_process_group(cfg.optim.name):
        tiles = [None] * len(params)  # an optimizer without a placement: no owner plan traffic
    model_params = [
        traffic.Param(tuple(p.shape), p.element_size(), t, id(p) not in blocks)
        for p, t in zip(params, tiles)
    ]
    node = _node_size(cfg)
    if kind == "ddp":
        owners = plan[0].owners if plan is not None else list(range(len(params)))
        per_rank = [
            traffic.replicated_step(
                model_params,
                owners,
                world=cfg.run.nproc,
                node_size=node,
                rank=r,
                grads_reduced=True,
            )
            for r in range(cfg.run.nproc)
        ]
    else:
        replicas, shard = hsdp_shape(cfg, cfg.run.nproc) if kind == "hsdp" else (1, cfg.run.nproc)
        ns = traffic.ns_all_to_all(model_params, shard, 2, plan[0] if plan else None)
        per_rank = [
            traffic.sharded_step(
                model_params,
                shard=shard,
                replicas=replicas,
                node_size=node,
                rank=r,
                micro_batches=cfg.train.grad_accum,
                ns=ns,
            )
            for r in range(shard)
        ]
    busiest = max(range(len(per_rank)), key=lambda r: sum(t.sent for t in per_rank[r]))
    rows = per_rank[busiest]
    lines = [
        f"traffic per rank per step (model: shardflow.distributed.traffic; {node} ranks per "
        f"node; busiest rank {busiest}; {cfg.train.grad_accum} micro-batches):",
        f"  {'collective':<26} {'link':<11} {'sent':>12} {'received':>12}",
    ]
    for t in rows:
        lines.append(f"  {t.collective:<26} {t.link:<11} {_fmt(t.sent)} {_fmt(t.received)}")
    links = traffic.by_link(rows)
    lines.append(
        "  total sent: "
        + ", ".join(f"{link} {_fmt(b).strip()}" for link, b in sorted(links.items()))
    )
    return lines
