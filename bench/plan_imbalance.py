"""Newton-Schulz load imbalance of the owner plan for the real shapes of Llama-3-8B and -70B.

Computed from shapes alone (no GPUs, no weights). For each model, world size W and unit
(whole matrices, or ``b × b`` tiles as in ``ortho_mode="block"`` under FSDP2), prints the NS load
``max / mean`` of ShardFlow's LPT plan next to the anchor: round-robin over the matrices in model
order, which is how KellerJordan/Muon (DDP) and Megatron's layer-wise distribution assign them.
Targets (issue 3): ≤ 1.10 at W = 8 and ≤ 1.25 at W = 64 for Llama-3-8B.

Run:  python bench/plan_imbalance.py [--out bench/results/plan-<machine>-<date>.md]
Takes about a minute on 2 CPU cores (the 70B tiled plans have ~10⁵ units).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardflow.distributed.plan import OwnerPlan, Unit, imbalance, tile_units, whole_unit  # noqa: E402

MODELS = {
    # hidden, MLP, KV width (8 KV heads x 128), layers; from the published configs
    "Llama-3-8B": (4096, 14336, 1024, 32),
    "Llama-3-70B": (8192, 28672, 1024, 80),
}
WORLDS = (8, 64, 512)
UNITS = (None, 1024, 512)  # None: whole matrices


def hidden_shapes(hidden: int, mlp: int, kv: int, layers: int) -> list[tuple[int, int]]:
    """(out, in) of q, k, v, o, gate, up, down per layer (embeddings and head are element-wise)."""
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    layer += [(mlp, hidden), (mlp, hidden), (hidden, mlp)]
    return layer * layers


def units_for(shapes: list[tuple[int, int]], block: int | None) -> list[Unit]:
    if block is None:
        return [whole_unit(i, s, s) for i, s in enumerate(shapes)]
    return [u for i, s in enumerate(shapes) for u in tile_units(i, s, (block, block))]


def round_robin(units: list[Unit], world: int) -> float:
    loads = [0.0] * world
    for k, u in enumerate(units):
        loads[k % world] += u.cost
    return imbalance(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write a markdown report")
    args = parser.parse_args()
    rows = []
    header = (
        "| model | unit | units | W | LPT max/mean | round-robin max/mean | RR / LPT | plan s |"
    )
    print(header)
    print("|" + "---|" * 8)
    for model, config in MODELS.items():
        shapes = hidden_shapes(*config)
        for block in UNITS:
            units = units_for(shapes, block)
            for world in WORLDS:
                t = time.perf_counter()
                plan = OwnerPlan(world, units)
                secs = time.perf_counter() - t
                lpt, rr = plan.ns_imbalance(), round_robin(units, world)
                unit = "matrix" if block is None else f"{block}² tile"
                row = (
                    f"| {model} | {unit} | {len(units)} | {world} | {lpt:.3f} | {rr:.3f} | "
                    f"{rr / lpt:.2f}× | {secs:.2f} |"
                )
                print(row, flush=True)
                rows.append(row)
    if args.out:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
        text = [
            "# Owner plan: Newton-Schulz load imbalance (max / mean), Llama-3 shapes",
            "",
            f"Command: `python bench/plan_imbalance.py --out {args.out}`  ",
            f"Date: {time.strftime('%Y-%m-%d')}  ",
            f"Python {platform.python_version()}",
            "",
            "```",
            *lscpu,
            "```",
            "",
            "Targets: ≤ 1.10 at W = 8 and ≤ 1.25 at W = 64 for Llama-3-8B (whole matrices).",
            "Anchor: round-robin over matrices in model order (KellerJordan/Muon, Megatron).",
            "",
            header,
            "|" + "---|" * 8,
            *rows,
            "",
        ]
        args.out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
