"""Gradient release against the ordinary step: peak live gradient bytes, step time, convergence.

Run from the repository root::

    PYTHONPATH=$PWD nice python -m bench.release                 # ~3 min on 2 shared cores
    PYTHONPATH=$PWD nice python -m bench.release --convergence 100

The model is the quickstart's decoder (configs/quickstart.toml: dim 256, 8 heads, 4 kv heads,
ffn 704, byte vocabulary, tied embeddings) with 12 layers, one process, fp32, batch 4 × 128
tokens of the Python standard library; DolphinFlow with the quickstart's groups (embeddings,
head and norms element-wise; hidden matrices ``vector`` or ``matrix``), lr 3e-3, clipping 1.0.

- **Peak live gradient bytes**: a post-accumulate-grad hook on every parameter, registered
  before release's own, sums the bytes of every ``.grad`` alive each time a gradient lands;
  the peak over a step. Release uses the runtime's buckets (one per decoder block,
  :func:`shardflow.optim.release.module_buckets`).
- **Step time**: forward + backward + ``optimizer.step()`` (release: the update runs inside
  backward), the two contenders alternating step by step (same machine load), median over
  ``--steps`` steps after 2 warm-up steps; the ratio release / ordinary is the figure.
- **Convergence** (``--convergence N``): N steps from the same initialization and batches,
  validation loss (8 held-out batches) at the end, ordinary (global clipping) vs release
  (per-block clipping: the one difference).

Results go to ``bench/results/release-<machine>-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import stdlib_bytes
from bench.step import machine
from shardflow import DolphinFlow
from shardflow.optim.release import module_buckets, prepare_for_gradient_release
from shardflow.train.config import ModelConfig
from shardflow.train.model import build_decoder

SEQ, BATCH = 128, 4


def _model(layers: int, seed: int = 0) -> torch.nn.Module:
    cfg = ModelConfig(
        dim=256,
        n_layers=layers,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=704,
        vocab_size=257,
        max_seq_len=SEQ,
        tie_embeddings=True,
    )
    model = build_decoder(cfg)
    model.reset_parameters(seed)
    return model


def _optimizer(model: torch.nn.Module, mode: str, release: bool) -> DolphinFlow:
    named = list(model.named_parameters())
    plain = [p for n, p in named if any(k in n for k in ("embed", "lm_head", "norm"))]
    hidden = [p for n, p in named if not any(k in n for k in ("embed", "lm_head", "norm"))]
    groups = [{"params": plain, "ortho_mode": None}, {"params": hidden}]
    opt = DolphinFlow(groups, lr=3e-3, weight_decay=0.0, ortho_mode=mode, gradient_clipping=1.0)
    if release:
        prepare_for_gradient_release(model, opt, buckets=module_buckets(model), clipping="bucket")
    return opt


def _batch(corpus: torch.Tensor, step: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 2 + (split == "val"))
    half = len(corpus) * 9 // 10
    lo, hi = (0, half - SEQ - 1) if split == "train" else (half, len(corpus) - SEQ - 1)
    starts = torch.randint(lo, hi, (BATCH,), generator=g)
    rows = torch.stack([corpus[s : s + SEQ + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def _step(model, opt, corpus, step) -> float:
    x, y = _batch(corpus, step, "train")
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


class _Peak:
    """Peak bytes of live gradients, sampled each time a gradient lands."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = list(model.parameters())
        self.peak = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._count) for p in self.params]

    def _count(self, _: torch.Tensor) -> None:
        live = sum(
            p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None
        )
        self.peak = max(self.peak, live)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def memory_and_time(corpus, layers: int, mode: str, steps: int) -> dict:
    runs = {}
    for release in (False, True):
        model = _model(layers)
        peak = _Peak(model)  # before release's hooks: it sees each gradient before it is freed
        runs[release] = (model, _optimizer(model, mode, release), peak, [])
    for step in range(steps + 2):
        for model, opt, _, times in runs.values():
            start = time.perf_counter()
            _step(model, opt, corpus, step)
            if step >= 2:
                times.append(time.perf_counter() - start)
    out = {}
    for release, (_, _, peak, times) in runs.items():
        peak.remove()
        out[release] = (peak.peak, statistics.median(times))
    total = sum(p.numel() * p.element_size() for p in runs[False][0].parameters())
    return {"total": total, "plain": out[False], "release": out[True]}


def convergence(corpus, layers: int, mode: str, steps: int) -> tuple[float, float]:
    losses = []
    for release in (False, True):
        model = _model(layers)
        opt = _optimizer(model, mode, release)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
        for step in range(steps):
            _step(model, opt, corpus, step)
            sched.step()
        with torch.no_grad():
            val = [
                float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
                for x, y in (_batch(corpus, 10_000 + i, "val") for i in range(8))
            ]
        losses.append(statistics.mean(val))
    return losses[0], losses[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per contender")
    parser.add_argument("--convergence", type=int, default=0, help="steps (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="vector,matrix", help="DolphinFlow ortho_modes")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = stdlib_bytes(1_000_000)
    tag, cpu = machine()
    lines = [
        f"# Gradient release vs the ordinary step ({datetime.date.today()})",
        "",
        f"Command: `python -m bench.release {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"Machine: {cpu}, {args.threads} torch thread(s), 2-core CPU shared with other jobs.",
        f"Model: quickstart decoder with {args.layers} layers, fp32, batch {BATCH}x{SEQ}, "
        "DolphinFlow lr 3e-3, clipping 1.0 (release: per block).",
        "",
        "| mode | grads (model) | peak live grads, ordinary | peak live grads, release | "
        "release/ordinary | step s, ordinary | step s, release | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    modes = args.modes.split(",")
    for mode in modes:
        r = memory_and_time(corpus, args.layers, mode, args.steps)
        (pm, pt), (rm, rt) = r["plain"], r["release"]
        mib = 2**20
        lines.append(
            f"| {mode} | {r['total'] / mib:.1f} MiB | {pm / mib:.1f} MiB | {rm / mib:.1f} MiB | "
            f"{rm / pm:.1%} | {pt:.3f} | {rt:.3f} | {rt / pt:.3f} |"
        )
        print(lines[-1], flush=True)
    if args.convergence:
        lines += [
            "",
            f"Convergence: {args.convergence} steps, validation loss (8 held-out batches):",
            "",
            "| mode | ordinary | release | release/ordinary - 1 |",
            "|---|---|---|---|",
        ]
        for mode in modes:
            a, b = convergence(corpus, args.layers, mode, args.convergence)
            lines.append(f"| {mode} | {a:.4f} | {b:.4f} | {b / a - 1:+.2%} |")
            print(lines[-1], flush=True)
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f} (other jobs share the CPU).")
    out = Path(args.out) / f"release-{tag}{args.tag}-{datetime.date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
