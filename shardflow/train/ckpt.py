"""A run's checkpoints and its exported model, on :mod:`shardflow.checkpoint`.

- :func:`save_step` writes ``<dir>/step_00000040/`` (one safetensors file per rank and
  ``index.json``; atomic; older ones beyond the newest ``keep`` deleted);
- :func:`resume` loads the newest complete checkpoint, if any, into the model and optimizer —
  at any world size and placement: a checkpoint saved by 2 FSDP2 ranks resumes in one process.
  The checkpoint supplies state, the config supplies hyperparameters (every param-group key but
  :data:`STATE_KEYS`), and each hyperparameter that differs from the checkpoint's is logged;
- :func:`check_run_dir` (before any process group) checks the run folder: writable, a readable
  metrics file, and a checkpoint folder that belongs to this run — each run folder has a run id
  (``run.json``) that every checkpoint carries in its ``extra``;
- :func:`export_model` writes the final weights as one plain ``model.safetensors`` (Hugging Face
  names for Hugging Face models, with their config and tokenizer, so ``from_pretrained`` reads
  the folder).

With placement "offload" the checkpoint holds the host-side master weights and optimizer (see
:mod:`shardflow.train.offload`), so it is the same as a one-process run's.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import shardflow.checkpoint as checkpoint
from shardflow.checkpoint import CheckpointError, checkpoints, latest, step_path
from shardflow.train.config import Config, ConfigError
from shardflow.train.metrics import MetricsError, read_metrics
from shardflow.train.offload import OffloadOptimizer

__all__ = [
    "STATE_KEYS",
    "ResumePoint",
    "check_run_dir",
    "checkpoints",
    "export_model",
    "latest",
    "resume",
    "save_step",
    "step_path",
]

RUN_FILE = "run.json"
"""The run folder's identity, ``{"run_id": ..., "signature": ...}``, written by rank 0."""

RUN_OUTPUTS = (
    "checkpoints",
    "final",
    "metrics.jsonl",
    "summary.json",
    "config.json",
    RUN_FILE,
    "loss.png",
)
"""What a run writes in its folder; ``run.overwrite`` deletes these (and nothing else)."""

SIGNATURE_FIELDS = (
    "kind", "path", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
    "rope_theta", "norm_eps", "tie_embeddings", "dtype",
)  # fmt: skip
"""The [model] fields that make a checkpoint another model's when they change."""

STATE_KEYS = frozenset({"initial_lr", "lr_scale"})
"""Param-group keys that are training state (the lr schedules'), restored from a checkpoint;
every other key is a hyperparameter, and the config's value wins on resume."""


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


def _plain(value: Any) -> Any:
    """A group value as JSON holds it (tuples as lists), for comparing with a checkpoint's."""
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def reapply_hyperparameters(
    optimizer: torch.optim.Optimizer, configured: list[dict[str, Any]]
) -> list[str]:
    """Set every param-group key but :data:`STATE_KEYS` back to ``configured`` (the groups as
    built from the config, before a checkpoint was loaded into them); return one line per key
    whose checkpoint value differed. The checkpoint's lr is the schedule's value at its step,
    so lr is compared with the checkpoint's ``initial_lr`` (the lr it was configured with)."""
    changes = []
    for g, (group, mine) in enumerate(zip(optimizer.param_groups, configured)):
        for key, value in mine.items():
            if key in STATE_KEYS:
                continue
            saved = group.get("initial_lr", group.get(key)) if key == "lr" else group.get(key)
            if key not in group or not _same(saved, value):
                changes.append(f"param group {g} {key}: checkpoint {saved!r} -> config {value!r}")
            group[key] = value
    return changes


def resume(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: Any,
    run_id: str | None = None,
    warn: bool = True,
) -> dict[str, Any] | None:
    """Load the newest complete checkpoint in ``directory``; its ``extra``, or None if none.

    The checkpoint supplies the weights and the optimizer state; the config supplies the
    hyperparameters: after loading, every param-group key but :data:`STATE_KEYS` is set back to
    the value the optimizer was built with, and (with ``warn``) each one the checkpoint held
    differently is a warning. The loop's schedule recomputes the lr from the step it resumes at
    (:func:`shardflow.train.loop.lr_schedule`), so no scheduler state is saved. With
    ``run_id``, a checkpoint written by another run (its ``extra["run_id"]``) is refused.
    """
    found = latest(directory)
    if found is None:
        return None
    held_model, held_optimizer = _targets(model, optimizer)
    if run_id is not None:
        _check_run_id(found, run_id)
    configured = [
        {k: v for k, v in g.items() if k != "params"} for g in held_optimizer.param_groups
    ]
    materialize_state(held_optimizer)
    try:
        extra = checkpoint.load(found, model=held_model, optimizer=held_optimizer)
    except CheckpointError as exc:  # the same on every rank, nothing loaded: bad input
        raise ConfigError(f"checkpoint {str(found)!r} cannot be loaded: {exc}") from exc
    changes = reapply_hyperparameters(held_optimizer, configured)
    if warn and changes:
        warnings.warn(
            f"resuming from {found.name}: the config's hyperparameters win over the "
            f"checkpoint's: {'; '.join(changes)}",
            UserWarning,
            stacklevel=2,
        )
    if isinstance(optimizer, OffloadOptimizer):
        optimizer.push_weights()
    return extra


