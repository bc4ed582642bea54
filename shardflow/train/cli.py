"""The ``shardflow train|compare|plan`` commands (:mod:`shardflow.cli`; launch/ wraps them).

Exit codes: 0 done (or stopped by SIGTERM with a checkpoint, or nothing left to train), 1 a
failure during training, 2 bad input (config, data, model, launch, run folder), 130 interrupted
(SIGINT). Bad input is reported once, by rank 0, before any process group starts, and every rank
exits with the same code.

A failure after the process group started — on any rank, in any code (a full disk on rank 0
while it appends metrics) — is reported first by the rank it happened on (its traceback), and
that rank then leaves at once, without the shutdown barrier its peers could never reach (they
wait in a collective): its connections close, each peer's collective fails within a second or
two, and each peer prints one line saying so and leaves too. The job ends in seconds, not when
the collective timeout (30 minutes) runs out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist

from shardflow.train import ckpt
from shardflow.train.config import Config, ConfigError, load_config
from shardflow.train.loop import check_variant, preflight, train
from shardflow.train.metrics import plot_losses, read_metrics
from shardflow.train.optimizers import (
    accepts_option,
    check_optimizer_name,
    groups_for,
)
from shardflow.train.placement import ProcessInfo, init_distributed, process_info

BAD_INPUT = 2


def _fail(proc: ProcessInfo, exc: Exception) -> int:
    if proc.is_main:
        print(f"shardflow: error: {exc}", file=sys.stderr, flush=True)
    return BAD_INPUT


def _parser(prog: str, compare: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train from a TOML run config; --section.field VALUE overrides any field.",
    )
    parser.add_argument("config", help="a configs/*.toml run config")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (groups, owners, memory per rank) and exit",
    )
    if compare:
        parser.add_argument(
            "--optimizers",
            required=True,
            help="comma-separated optimizer names, run in turn; --optim.hyper.KEY VALUE goes to "
            "those whose constructor takes KEY",
        )
        parser.add_argument(
            "--lrs", default="", help="comma-separated peak learning rates tried for each optimizer"
        )
    return parser


def _finish_group() -> None:
    """After success only: every rank reaches this barrier."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""What gloo's collectives say when another rank's process has gone."""


def _failed(proc: ProcessInfo, exc: BaseException) -> int:
    """Report ``exc`` (raised after the process group started) and leave without a barrier.

    Several processes: print, then ``os._exit`` — the peers' collectives fail as this rank's
    connections close, so every rank ends within seconds. One process: the process group is
    destroyed and the caller re-raises (a :class:`ConfigError` becomes exit code 2)."""
    several = dist.is_initialized() and dist.get_world_size() > 1
    who = f"shardflow: rank {proc.rank}" if several else "shardflow"
    if isinstance(exc, ConfigError):
        code = _fail(proc, exc)
    elif isinstance(exc, KeyboardInterrupt):
        code = 130
        print(f"{who}: interrupted (SIGINT)", file=sys.stderr, flush=True)
    elif several and any(text in str(exc) for text in PEER_GONE):
        code = 1
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"{who} stopped: a collective failed because another rank's process "
            f"ended (its error is above): {type(exc).__name__}: {first}",
            file=sys.stderr,
            flush=True,
        )
    else:
        code = 1
        if several:
            text = "".join(traceback.format_exception(exc))
            print(f"{who} failed:\n{text}", file=sys.stderr, flush=True)
    if several:
        sys.stdout.flush()
        os._exit(code)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def _run_all(proc: ProcessInfo, work: Any) -> Any:
    """``work()`` inside the process group, then the shutdown barrier; a failure in either ends
    this rank at once (:func:`_failed`). Returns ``work()``'s value, or an exit code for a
    :class:`ConfigError` in one process."""
    try:
        result = work()
        _finish_group()
    except BaseException as exc:
        code = _failed(proc, exc)
        if isinstance(exc, ConfigError):
            return code
        raise
    return result


