"""The communication model (:mod:`shardflow.distributed.traffic`) checked against counted traffic,
then tabulated for Llama-3-8B/70B/405B on 8 .. 1024 GPUs.

**Validation.** A small built-in decoder (2 blocks, untied head) trains on W gloo ranks (CPU)
with DolphinFlow in each placement — DDP-aware owner plan (unwrapped: the optimizer sends the
gradients to their owners), FSDP2 (``fully_shard`` per block, then the root) at W = 2 and 4, and
HSDP 2x2 — and each ``ortho_mode`` (vector, matrix, block 16). Every ``torch.distributed``
collective of the second step (forward, backward and ``optimizer.step()``, FSDP2's own
included) is counted by :func:`shardflow.distributed.comm.record_collectives`; the model
predicts the same rank's bytes from the shapes and the mesh alone. Compared per collective (sent
bytes, every rank); the scalar all-reduces (norms, clipping) are not modelled and are listed
apart.

**Table.** Bytes per rank per step by link for DDP-aware (DDP-wrapped: DDP's all-reduce, the
owner plan's all-gather), FSDP2 over all GPUs, and HSDP (8 GPUs per node = the shard group), bf16
weights and gradients, one micro-batch, bf16 wire, matrix mode; beside it the owner plan's NS
imbalance (max/mean) and how many ranks own no unit (idle during Newton-Schulz), and the same
with block mode (1024-tiles).

Run:  python bench/comm_model.py [--out bench/results/comm-model-<machine>-<date>.md]
"""

from __future__ import annotations

import argparse
import platform
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

from bench.shapes import SHAPES, ModelShapes  # noqa: E402
from shardflow import DolphinFlow  # noqa: E402
from shardflow.distributed import traffic  # noqa: E402
from shardflow.distributed.comm import record_collectives  # noqa: E402
from shardflow.distributed.placement import plan_inputs  # noqa: E402
from shardflow.distributed.plan import replicated_plan, sharded_plan  # noqa: E402
from shardflow.optim.routing import param_groups  # noqa: E402
from shardflow.train.config import ModelConfig  # noqa: E402
from shardflow.train.model import build_decoder  # noqa: E402

MODES = {
    "vector": {"ortho_mode": "vector"},
    "matrix": {"ortho_mode": "matrix"},
    "block": {"ortho_mode": "block", "block_size": 16},
}
POINTS = (("ddp", 2), ("fsdp", 2), ("ddp", 4), ("fsdp", 4), ("hsdp", 4))
SMALL = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=96,
    vocab_size=257,
    max_seq_len=16,
    tie_embeddings=False,
)
COUNTED = {  # recorder name -> the model's collective, per placement
    "ddp": {
        "all_to_all_single": "gradient all-to-all",
        "all_gather_into_tensor": "parameter all-gather",
        "all_gather_single": "parameter all-gather",
    },
    "fsdp": {
        "all_gather_single": "FSDP2 all-gather",
        "all_gather_into_tensor": "FSDP2 all-gather",
        "reduce_scatter_single": "FSDP2 reduce-scatter",
        "reduce_scatter_tensor": "FSDP2 reduce-scatter",
        "all_reduce": "HSDP all-reduce",
        "all_to_all_single": "NS all-to-all (2 rounds)",
    },
}
GPUS = (8, 64, 256, 1024)
NODE = 8


