"""Bytes each rank sends and receives per optimizer step, measured, and step time W=2 vs W=1.

For stacks of ``L`` square ``d × d`` linear layers (P = L·d² orthogonalized elements), DolphinFlow
with ``ortho_mode="matrix"`` runs a few steps on W gloo ranks (CPU) in each placement; every
``torch.distributed`` collective call inside ``optimizer.step()`` is logged by
:func:`shardflow.distributed.comm.record_collectives` (bandwidth-optimal accounting: ring
all-reduce 2n(W−1)/W each way, all-gather/reduce-scatter (W−1) chunks, all-to-all every split
but one's own). Printed beside the anchors' figures from ANCHORS.md, in elements of P:

- KellerJordan/Muon (DDP): all-gather of updated params ≈ P(W−1)/W received;
- microsoft/dion (FSDP2): 2 bf16 all-to-alls ≈ P/W each way;
- heavyball (FSDP1): ≈ 3P/W; Megatron layer-wise: ≈ P.

Placements: ``ddp-wrapped`` (our traffic on top of DDP's all-reduce), ``ddp-unwrapped`` (our
traffic instead of DDP's: gradients to owners + params back), ``fsdp`` (our traffic beyond FSDP's
own, bf16 wire; FSDP's own all-gather + reduce-scatter in forward/backward also measured).

Then the step time (median of the timed steps, forward+backward+step and step alone) at W = 2
(each placement) against W = 1 on the same machine, same global batch.

Run:  python bench/comm.py [--out bench/results/comm-<machine>-<date>.md]   (≈ 3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401 - once here, not in every forked rank
import torch.distributed as dist  # noqa: E402
from dist import run_on_ranks  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from shardflow import DolphinFlow  # noqa: E402
from shardflow.distributed.comm import record_collectives  # noqa: E402

SIZES = ((4, 64), (4, 128), (8, 128), (4, 256))  # (layers, d)
WORLDS = (2, 4)
KINDS = ("ddp-wrapped", "ddp-unwrapped", "fsdp")
BATCH = 16


def make_model(layers: int, d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(layers)])


def build(kind: str, layers: int, d: int, world: int):
    model = make_model(layers, d)
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model, mesh
    if kind == "ddp-wrapped":
        return model, DistributedDataParallel(model), dist.group.WORLD
    if kind == "ddp-unwrapped":
        return model, model, dist.group.WORLD
    return model, model, None


def run(kind: str, layers: int, d: int, rank: int, world: int, steps: int, timed: bool):
    inner, model, pg = build(kind, layers, d, world)
    opt = DolphinFlow(inner.parameters(), lr=1e-3, ortho_mode="matrix", process_group=pg)
    if kind == "ddp-wrapped":
        opt.placement.grads_reduced = True
    per = BATCH // world
    ours, theirs, step_s, total_s = [], [], [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(BATCH, d, generator=g)[rank * per : (rank + 1) * per]
        opt.zero_grad()
        t0 = time.perf_counter()
        with record_collectives() as fb:
            model(x).square().mean().backward()
        t1 = time.perf_counter()
        with record_collectives() as st:
            opt.step()
        t2 = time.perf_counter()
        ours.append((st.sent(), st.received(), st.by_name()))
        theirs.append((fb.sent(), fb.received()))
        step_s.append(t2 - t1)
        total_s.append(t2 - t0)
    warm = steps // 2 if timed else 0
    return {
        "ours": ours[-1],
        "theirs": theirs[-1],
        "step_s": statistics.median(step_s[warm:]),
        "total_s": statistics.median(total_s[warm:]),
    }


def _traffic(rank: int, world: int):
    return {
        (kind, layers, d): run(kind, layers, d, rank, world, steps=2, timed=False)
        for kind in KINDS
        for layers, d in SIZES
    }


def _timing(rank: int, world: int, layers: int, d: int, steps: int):
    return {kind: run(kind, layers, d, rank, world, steps, timed=True) for kind in KINDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=12, help="steps for the timing runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "## Traffic per rank per optimizer step (measured), in elements of P",
        "",
        "P = orthogonalized elements (L·d²). 'ours sent/recv' = bytes this rank sent/received "
        "inside optimizer.step(), divided by 2 (bf16 elements) for fsdp and by 4 (fp32) for ddp; "
        "'/(P/W)' normalizes by P/W. Rank 0 shown (ranks agree within the plan's imbalance). "
        "'wrapper's own sent' = DDP's or FSDP's own traffic in forward+backward (fp32 elements; "
        "DDP's gloo all-reduce is not seen by the recorder, which sees torch.distributed calls "
        "made from Python). Anchor columns: ANCHORS.md's figures in units of P/W per rank per "
        "step: KJ-Muon all-gather (W−1)·P/W received; dion 2 bf16 all-to-alls ≈ P/W each; "
        "heavyball ≈ 3P/W; Megatron ≈ P = W·P/W.",
        "",
        "| placement | W | L×d | P | calls | ours sent | ours recv | sent/(P/W) | recv/(P/W) "
        "| wrapper's own sent | KJ-Muon DDP | dion FSDP2 | heavyball | Megatron |",
        "|" + "---|" * 14,
    ]
    for world in WORLDS:
        results = run_on_ranks(_traffic, world, timeout=600)[0]
        for (kind, layers, d), r in results.items():
            p = layers * d * d
            elem = 2 if kind == "fsdp" else 4
            sent, recv, calls = r["ours"]
            per = p / world
            ncalls = sum(calls.values())
            lines.append(
                f"| {kind} | {world} | {layers}×{d} | {p} | {ncalls} | {sent // elem} | "
                f"{recv // elem} | {sent / elem / per:.2f} | {recv / elem / per:.2f} | "
                f"{r['theirs'][0] // 4} | {world - 1:.2f} | 2.00 | 3.00 | {world:.2f} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "## Step time, W = 2 against W = 1 (CPU, gloo, 1 thread per rank, median of the "
        f"last {args.steps // 2} of {args.steps} steps)",
        "",
        "| placement | L×d | W | optimizer.step() s | fwd+bwd+step s | step ratio W2/W1 |",
        "|---|---|---|---|---|---|",
    ]
    for layers, d in ((4, 256), (8, 256)):
        single = run("single", layers, d, 0, 1, args.steps, timed=True)
        lines.append(
            f"| single | {layers}×{d} | 1 | {single['step_s']:.4f} | {single['total_s']:.4f} | 1.00 |"
        )
        print(lines[-1], flush=True)
        timing = run_on_ranks(_timing, 2, layers, d, args.steps, timeout=600)[0]
        for kind, r in timing.items():
            lines.append(
                f"| {kind} | {layers}×{d} | 2 | {r['step_s']:.4f} | {r['total_s']:.4f} | "
                f"{r['step_s'] / single['step_s']:.2f} |"
            )
            print(lines[-1], flush=True)
    if args.out:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
        load = Path("/proc/loadavg").read_text().split()[0]
        head = [
            "# Sharded DolphinFlow: communication per step and step time",
            "",
            f"Command: `python bench/comm.py --out {args.out}`  ",
            f"Date: {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, Python "
            f"{platform.python_version()}; the machine is shared (load average "
            f"{load} at the end)",
            "",
            "```",
            *lscpu,
            "```",
            "",
        ]
        args.out.write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