# ------------------------------------------------------------------------------ run folder


@dataclass(slots=True)
class ResumePoint:
    """What :func:`check_run_dir` found: the newest checkpoint's step (None: start afresh) and
    the run id the run continues (None: a new one is made)."""

    step: int | None
    run_id: str | None
    checkpoint: str | None = None
    """The checkpoint folder resumed from."""


def run_signature(cfg: Config) -> dict[str, Any]:
    """What makes a checkpoint this run's besides its id: the model (its shape-defining [model]
    fields; a Hugging Face model's folder and dtype) and the optimizer's name. Hyperparameters
    (lr, decay, ...), steps, data and placement may change on resume; these may not."""
    fields = ("kind", "path", "dtype") if cfg.model.kind == "hf" else SIGNATURE_FIELDS
    model = {name: getattr(cfg.model, name) for name in fields}
    return {"model": model, "optimizer": cfg.optim.name.lower()}


def describe_signature(signature: dict[str, Any]) -> str:
    """``dolphinflow on builtin dim=256 n_layers=7 ...`` for messages."""
    model = signature.get("model", {})
    shape = ", ".join(f"{k}={v}" for k, v in model.items() if k not in ("kind", "path"))
    where = f" {model['path']}" if model.get("path") else ""
    return f"{signature.get('optimizer')} on the {model.get('kind')} model{where} ({shape})"


