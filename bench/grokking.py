"""Modular addition, the grokking task of Prieto et al. (arXiv 2501.04697), small and fast.

``(a + b) mod p`` from the concatenated one-hot codes of ``a`` and ``b``, a 2-hidden-layer ReLU
MLP (``2p → width → width → p``, the last layer named ``head``: element-wise in DolphinFlow's
routing), trained full-batch on a random ``--train-fraction`` of the ``p²`` pairs, with **no
weight decay** for any optimizer: the setting where the paper finds that plain (Adam)W memorizes
and then stalls (naïve loss minimization: the logits grow, float32 softmax collapses), while
⊥Grad or StableMax let it generalize. Each run logs train/test accuracy, the loss and the mean
logit norm; the summary gives the first step with test accuracy ≥ 90 % and the final values.

Run from the repository root (one seed; 35–110 s per 800-step run at p = 41 on a shared 2-core CPU)::

    python -m bench.grokking --runs adamw,dolphinflow-vector,... --steps 1500 --out FILE.md

Run names: ``OPT[-MODE][+ORTHOGRAD][@stablemax]`` — ``adamw``; ``dolphinflow-vector``,
``dolphinflow-matrix``, ``dolphinflow-block``; ``+gradient``/``+direction`` set
``ns_orthograd``; ``@stablemax`` trains on StableMax cross-entropy instead of softmax's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import run_meta, write_results
from shardflow import DolphinFlow, param_groups
from shardflow.losses import stablemax_cross_entropy


class MLP(nn.Module):
    def __init__(self, p: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * p, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def dataset(p: int, fraction: float, seed: int):
    """One-hot ``(a, b)`` inputs and ``(a + b) mod p`` targets, split into train and test."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()
    y = (a + b) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    cut = int(fraction * p * p)
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def build(name: str, model: nn.Module, lr: float):
    """The optimizer a run name describes (see the module docstring), weight decay 0."""
    opt_name = name.split("@")[0]
    base, _, orthograd = opt_name.partition("+")
    if base == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    mode = base.removeprefix("dolphinflow-")
    return DolphinFlow(
        param_groups(model),
        lr=lr,
        weight_decay=0.0,
        ortho_mode=mode,
        ns_orthograd=orthograd or None,
        block_size=32,
    )


def train(name: str, args) -> dict:
    torch.manual_seed(args.seed)
    (xtr, ytr), (xte, yte) = dataset(args.p, args.train_fraction, args.seed)
    model = MLP(args.p, args.width)
    opt = build(name, model, args.lr)
    loss_fn = stablemax_cross_entropy if name.endswith("@stablemax") else F.cross_entropy
    log, grokked = [], None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        logits = model(xtr)
        loss = loss_fn(logits, ytr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                train_acc = (model(xtr).argmax(1) == ytr).float().mean().item()
                test_logits = model(xte)
                test_acc = (test_logits.argmax(1) == yte).float().mean().item()
                norm = test_logits.norm(dim=1).mean().item()
            log.append(
                dict(step=step, loss=loss.item(), train=train_acc, test=test_acc, logit_norm=norm)
            )
            if grokked is None and test_acc >= 0.9:
                grokked = step
    last = log[-1]
    return dict(
        run=name,
        grok_step=grokked,
        final_train=last["train"],
        final_test=last["test"],
        best_test=max(r["test"] for r in log),
        final_loss=last["loss"],
        logit_norm=last["logit_norm"],
        seconds=round(time.perf_counter() - start, 1),
        log=log,
    )


def markdown(results: list[dict]) -> str:
    lines = [
        "| run | step test acc ≥ 90 % | final train acc | final test acc | best test acc | final train loss | mean test logit norm | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['run']} | {r['grok_step'] or 'never'} | {r['final_train']:.3f} | "
            f"{r['final_test']:.3f} | {r['best_test']:.3f} | {r['final_loss']:.2e} | "
            f"{r['logit_norm']:.1f} | {r['seconds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs", default="adamw,dolphinflow-vector,dolphinflow-matrix", type=lambda s: s.split(",")
    )
    p.add_argument("--p", type=int, default=53)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--train-fraction", type=float, default=0.4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.runs:
        results.append(train(name, args))
        r = results[-1]
        print(
            f"{name}: grok {r['grok_step']}, train {r['final_train']:.3f}, test {r['final_test']:.3f} (best {r['best_test']:.3f}), logit norm {r['logit_norm']:.1f}, {r['seconds']} s",
            flush=True,
        )
    table = markdown(results)
    print(table)
    write_results(args.out, table, dict(meta=run_meta("bench.grokking", args), results=results))


if __name__ == "__main__":
    main()
