"""A run's checkpoints and its exported model, on :mod:`shardflow.checkpoint`.

- :func:`save_step` writes ``<dir>/step_00000040/`` (one safetensors file per rank and
  ``index.json``; atomic; older ones beyond the newest ``keep`` deleted);
- :func:`resume` loads the newest complete checkpoint, if any, into the model and optimizer —
  at any world size and placement: a checkpoint saved by 2 FSDP2 ranks resumes in one process;
- :func:`export_model` writes the final weights as one plain ``model.safetensors`` (Hugging Face
  names for Hugging Face models, with their config and tokenizer, so ``from_pretrained`` reads
  the folder).

With placement "offload" the checkpoint holds the host-side master weights and optimizer (see
:mod:`shardflow.train.offload`), so it is the same as a one-process run's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import shardflow.checkpoint as checkpoint
from shardflow.checkpoint import checkpoints, latest, step_path
from shardflow.train.offload import OffloadOptimizer

__all__ = ["checkpoints", "export_model", "latest", "resume", "save_step", "step_path"]


def _targets(model: nn.Module, optimizer: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """What a checkpoint holds: the model and optimizer, or an offloaded run's host side."""
    if isinstance(optimizer, OffloadOptimizer):
        return optimizer.master, optimizer.optimizer
    return model, optimizer


def save_step(
    directory: Path, step: int, *, model: nn.Module, optimizer: Any, extra: dict, keep: int
) -> Path:
    """Checkpoint ``step`` into ``directory`` (every rank calls it); keep the newest ``keep``."""
    held_model, held_optimizer = _targets(model, optimizer)
    return checkpoint.save(
        step_path(directory, step),
        model=held_model,
        optimizer=held_optimizer,
        extra=extra,
        keep=keep,
    )


def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create a ``torch.optim`` optimizer's lazily made state, leaving the weights unchanged.

    A checkpoint loads into existing state tensors, but ``torch.optim`` optimizers make theirs
    on the first step. One step with zero gradients and every lr at 0 makes them (the approach
    of ``torch.distributed.checkpoint``'s ``_init_optim_state``): the update is ``-0 * m / (√v
    + eps)`` and decay multiplies by ``1 - 0 * wd``, so no weight changes. The state it makes is
    then overwritten by the load. ShardFlow optimizers make their state eagerly: nothing to do.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if all(p in optimizer.state and optimizer.state[p] for p in params):
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    grads = [p.grad for p in params]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad


def resume(directory: Path, *, model: nn.Module, optimizer: Any) -> dict[str, Any] | None:
    """Load the newest complete checkpoint in ``directory``; its ``extra``, or None if none.

    The param groups' hyperparameters come back from the checkpoint (as with
    ``Optimizer.load_state_dict``); the loop's schedule then recomputes the lr from the step it
    resumes at (:func:`shardflow.train.loop.lr_schedule`), so no scheduler state is saved.
    """
    found = latest(directory)
    if found is None:
        return None
    held_model, held_optimizer = _targets(model, optimizer)
    materialize_state(held_optimizer)
    extra = checkpoint.load(found, model=held_model, optimizer=held_optimizer)
    if isinstance(optimizer, OffloadOptimizer):
        optimizer.push_weights()
    return extra


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def export_model(model: nn.Module, model_cfg: Any, target: Path, hf_path: str = "") -> Path:
    """Write the final weights to ``target/model.safetensors`` (every rank calls it).

    Built-in decoder: its ``state_dict`` names and ``config.json`` (the [model] table).
    Hugging Face model: the inner model's own names, its ``config.json`` and tokenizer, so
    ``AutoModelForCausalLM.from_pretrained(target)`` loads it. Sharded weights are gathered one
    tensor at a time (:func:`shardflow.checkpoint.save_model_weights`).
    """
    target = Path(target)
    weights = model.inner if hf_path else model
    path = checkpoint.save_model_weights(target / "model.safetensors", weights)
    if _is_main():
        if hf_path:
            from shardflow.train.hf import save_hf_files

            save_hf_files(model.inner, target, hf_path)
        else:
            config = json.dumps(dataclasses.asdict(model_cfg), indent=2)
            (target / "config.json").write_text(config)
    return path
