"""The training loop: preflight checks, model and optimizer set-up, steps, eval, checkpoints.

:func:`preflight` runs on every rank before any collective and is deterministic, so bad input
fails identically everywhere (rank 0 prints, every rank exits) instead of hanging a collective:
values, placement, backend, model folder, optimizer arguments and group keys (the optimizer is
built once over small stand-ins), the run folder and the data.

SIGTERM (what a scheduler sends before it kills a job; torchrun passes it to every worker) stops
the run after the current step: the ranks agree on the step (one all-reduce of one flag per
step), save a checkpoint there and return normally; a second SIGTERM kills at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from shardflow.distributed.replicas import check_replicas
from shardflow.ops.stablemax import stablemax_cross_entropy
from shardflow.optim.release import module_buckets, prepare_for_gradient_release
from shardflow.train import ckpt
from shardflow.train.config import Config, ConfigError, check_values
from shardflow.train.data import Batch, ByteTokenizer, Corpus, draw_batch, load_corpus
from shardflow.train.groups import RoutedGroup, own_names, route_params
from shardflow.train.instruct import IGNORE
from shardflow.train.metrics import (
    MetricsLog,
    Progress,
    plot_losses,
    read_metrics,
    source_commit,
)
from shardflow.train.model import build_decoder, check_model_config
from shardflow.train.offload import OffloadOptimizer, master_copy
from shardflow.train.optimizers import (
    build_run_optimizer,
    check_optimizer,
    check_optimizer_name,
    clips_itself,
    state_bytes_per_param,
)
from shardflow.train.placement import (
    ProcessInfo,
    check_backend,
    check_placement,
    gradient_sync,
    inner_model,
    is_ddp,
    place_model,
    process_group_for,
    resolve_device,
)

KILL_ENV = "SHARDFLOW_TEST_KILL_AT_STEP"
"""Test hook: rank 0 SIGKILLs itself when this step begins (simulates a crashed node)."""


@dataclass(slots=True)
class Prepared:
    """What preflight found: the device, tokenizer and corpus the run will use, and the
    checkpoint it resumes from (``resume.step`` None: it starts afresh)."""

    device: torch.device
    tokenizer: Any
    corpus: Corpus
    resume: ckpt.ResumePoint = dataclasses.field(
        default_factory=lambda: ckpt.ResumePoint(None, None)
    )


def build_model(cfg: Config, device: str = "cpu") -> nn.Module:
    """The configured model, initialised from ``run.seed`` (``device="meta"``: shapes only)."""
    if cfg.model.kind == "hf":
        from shardflow.train.hf import build_hf_model

        return build_hf_model(cfg.model, cfg.run.seed, device)
    model = build_decoder(cfg.model, device)
    if device != "meta":
        model.reset_parameters(cfg.run.seed)
    return model


def _placed_model(cfg: Config, device: torch.device, mesh: Any) -> nn.Module:
    """The model placed on ``device``; built-in FSDP models are sharded before allocation."""
    if cfg.model.kind == "builtin" and cfg.placement.kind in ("fsdp", "hsdp"):
        model = place_model(build_model(cfg, "meta"), cfg, device, mesh)
        model.to_empty(device=device)
        model.reset_parameters(cfg.run.seed)
        return model
    return place_model(build_model(cfg, "cpu"), cfg, device, mesh)


def build_model_and_optimizer(
    cfg: Config, device: torch.device, mesh: Any
) -> tuple[nn.Module, Any, list[RoutedGroup]]:
    """The placed model, its optimizer and the routed param groups.

    Placement "offload": the optimizer runs on the host over a float32 master copy made before
    the model moves to the device (:class:`~shardflow.train.offload.OffloadOptimizer`).
    """
    if cfg.placement.kind == "offload":
        cpu_model = build_model(cfg, "cpu")
        master = master_copy(cpu_model, pin=device.type == "cuda")
        model = place_model(cpu_model, cfg, device, mesh)
        groups = route_params(own_names(master), cfg.optim.groups)
        optimizer = OffloadOptimizer(model, master, build_run_optimizer(cfg.optim, groups))
        return _compiled(model, cfg), optimizer, groups
    model = _placed_model(cfg, device, mesh)
    groups = route_params(own_names(inner_model(model)), cfg.optim.groups)
    # DDP has averaged the gradients: the optimizer need not send them to their owners again
    optimizer = build_run_optimizer(cfg.optim, groups, mesh, grads_reduced=is_ddp(model))
    if cfg.train.gradient_release:
        inner = inner_model(model)
        buckets = module_buckets(inner)
        prepare_for_gradient_release(inner, optimizer, buckets=buckets, clipping="bucket")
    return _compiled(model, cfg), optimizer, groups


def _compiled(model: nn.Module, cfg: Config) -> nn.Module:
    """``model.compile`` (torch.compile of its forward, in place: names, state dicts and
    checkpoints are unchanged) when ``model.compile``; else ``model``."""
    if cfg.model.compile:
        model.compile()
    return model


def held_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that updates the weights (offload: the host-side one)."""
    return optimizer.optimizer if isinstance(optimizer, OffloadOptimizer) else optimizer