def _measure(rank, world, kind):
    """Per mode: counted (name, sent, received) calls of step 2, and the model's prediction."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    out = {}
    for mode, options in MODES.items():
        model = build_decoder(SMALL, "cpu")
        model.reset_parameters(0)
        if kind == "ddp":
            group, shard, replicas = dist.group.WORLD, world, 1
        else:
            shape = (2, world // 2) if kind == "hsdp" else (world,)
            names = ("replicate", "shard") if kind == "hsdp" else None
            group = init_device_mesh("cpu", shape, mesh_dim_names=names)
            for block in model.blocks():
                fully_shard(block, mesh=group)
            fully_shard(model, mesh=group)
            replicas, shard = (2, world // 2) if kind == "hsdp" else (1, world)
        opt = DolphinFlow(param_groups(model), lr=1e-3, process_group=group, **options)
        blocks = {id(p) for b in model.blocks() for p in b.parameters()}
        params, _, tiles = plan_inputs(opt.param_groups, opt._ns_tile)
        shapes = [
            traffic.Param(tuple(p.shape), p.element_size(), t, id(p) not in blocks)
            for p, t in zip(params, tiles)
        ]
        me = opt.placement.rank
        for step in (1, 2):
            g = torch.Generator().manual_seed(step)
            tokens = torch.randint(0, SMALL.vocab_size, (world * 2, 9), generator=g)
            x = tokens[rank * 2 : rank * 2 + 2]
            with record_collectives() as log:
                logits = model(x[:, :-1])
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, SMALL.vocab_size), x[:, 1:].reshape(-1)
                ).backward()
                opt.step()
                opt.zero_grad()
        if kind == "ddp":
            owners = replicated_plan([p.shape for p in shapes], tiles, world).owners
            predicted = traffic.replicated_step(shapes, owners, world=world, rank=me)
        else:
            predicted = traffic.sharded_step(
                shapes, shard=shard, replicas=replicas, rank=me, node_size=shard
            )
        out[mode] = (list(log.calls), [(t.collective, t.sent, t.received) for t in predicted])
    return out


def validate() -> list[str]:
    lines = [
        "## Model vs counted bytes (sent per rank, step 2; every rank)",
        "",
        "| placement | W | mode | rank | collective | counted | predicted | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    scalars = []
    for kind, world in POINTS:
        ranks = run_on_ranks(_measure, world, kind, timeout=600)
        for rank, result in enumerate(ranks):
            for mode, (calls, predicted) in result.items():
                names = COUNTED["ddp" if kind == "ddp" else "fsdp"]
                counted: dict[str, int] = {}
                small = 0
                for name, sent, _ in calls:
                    target = names.get(name)
                    if name == "all_reduce" and sent < 4096:  # scalar sums: not modelled
                        target = None
                    if target is None:
                        small += sent
                        continue
                    counted[target] = counted.get(target, 0) + sent
                scalars.append(small)
                model = {c: s for c, s, _ in predicted}
                for c in sorted(set(counted) | set(model)):
                    got, want = counted.get(c, 0), model.get(c, 0)
                    err = abs(want - got) / got if got else (0.0 if not want else float("inf"))
                    worst = max(worst, err)
                    label = f"{kind} 2x2" if kind == "hsdp" else kind
                    lines.append(
                        f"| {label} | {world} | {mode} | {rank} | {c} | {got:,} | {want:,} | "
                        f"{err:.2%} |"
                    )
    lines += [
        "",
        f"Largest error: {worst:.2%}. Unmodelled scalar all-reduces (norms, "
        f"clipping): at most {max(scalars):,} bytes per rank per step.",
        "",
    ]
    return lines


def _params(shapes: ModelShapes, mode: str, block: int = 1024) -> list[traffic.Param]:
    out = []
    for name, shape in shapes.param_shapes().items():
        hidden = len(shape) == 2 and ".layers." in name
        tile = traffic.tile_of(shape, mode, block) if hidden else None
        root = ".layers." not in name
        out.append(traffic.Param(tuple(shape), 2, tile, root))
    return out


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f}"


def table() -> list[str]:
    lines = [
        "## Bytes per rank per step (GiB sent; bf16 weights and gradients, one micro-batch, "
        f"{NODE} GPUs per node)",
        "",
        "DDP-aware: DDP-wrapped (DDP's all-reduce + the owner plan's all-gather), every group "
        "spans nodes beyond 8 GPUs. FSDP2: 1-D over all GPUs. HSDP: shard group = one node. "
        "NS imbalance = max/mean Newton-Schulz load of the owner plan (DDP: over all GPUs; FSDP2: "
        "over all GPUs; HSDP: over the 8 of a node); idle = ranks owning no NS unit.",
        "",
        "| model | GPUs | DDP intra | DDP inter | FSDP2 intra | FSDP2 inter | HSDP intra | "
        "HSDP inter | HSDP NS a2a | matrix: DDP imb / idle | FSDP2 imb / idle | HSDP imb / idle "
        "| block 1024: FSDP2 imb / idle |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shapes in (SHAPES["llama3-8b"], SHAPES["llama3-70b"], SHAPES["llama3-405b"]):
        params = _params(shapes, "matrix")
        blocked = _params(shapes, "block")
        hsdp_plan = sharded_plan([p.shape for p in params], [p.tile for p in params], NODE)
        hsdp_ns = traffic.ns_all_to_all(params, NODE, 2, hsdp_plan)
        for gpus in GPUS:
            ddp_plan = replicated_plan([p.shape for p in params], [p.tile for p in params], gpus)
            ddp = traffic.by_link(
                traffic.replicated_step(
                    params, ddp_plan.owners, world=gpus, node_size=NODE, grads_reduced=True
                )
            )
            fsdp_plan = sharded_plan([p.shape for p in params], [p.tile for p in params], gpus)
            fsdp_ns = traffic.ns_all_to_all(params, gpus, 2, fsdp_plan)
            busiest = max(range(gpus), key=fsdp_ns.__getitem__)
            fsdp = traffic.by_link(
                traffic.sharded_step(params, shard=gpus, node_size=NODE, rank=busiest, ns=fsdp_ns)
            )
            hsdp_busy = max(range(NODE), key=hsdp_ns.__getitem__)
            hsdp = traffic.by_link(
                traffic.sharded_step(
                    params,
                    shard=NODE,
                    replicas=gpus // NODE,
                    node_size=NODE,
                    rank=hsdp_busy,
                    ns=hsdp_ns,
                )
            )
            block_plan = sharded_plan([p.shape for p in blocked], [p.tile for p in blocked], gpus)

            def cell(plan) -> str:
                return f"{plan.ns_imbalance():.3f} / {plan.counts().count(0)}"

            lines.append(
                f"| {shapes.name} | {gpus} | {_gib(ddp.get('intra-node', 0))} | "
                f"{_gib(ddp.get('inter-node', 0))} | {_gib(fsdp.get('intra-node', 0))} | "
                f"{_gib(fsdp.get('inter-node', 0))} | {_gib(hsdp.get('intra-node', 0))} | "
                f"{_gib(hsdp.get('inter-node', 0))} | {_gib(hsdp_ns[hsdp_busy])} | "
                f"{cell(ddp_plan)} | {cell(fsdp_plan)} | {cell(hsdp_plan)} | {cell(block_plan)} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-validation", action="store_true")
    args = ap.parse_args()
    started = time.time()
    lines = [
        "# Communication model vs counted traffic, and per-rank bytes at scale",
        "",
        f"Command: `python bench/comm_model.py{' --out ' + str(args.out) if args.out else ''}`  ",
        f"Machine: 2-core CPU, shared ({platform.machine()}), torch {torch.__version__}, gloo.  ",
        f"Date: {time.strftime('%Y-%m-%d', time.gmtime())}",
        "",
    ]
    if not args.skip_validation:
        lines += validate()
    lines += table()
    lines += ["", f"Wall time: {time.time() - started:.0f} s"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
