"""Where the model lives: one process, DDP replicas, FSDP2 shards, HSDP (FSDP2 shards within a
group of ``shard_size`` ranks, replicated across groups), or one device with the optimizer on
the host (offload, :mod:`shardflow.train.offload`)."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardflow.train.config import Config, ConfigError


@dataclass(slots=True)
class ProcessInfo:
    """This process's place in the launch (from torchrun's environment)."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_info() -> ProcessInfo:
    """Rank, world size and local rank from the environment (1 process without torchrun)."""
    env = os.environ
    return ProcessInfo(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def resolve_device(cfg: Config, proc: ProcessInfo) -> torch.device:
    """The device of this rank: cuda:<local rank> or cpu."""
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device='cuda' but no CUDA device is visible; use 'cpu'.")
        return torch.device("cuda", proc.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def check_placement(cfg: Config, proc: ProcessInfo) -> None:
    """Raise :class:`ConfigError` when the launch does not fit the config's placement."""
    if proc.world != cfg.run.nproc:
        raise ConfigError(
            f"run.nproc={cfg.run.nproc} but {proc.world} process(es) were launched; "
            f"launch with torchrun --nproc-per-node {cfg.run.nproc} "
            f"or set --run.nproc {proc.world}."
        )
    kind = cfg.placement.kind
    if kind == "none" and proc.world > 1:
        raise ConfigError(
            f"placement.kind='none' runs one process, but run.nproc={proc.world}; "
            "use placement.kind='ddp' or 'fsdp' for several processes."
        )
    if kind == "hsdp":
        hsdp_shape(cfg, proc.world)
    if kind == "offload" and proc.world != 1:
        raise ConfigError(
            f"placement.kind='offload' runs one process (one GPU), but run.nproc={proc.world}; "
            "use placement.kind='fsdp' to spread a model over several."
        )


def hsdp_shape(cfg: Config, world: int) -> tuple[int, int]:
    """``(replicas, shard_size)`` of the HSDP mesh over ``world`` ranks: ``placement.shard_size``,
    or 0 = ranks per node (torchrun's LOCAL_WORLD_SIZE; ``world`` without torchrun)."""
    shard = cfg.placement.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if shard < 1 or world % shard:
        raise ConfigError(
            f"placement.shard_size={shard} does not divide the {world} ranks: HSDP needs "
            "replicas x shard_size = run.nproc; set placement.shard_size to the ranks per node "
            "(e.g. --placement.shard_size 8) or a divisor of run.nproc."
        )
    return world // shard, shard


def check_backend(cfg: Config, device: torch.device) -> None:
    """Raise :class:`ConfigError` when the collective backend cannot run on ``device``."""
    if cfg.placement.kind in ("none", "offload"):
        return
    backend = cfg.placement.backend
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"placement.backend='nccl' needs CUDA devices, but this run is on {device.type}; "
            "use placement.backend='gloo' (or 'auto') on a CPU."
        )
    available = {"nccl": dist.is_nccl_available, "gloo": dist.is_gloo_available}
    if backend in available and not available[backend]():
        raise ConfigError(
            f"placement.backend={backend!r} is not available in this torch build; "
            "use placement.backend='auto'."
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(cfg: Config, device: torch.device, proc: ProcessInfo) -> bool:
    """Start the process group for ddp/fsdp placements; return whether one is running."""
    if cfg.placement.kind in ("none", "offload") or dist.is_initialized():
        return dist.is_initialized()
    backend = cfg.placement.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend)
    else:  # one process started without torchrun
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    return True


def process_group_for(cfg: Config, device: torch.device) -> Any:
    """What ShardFlow optimizers get as ``process_group``: a 1-D mesh (fsdp), the 2-D
    ("replicate", "shard") mesh (hsdp), the world (ddp)."""
    if cfg.placement.kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device.type, (dist.get_world_size(),))
    if cfg.placement.kind == "hsdp":
        from torch.distributed.device_mesh import init_device_mesh

        shape = hsdp_shape(cfg, dist.get_world_size())
        return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
    if cfg.placement.kind == "ddp":
        return dist.group.WORLD
    return None


def place_model(model: nn.Module, cfg: Config, device: torch.device, mesh: Any) -> nn.Module:
    """Move or wrap ``model`` for the placement; fsdp shards each block, then the root."""
    kind = cfg.placement.kind
    if not any(p.is_meta for p in model.parameters()):
        model = model.to(device)
    if kind == "ddp" and cfg.train.gradient_release:
        # no DDP wrapper: it would average gradients after the release hooks ran; the
        # optimizer's owner plan reduces each bucket. Start from rank 0's weights, as DDP does.
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if kind in ("fsdp", "hsdp"):  # hsdp: mesh is 2-D, fully_shard replicates over dim 0
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def inner_model(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (itself otherwise): parameter names without 'module.'."""
    return model.module if is_ddp(model) else model


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip gradient reduction on micro-batches that are not the last of an accumulation."""
    if is_ddp(model) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
