"""Run a function on W gloo ranks in real CPU processes, for distributed tests.

``run_on_ranks(fn, world_size, *args)`` forks W processes (the fork start method costs ~0.2 s
here, spawn ~7 s; set ``SHARDFLOW_TEST_START=spawn`` to use spawn), picks a free port at run time,
initializes gloo in each, calls ``fn(rank, world_size, *args)`` and returns the list of the
ranks' return values (which must pickle). Any rank's exception fails the caller with that rank's
traceback; a rank that does not finish within ``timeout`` seconds fails it too, and every process
is killed (no hang).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch._inductor.config as inductor_config
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A forked rank must not use the parent's torch.compile worker pool (its threads do not
    # survive the fork, so a compile would wait on them forever): compile in this process.
    inductor_config.compile_threads = 1
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        # Pickled here, as bytes: tensors put on a fork queue directly travel through shared
        # memory that dies with this process.
        result = pickle.dumps(fn(rank, world_size, *args))
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(AssertionError):
    """A rank raised or timed out; the message carries its traceback."""


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results."""
    ctx = mp.get_context(os.environ.get("SHARDFLOW_TEST_START", "fork"))
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    ok = False
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_module.Empty as exc:
                missing = sorted(set(range(world_size)) - set(results))
                raise RankFailed(f"ranks {missing} did not finish within {timeout} s") from exc
            if status == "error":
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
        ok = True
    finally:
        for p in procs:
            p.join(timeout=5 if ok else 0.1)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def place(model, placement: str, world: int):
    """The process group an optimizer gets for ``model`` (a ``Sequential`` whose items 0 and 2
    are the layers) under ``placement``: ``"fsdp"`` applies ``fully_shard`` to both layers and the
    root over a 1-D CPU mesh of ``world`` ranks and returns the mesh; anything else leaves the
    model whole and returns the world group (the DDP owner plan)."""
    import torch.distributed as dist  # noqa: PLC0415

    if placement != "fsdp":
        return dist.group.WORLD
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return mesh