def preflight(cfg: Config, proc: ProcessInfo) -> Prepared:
    """Check everything that can be checked without collectives; raise :class:`ConfigError`."""
    check_values(cfg)
    check_placement(cfg, proc)
    check_optimizer_name(cfg.optim.name)
    device = resolve_device(cfg, proc)
    check_backend(cfg, device)
    if cfg.model.kind == "hf":
        from shardflow.train.hf import HFTokenizer, check_hf_path, check_hf_weights

        hf_config = check_hf_path(cfg.model)
        check_hf_weights(cfg.model)
        tokenizer = HFTokenizer(cfg.model.path)
        vocab = getattr(hf_config, "vocab_size", tokenizer.vocab_size)
    else:
        check_model_config(cfg.model, cfg.data.seq_len)
        tokenizer = ByteTokenizer()
        vocab = cfg.model.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}; "
            "use the model's own tokenizer or raise model.vocab_size."
        )
    groups = route_params(own_names(build_model(cfg, "meta")), cfg.optim.groups)
    check_optimizer(cfg.optim, groups)
    resume = ckpt.check_run_dir(cfg, warn=proc.is_main)
    corpus = load_corpus(cfg.data, tokenizer, warn=proc.is_main)
    return Prepared(device, tokenizer, corpus, resume)


def check_variant(cfg: Config, proc: ProcessInfo) -> ckpt.ResumePoint:
    """What :func:`preflight` checks that differs between the runs of a comparison (optimizer,
    its arguments and groups, run folder), for every run after the first."""
    check_optimizer_name(cfg.optim.name)
    groups = route_params(own_names(build_model(cfg, "meta")), cfg.optim.groups)
    check_optimizer(cfg.optim, groups)
    return ckpt.check_run_dir(cfg, warn=proc.is_main)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""
    if warmup and step <= warmup:
        return step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(
    optimizer: Any, cfg: Config, base_lrs: list[float], start: int = 0, warn: bool = True
) -> LambdaLR:
    """The run's learning rate as a ``LambdaLR``: :func:`lr_factor` of the step, times each
    group's ``base_lrs`` entry (its configured lr), ready for step ``start + 1``.

    The lr is a function of the step alone, so a resumed run recomputes it from the step it
    resumes at (the checkpoint's lr values are overwritten): the same sequence as an
    uninterrupted run. ``scheduler.step()`` after each optimizer step moves it on. With
    ``warn``, one warning when the warm-up is not shorter than the run (no decay).
    """
    total, warmup = cfg.train.steps, cfg.schedule.warmup_steps
    if warn and warmup >= total:
        warnings.warn(
            f"schedule.warmup_steps={warmup} is not shorter than the run (train.steps={total}): "
            f"the learning rate rises to {total / warmup:.0%} of optim.lr at the last step and "
            "never decays; lower schedule.warmup_steps.",
            UserWarning,
            stacklevel=2,
        )
    held = held_optimizer(optimizer)
    for group, base in zip(held.param_groups, base_lrs):
        group["initial_lr"] = base
    ratio = cfg.schedule.min_lr_ratio
    # LambdaLR's epoch counts the steps done; the lr it sets is for the next one
    return LambdaLR(
        held, lambda done: lr_factor(done + 1, total, warmup, ratio), last_epoch=start - 1
    )


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1).clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (one all-reduce of one value; local without one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@dataclass(slots=True)
class StopRequest:
    """Set by the SIGTERM handler of :func:`stop_on_sigterm`."""

    signal: str | None = None


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[StopRequest]:
    """Turn the first SIGTERM into a :class:`StopRequest` (the loop saves and stops after the
    current step); the handler then restores the default action, so a second SIGTERM kills.
    Outside the main thread (where handlers cannot be set) nothing is installed."""
    request = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        request.signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield request
        return
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)