def signature_changes(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """``optim.name: 'dolphinflow' -> 'factored_adam'``, one line per field that differs."""
    changes = []
    if saved.get("optimizer") != mine["optimizer"]:
        changes.append(f"optim.name: {saved.get('optimizer')!r} -> {mine['optimizer']!r}")
    for key, value in mine["model"].items():
        old = saved.get("model", {}).get(key)
        if old != value:
            changes.append(f"model.{key}: {old!r} -> {value!r}")
    return changes


def read_run_file(out: Path) -> dict[str, Any]:
    """``out/run.json`` ({} when there is none or it cannot be read)."""
    try:
        found = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def read_run_id(out: Path) -> str | None:
    """The run id in ``out/run.json`` (None when there is none)."""
    return read_run_file(out).get("run_id")


def write_run_id(out: Path, run_id: str, signature: dict[str, Any] | None = None) -> None:
    """Record ``run_id`` (and the run's :func:`run_signature`) as the folder's identity (rank 0)."""
    record = {"run_id": run_id, **({"signature": signature} if signature else {})}
    (out / RUN_FILE).write_text(json.dumps(record) + "\n")


def clear_run_dir(out: Path) -> list[str]:
    """Delete what a run wrote in ``out`` (:data:`RUN_OUTPUTS`; rank 0, for ``run.overwrite``);
    returns the names deleted."""
    deleted = []
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        deleted.append(name)
    return deleted


def stamped_dir(out: Path, now: datetime.datetime | None = None) -> Path:
    """``out`` with a UTC time suffix, ``runs/q-20261207-231502``, not yet existing (a ``-2``,
    ``-3``, ... is added when two launches share the second)."""
    now = now or datetime.datetime.now(datetime.UTC)
    base = out.with_name(f"{out.name}-{now:%Y%m%d-%H%M%S}")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def resolve_out_dir(cfg: Config) -> None:
    """With ``run.timestamped``: rank 0 picks :func:`stamped_dir` and every rank takes it (one
    broadcast; call after the process group started); ``run.out_dir`` then names it and
    ``run.timestamped`` is cleared, so config.json records the folder the run used."""
    if not cfg.run.timestamped:
        return
    box = [str(stamped_dir(cfg.output_dir()))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    cfg.run.out_dir, cfg.run.timestamped = box[0], False


def _saved_extra(found: Path) -> dict[str, Any]:
    try:
        extra = checkpoint.read_index(found).get("extra") or {}
    except CheckpointError as exc:
        raise ConfigError(f"checkpoint {str(found)!r} cannot be read: {exc}") from exc
    return extra if isinstance(extra, dict) else {}


def _check_run_id(found: Path, run_id: str) -> None:
    saved = _saved_extra(found).get("run_id")
    if saved is not None and saved != run_id:
        raise ConfigError(
            f"checkpoint {str(found)!r} was written by run {saved!r}, but its run folder "
            f"belongs to run {run_id!r} ({RUN_FILE}): it is another run's checkpoint. Delete "
            "it, or train in another run.out_dir."
        )


def _check_writable(out: Path) -> None:
    """``out`` can be created (or exists as a folder) and written to."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"run.out_dir={str(out)!r} cannot be created: {str(probe)!r} is a file, not a "
            "folder; choose another run.out_dir."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run.out_dir={str(out)!r} cannot be written: {str(probe)!r} is not writable by "
            "this user; choose another run.out_dir."
        )
    for name in ("metrics.jsonl", RUN_FILE, "config.json"):
        if (out / name).exists() and not (out / name).is_file():
            raise ConfigError(
                f"{str(out / name)!r} is not a file; remove it or choose another run.out_dir."
            )


CHOICES = (
    "train in a folder of its own (--run.name NEW or --run.out_dir runs/NEW; add "
    "--run.timestamped for a fresh folder on every launch), or start afresh here with "
    "--run.overwrite (deletes that run's checkpoints, metrics and final weights)"
)
"""What a run that may not use its folder can do instead (the end of each such error)."""


def check_run_dir(cfg: Config, *, warn: bool = True) -> ResumePoint:
    """Check the run folder before any process group starts; raise :class:`ConfigError`.

    The folder can be written. A checkpoint in it is resumed only when it is this run's: the
    folder's run id (``run.json``) and the same :func:`run_signature` (model and optimizer);
    the metrics file must then be readable (a last line cut short is dropped, with a warning
    when ``warn``). A folder that holds another run — another signature, checkpoints with
    ``checkpoint.resume=false``, or a run without a checkpoint to resume from — is an error
    naming the choices (:data:`CHOICES`), unless ``run.overwrite`` (the run then deletes it,
    :func:`clear_run_dir`) or ``run.timestamped`` (a fresh folder beside it).
    """
    out = cfg.output_dir()
    _check_writable(out)
    if cfg.run.overwrite or cfg.run.timestamped:
        return ResumePoint(None, None)
    ck_dir = out / "checkpoints"
    held = sorted(p.name for p in ck_dir.iterdir()) if ck_dir.is_dir() else []
    if not cfg.checkpoint.resume:
        if held:
            raise ConfigError(
                f"checkpoint.resume=false, but {str(ck_dir)!r} holds another run's checkpoints "
                f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); delete that folder, "
                "use another run.out_dir, set checkpoint.resume=true to continue that run, or "
                "--run.overwrite to replace it."
            )
        _check_no_other_run(out)
        return ResumePoint(None, None)
    found = latest(ck_dir)
    if found is None:
        _check_no_other_run(out)
        return ResumePoint(None, None)
    extra, mine = _saved_extra(found), read_run_id(out)
    if mine is not None:
        _check_run_id(found, mine)
    _check_signature(cfg, found, extra.get("signature") or read_run_file(out).get("signature"))
    try:
        read_metrics(out / "metrics.jsonl", warn=warn)
    except (MetricsError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the run's metrics cannot be read: {exc}") from exc
    step = int(extra.get("step", found.name.rpartition("_")[2]))
    return ResumePoint(step, extra.get("run_id") or mine, str(found))


def _check_signature(cfg: Config, found: Path, saved: dict[str, Any] | None) -> None:
    """The checkpoint ``found`` was saved by this model and optimizer (older checkpoints, which
    carry no signature, pass)."""
    if not saved:
        return
    changes = signature_changes(saved, run_signature(cfg))
    if changes:
        raise ConfigError(
            f"{str(cfg.output_dir())!r} holds another run ({describe_signature(saved)}; "
            f"newest checkpoint {found.name}), not this config's: {'; '.join(changes)}. It is "
            f"not resumed. Choose: {CHOICES}."
        )


def _check_no_other_run(out: Path) -> None:
    """A folder where a run wrote metrics but left no checkpoint to resume holds another run
    (a new one would silently replace its results)."""
    if read_run_id(out) is None or not (out / "metrics.jsonl").is_file():
        return
    raise ConfigError(
        f"{str(out)!r} holds the results of run {read_run_id(out)!r} and no checkpoint to "
        f"resume it from, so a new run there would replace them. Choose: {CHOICES}."
    )


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