def stopped_text(stopped: dict[str, Any]) -> str:
    """What a run stopped by SIGTERM prints."""
    return (
        f"stopped by {stopped['signal']} after step {stopped['step']}: checkpoint "
        f"{stopped['checkpoint']}; run the same command again to resume from it."
    )


def nothing_to_train(cfg: Config, step: int) -> str | None:
    """The message when the checkpoint a run resumes from is already at train.steps or past."""
    if step < cfg.train.steps:
        return None
    return (
        f"shardflow: nothing to train: the newest checkpoint in {cfg.output_dir() / 'checkpoints'} "
        f"is at step {step} and train.steps={cfg.train.steps}; raise --train.steps to train "
        "further, or use another run.out_dir for a new run."
    )


def main_plan(argv: list[str]) -> int:
    """``shardflow plan CONFIG [--section.field VALUE ...]``: the dry run (nothing allocated, no
    process group)."""
    args, overrides = _parser("shardflow plan", compare=False).parse_known_args(argv)
    proc = process_info()
    try:
        cfg = load_config(args.config, overrides)
        from shardflow.train.plan import dry_run

        text = dry_run(cfg)
    except ConfigError as exc:
        return _fail(proc, exc)
    if proc.is_main:
        print(text, flush=True)
    return 0


def main_train(argv: list[str]) -> int:
    """``shardflow train CONFIG [--dry-run] [--section.field VALUE ...]``."""
    args, overrides = _parser("shardflow train", compare=False).parse_known_args(argv)
    if args.dry_run:
        return main_plan([a for a in argv if a != "--dry-run"])
    proc = process_info()
    try:
        cfg = load_config(args.config, overrides)
        prep = preflight(cfg, proc)
    except ConfigError as exc:
        return _fail(proc, exc)
    done = nothing_to_train(cfg, prep.resume.step) if prep.resume.step is not None else None
    if done:
        if proc.is_main:
            print(done, file=sys.stderr, flush=True)
        return 0
    init_distributed(cfg, prep.device, proc)
    ckpt.resolve_out_dir(cfg)
    summary = _run_all(proc, lambda: train(cfg, prep, proc))
    if isinstance(summary, int):
        return summary
    if proc.is_main:
        stopped = summary.get("stopped")
        print(stopped_text(stopped) if stopped else summary_text(cfg, summary), flush=True)
    return 0


def summary_text(cfg: Config, summary: dict[str, Any]) -> str:
    """What a finished run prints: losses, time, and where its files are."""
    out = cfg.output_dir()

    def loss(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"done: {summary['name']}, {summary['steps']} steps of {summary['optimizer']} "
        f"in {summary['elapsed_s']:.1f} s",
        f"  validation loss  {loss('first_val_loss')} -> {loss('final_val_loss')} nats/token",
        f"  training loss    {loss('first_loss')} -> {loss('final_loss')} (mean of the last 10)",
    ]
    files = [
        ("loss curve", summary.get("plot")),
        ("metrics", out / "metrics.jsonl"),
        ("summary", out / "summary.json"),
        ("model", out / "final" / "model.safetensors" if cfg.checkpoint.save_model else None),
        ("checkpoints", out / "checkpoints" if cfg.checkpoint.every else None),
    ]
    lines += [f"  {label + ':':<13}{path}" for label, path in files if path]
    return "\n".join(lines)