def _shared_run_id(found: str | None) -> str:
    """The run id: the resumed run's, else a new one made by rank 0 and sent to every rank."""
    if found:
        return found
    box = [uuid.uuid4().hex[:12]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _to_float(norm: torch.Tensor) -> float:
    full = getattr(norm, "full_tensor", None)
    return float(full() if full else norm)


LOSSES = {"softmax": F.cross_entropy, "stablemax": stablemax_cross_entropy}
"""``[train] loss`` names and their functions (both ``f(logits, targets, ignore_index=...)``,
mean over the targets that carry loss)."""


def token_loss(model: nn.Module, batch: Batch, loss: str = "softmax") -> torch.Tensor:
    """Mean next-token cross-entropy in float32, softmax or StableMax (``[train] loss``), over
    the targets that carry loss (instruction data: the answers; ``IGNORE`` elsewhere). Packed
    rows pass each token's example (``docs``) to the model, so that attention stays inside it."""
    logits = model(batch.inputs) if batch.docs is None else model(batch.inputs, batch.docs)
    return LOSSES[loss](logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, corpus: Corpus, proc: ProcessInfo, device) -> float:
    """Validation loss over a fixed set of windows, averaged over ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(cfg.train.eval_batches):
        batch = draw_batch(
            corpus.val, cfg.data.seq_len, cfg.train.micro_batch, cfg.run.seed, "val", i, proc.rank
        )
        total += token_loss(model, batch.to(device), cfg.train.loss)
    model.train()
    return _mean_over_ranks(total / cfg.train.eval_batches)


def _train_step(model, optimizer, cfg: Config, corpus: Corpus, step: int, proc, device) -> tuple:
    """One optimizer step over ``grad_accum`` micro-batches; returns (loss, grad norm).

    An optimizer that clips itself (ShardFlow: ``gradient_clipping`` = ``optim.grad_clip``) also
    gives the norm (``last_grad_norm``, from its one reduction); others (torch's AdamW) are
    clipped here with ``clip_grad_norm_``."""
    accum = cfg.train.grad_accum
    total = torch.zeros((), device=device)
    for micro in range(accum):
        batch = draw_batch(
            corpus.train,
            cfg.data.seq_len,
            cfg.train.micro_batch,
            cfg.run.seed,
            "train",
            step,
            micro,
            proc.rank,
        )
        with gradient_sync(model, micro == accum - 1):
            loss = token_loss(model, batch.to(device), cfg.train.loss)
            (loss / accum).backward()
        total += loss.detach()
    held = held_optimizer(optimizer)
    own_norm = clips_itself(cfg.optim.name) and hasattr(held, "last_grad_norm")
    if not own_norm:
        clip = cfg.optim.grad_clip > 0 and not clips_itself(cfg.optim.name)
        max_norm = cfg.optim.grad_clip if clip else float("inf")
        norm = _to_float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    optimizer.step()
    if own_norm:
        norm = float(held.last_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return _mean_over_ranks(total / accum), norm


def _stream_text(corpus: Corpus) -> str:
    return (
        f"{corpus.source}: {len(corpus.train):,} train tokens ({corpus.train_docs} docs), "
        f"{len(corpus.val):,} val tokens ({corpus.val_docs} docs)"
    )


def _describe(
    cfg: Config,
    model: nn.Module,
    groups: list[RoutedGroup],
    prep: Prepared,
    proc: ProcessInfo,
    start: int,
    run_id: str,
) -> str:
    n_params = sum(p.numel() for p in inner_model(model).parameters())
    tokens = cfg.train.micro_batch * cfg.data.seq_len * cfg.train.grad_accum * proc.world
    lines = [
        f"run {cfg.run.name}: {n_params / 1e6:.2f}M params, placement={cfg.placement.kind}, "
        f"{proc.world} rank(s) on {prep.device}, optimizer={cfg.optim.name}",
        f"data: {prep.corpus.summary or _stream_text(prep.corpus)}; {tokens:,} tokens/step",
    ]
    lines += [f"group {g.index} /{g.pattern}/ {g.options}: {len(g.names)} params" for g in groups]
    if start:
        lines.append(
            f"resumed from step {start} of {cfg.train.steps}: run {run_id} "
            f"({ckpt.describe_signature(ckpt.run_signature(cfg))}), checkpoint "
            f"{prep.resume.checkpoint or cfg.output_dir() / 'checkpoints'}"
        )
    else:
        lines.append(f"new run {run_id} in {cfg.output_dir()}")
    return "\n".join(lines)


def train(cfg: Config, prep: Prepared, proc: ProcessInfo) -> dict[str, Any]:
    """Run the configured training; every rank calls it. Returns a summary (rank 0's numbers);
    a run stopped by SIGTERM returns ``{"stopped": {"step", "signal", "checkpoint"}}``."""
    with stop_on_sigterm() as stop:
        return _train(cfg, prep, proc, stop)


def _train(cfg: Config, prep: Prepared, proc: ProcessInfo, stop: StopRequest) -> dict[str, Any]:
    out = cfg.output_dir()
    device = prep.device
    mesh = process_group_for(cfg, device)
    torch.manual_seed(cfg.run.seed)
    model, optimizer, groups = build_model_and_optimizer(cfg, device, mesh)
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    ck_dir = out / "checkpoints"
    start, tokens_seen = 0, 0
    if cfg.run.overwrite and proc.is_main:  # before the run id's broadcast, which others await
        deleted = ckpt.clear_run_dir(out)
        if deleted:
            print(f"run.overwrite: deleted {', '.join(deleted)} in {out}", flush=True)
    run_id = _shared_run_id(prep.resume.run_id)
    signature = ckpt.run_signature(cfg)
    found = None
    if cfg.checkpoint.resume and not cfg.run.overwrite:
        found = ckpt.resume(
            ck_dir, model=model, optimizer=optimizer, run_id=run_id, warn=proc.is_main
        )
    if found is not None:
        start, tokens_seen = int(found["step"]), int(found.get("tokens", 0))
    scheduler = lr_schedule(optimizer, cfg, base_lrs, start, warn=proc.is_main)
    if proc.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        ckpt.write_run_id(out, run_id, signature)
    log = MetricsLog(
        out / "metrics.jsonl", enabled=proc.is_main, resume_step=start if found else None
    )
    bar = Progress(
        total=cfg.train.steps,
        start=start,
        main=proc.is_main,
        bar=cfg.log.progress,
        desc=cfg.run.name,
        header=_describe(cfg, model, groups, prep, proc, start, run_id),
    )

    if start == 0 and cfg.train.eval_every:
        log.write({"step": 0, "val_loss": evaluate(model, cfg, prep.corpus, proc, device)})
    tokens_per_step = cfg.train.micro_batch * cfg.data.seq_len * cfg.train.grad_accum * proc.world
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    began = time.perf_counter()
    for step in range(start + 1, cfg.train.steps + 1):
        if step == kill_at and proc.is_main:
            os.kill(os.getpid(), signal.SIGKILL)
        lr = scheduler.get_last_lr()[0]
        tick = time.perf_counter()
        loss, grad_norm = _train_step(model, optimizer, cfg, prep.corpus, step, proc, device)
        scheduler.step()
        every = cfg.placement.replica_check_every
        if every and step % every == 0:  # replicas (HSDP, DDP owner plan) hold the same bits
            names = {p: n for n, p in inner_model(model).named_parameters()}
            check_replicas(held_optimizer(optimizer), names=names)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower optim.lr.")
        seconds = time.perf_counter() - tick
        tokens_seen += tokens_per_step
        if step % cfg.log.every == 0 or step == cfg.train.steps:
            log.write(
                {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens_seen,
                    "tokens_per_s": tokens_per_step / seconds,
                    "elapsed_s": time.perf_counter() - began,
                }
            )
        bar.update(step, loss, lr, tokens_per_step / seconds)
        last = step == cfg.train.steps
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or last):
            val = evaluate(model, cfg, prep.corpus, proc, device)
            log.write({"step": step, "val_loss": val})
            bar.note(f"step {step}: val_loss {val:.4f}")
        # every rank stops after the same step: a SIGTERM seen by any rank stops them all
        stopping = not last and _any_rank(stop.signal is not None, device)
        if stopping or (cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or last)):
            saved = ckpt.save_step(
                ck_dir,
                step,
                model=model,
                optimizer=optimizer,
                extra={
                    "step": step,
                    "tokens": tokens_seen,
                    "run_id": run_id,
                    "signature": signature,
                },
                keep=cfg.checkpoint.keep,
            )
        if stopping:
            bar.close()
            by = stop.signal or "SIGTERM (to another rank)"
            return {"stopped": {"step": step, "signal": by, "checkpoint": str(saved)}}
    bar.close()
    if cfg.checkpoint.save_model:
        hf_path = cfg.model.path if cfg.model.kind == "hf" else ""
        ckpt.export_model(inner_model(model), cfg.model, out / "final", hf_path)
    held = held_optimizer(optimizer)
    facts = {
        "state_bytes_per_param": state_bytes_per_param(cfg.optim.name, held),
        "precision": {"weights": cfg.model.dtype, "optimizer": held.defaults.get("precision")},
        "run_id": run_id,
        "resumed_from_step": start or None,
    }
    return finish(cfg, out, proc, facts)


def finish(
    cfg: Config, out: Path, proc: ProcessInfo, facts: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Summarise the metrics and draw the loss curve (rank 0).

    ``summary.json`` also records the placement kind, the world size, the git commit of the
    ShardFlow source (None outside a checkout) and ``facts`` (the run adds the optimizer's
    state bytes per parameter — rank 0's measured figure for ShardFlow optimizers, the table's
    for others —, the precision of the weights and of the optimizer's update, the run id and
    the step it resumed from)."""
    if not proc.is_main:
        return {}
    rows = read_metrics(out / "metrics.jsonl")
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    tail = train[-10:]
    summary = {
        "name": cfg.run.name,
        "optimizer": cfg.optim.name,
        "lr": cfg.optim.lr,
        "steps": cfg.train.steps,
        "placement": cfg.placement.kind,
        "world_size": proc.world,
        "commit": source_commit(),
        **(facts or {}),
        "first_loss": train[0] if train else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "first_val_loss": val[0] if val else None,
        "final_val_loss": val[-1] if val else None,
        "elapsed_s": max((r.get("elapsed_s", 0.0) for r in rows), default=0.0),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.log.plot:
        png = plot_losses({cfg.run.name: rows}, out / "loss.png", f"{cfg.run.name}: loss")
        summary["plot"] = str(png) if png else None
    return summary