def hyper_for(name: str, hyper: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The ``[optim.hyper]`` keys optimizer ``name`` takes; a key that none of ``names`` takes
    is an error (a misspelling), a key only some take goes to those."""
    for key in hyper:
        if not any(accepts_option(n, key) for n in names):
            raise ConfigError(
                f"optim.hyper.{key} is an argument of none of {names}; check its spelling "
                "against the optimizers' constructors."
            )
    return {k: v for k, v in hyper.items() if accepts_option(name, k)}


def _variants(cfg: Config, names: list[str], lrs: list[float], warn: bool = False) -> list[Config]:
    """One config per optimizer and lr. ``[optim.hyper]`` and ``[[optim.groups]]`` keys go to
    the optimizers that take them; a group key none of them takes is dropped with a warning
    (``warn``) naming the nearest valid key."""
    base = compare_dir(cfg)
    out, notes = [], []
    for name in names:
        groups, notes = groups_for(name, cfg.optim.groups, names)
        for lr in lrs or [cfg.optim.lr]:
            variant = copy.deepcopy(cfg)
            label = name if not lrs else f"{name}-lr{lr:g}"
            variant.optim.name, variant.optim.lr = name, lr
            variant.optim.hyper = hyper_for(name, cfg.optim.hyper, names)
            variant.optim.groups = copy.deepcopy(groups)
            variant.run.name, variant.run.out_dir = label, str(base / label)
            out.append(variant)
    if warn and notes:
        warnings.warn("; ".join(notes), UserWarning, stacklevel=2)
    return out


def summary_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table of compare results, best final validation loss first."""
    rows = sorted(summaries, key=lambda s: s.get("final_val_loss") or float("inf"))
    lines = [
        "| run | optimizer | lr | first loss | final train loss (last 10) | final val loss | "
        "time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        lines.append(
            f"| {s['name']} | {s['optimizer']} | {s['lr']:g} | {s['first_loss']:.4f} | "
            f"{s['final_loss']:.4f} | {s['final_val_loss'] or float('nan'):.4f} | "
            f"{s['elapsed_s']:.1f} |"
        )
    return "\n".join(lines)


def compare_dir(cfg: Config) -> Path:
    """A comparison's own folder: ``run.out_dir`` when set, else ``runs/NAME-compare`` (never
    the folder a plain run of the same config writes to)."""
    return Path(cfg.run.out_dir or f"runs/{cfg.run.name}-compare")


def main_compare(argv: list[str]) -> int:
    """``shardflow compare CONFIG --optimizers a,b [--lrs x,y] [--section.field VALUE ...]``."""
    args, overrides = _parser("shardflow compare", compare=True).parse_known_args(argv)
    proc = process_info()
    try:
        cfg = load_config(args.config, overrides)
        cfg.run.out_dir = str(compare_dir(cfg))
        names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
        for name in names:
            check_optimizer_name(name)
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()] if args.lrs else []
        variants = _variants(cfg, names, lrs, warn=proc.is_main)
        for variant in variants:
            variant.log.plot = False
        prep = preflight(variants[0], proc)
        points = [prep.resume] + [check_variant(v, proc) for v in variants[1:]]
    except ConfigError as exc:
        return _fail(proc, exc)
    except ValueError as exc:
        return _fail(proc, ConfigError(f"--lrs={args.lrs!r} must be numbers: {exc}"))
    init_distributed(cfg, prep.device, proc)
    if cfg.run.timestamped:
        ckpt.resolve_out_dir(cfg)
        for variant in variants:
            variant.run.out_dir = str(Path(cfg.run.out_dir) / variant.run.name)
            variant.run.timestamped = False

    def run_variants() -> list[dict[str, Any]]:
        summaries = []
        for variant, point in zip(variants, points):
            summaries.append(train(variant, dataclasses.replace(prep, resume=point), proc))
            if "stopped" in summaries[-1]:
                break
        return summaries

    summaries = _run_all(proc, run_variants)
    if isinstance(summaries, int):
        return summaries
    if proc.is_main:
        if "stopped" in summaries[-1]:
            print(stopped_text(summaries[-1]["stopped"]), flush=True)
        else:
            write_comparison(cfg, variants, summaries)
    return 0


def write_comparison(cfg: Config, variants: list[Config], summaries: list[dict]) -> Path:
    """compare.png (every run on one plot), compare.md and compare.json in the base folder."""
    base = cfg.output_dir()
    runs = {v.run.name: read_metrics(v.output_dir() / "metrics.jsonl") for v in variants}
    plot_losses(runs, base / "compare.png", f"{cfg.run.name}: optimizers compared")
    (base / "compare.json").write_text(json.dumps(summaries, indent=2))
    (base / "compare.md").write_text(summary_table(summaries) + "\n")
    print(summary_table(summaries), flush=True)
    return base
