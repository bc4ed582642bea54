"""Where DolphinFlow's compiled vector-mode step spends its time, part by part.

Run from the repository root::

    /work/venv/bin/python -m bench.step_parts
    /work/venv/bin/python -m bench.step_parts --root /tmp/old-checkout   # another commit's code

Two measurements, each the minimum over ``--steps`` steps (the minimum is the least disturbed
by other load on a shared machine), with fused AdamW measured in the same process:

- **parts**: SmolLM2-135M shapes, 2 layers. Every compiled call is timed and filed by what it
  does — the embedding's update, the other updates, the ⊥Grad row sums, the norm pass (the
  base's :func:`shardflow.optim.base._sq_norms` and DolphinFlow's compiled ``sq_norms_each``);
  the rest of the step is Python.
- **overhead**: the same parameter structure (20 tensors) at tiny sizes (hidden 64), so that
  the step time is what Python, dynamo guards and the call machinery cost.

``--root`` imports ``shardflow`` from another checkout (for A/B runs against an earlier
commit; ``git worktree add /tmp/old <rev>``). Results are printed as Markdown; keep them under
``bench/results/`` with the command, machine and date.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time


def _parts(steps: int) -> dict[str, float]:
    import torch  # noqa: PLC0415

    import shardflow.optim.base as base  # noqa: PLC0415 - after --root is on the path
    from bench.shapes import SMOLLM2_135M, build_model, random_grads  # noqa: PLC0415
    from bench.step import dolphinflow  # noqa: PLC0415

    try:  # where the compiled calls are built (dolphinflow.py before shardflow/optim/compiling.py)
        from shardflow.ops import compiling as home  # noqa: PLC0415
    except ImportError:
        from shardflow.optim import dolphinflow as home  # noqa: PLC0415
    build = "compile_once" if hasattr(home, "compile_once") else "_compiled"

    spent: dict[str, float] = collections.defaultdict(float)
    compiled_of = getattr(home, build)

    def timed(fn):
        call = compiled_of(fn)

        def run(*args, **kwargs):
            start = time.perf_counter()
            out = call(*args, **kwargs)
            first = args[0][0] if isinstance(args[0], list) else args[0]
            name = fn.__name__
            part = "sums" if "sums" in name else "norm pass" if "norms" in name else "update"
            if part == "update" and first.numel() > 10**7:
                part = "embedding update"
            spent[part] += time.perf_counter() - start
            return out

        return run

    norms = base._sq_norms

    def timed_norms(*args):
        start = time.perf_counter()
        out = norms(*args)
        spent["norm pass"] += time.perf_counter() - start
        return out

    setattr(home, build, timed)
    base._sq_norms = timed_norms
    model = build_model(dataclasses.replace(SMOLLM2_135M, layers=2), device="cpu")
    grads = random_grads(model)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    opt = dolphinflow(model, 5, ortho_mode="vector", compiled=True)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    best: dict[str, float] = {}
    for k in range(steps + 2):
        spent.clear()
        start = time.perf_counter()
        opt.step()
        spent["step"] = time.perf_counter() - start
        start = time.perf_counter()
        adamw.step()
        spent["fused AdamW step"] = time.perf_counter() - start
        if k >= 2:  # compile and warm-up first
            for key, value in spent.items():
                best[key] = min(best.get(key, float("inf")), value)
    return best


def _overhead(steps: int) -> dict[str, float]:
    import torch  # noqa: PLC0415

    from bench.shapes import SMOLLM2_135M, build_model, random_grads  # noqa: PLC0415
    from bench.step import dolphinflow  # noqa: PLC0415

    tiny = dataclasses.replace(
        SMOLLM2_135M, layers=2, hidden=64, intermediate=128, vocab=256, heads=2, kv_heads=1
    )
    model = build_model(tiny, device="cpu")
    grads = random_grads(model)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    contenders = {
        "DolphinFlow vector, compiled": dolphinflow(model, 5, ortho_mode="vector", compiled=True),
        "DolphinFlow vector, eager": dolphinflow(model, 5, ortho_mode="vector", compiled=False),
        "fused AdamW": torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True),
    }
    best = dict.fromkeys(contenders, float("inf"))
    for k in range(steps + 3):
        for name, opt in contenders.items():
            start = time.perf_counter()
            opt.step()
            if k >= 3:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help="import shardflow from this checkout")
    ap.add_argument("--steps", type=int, default=12, help="timed steps (minimum over them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.root:
        sys.path.insert(0, args.root)
    import torch  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    import shardflow  # noqa: PLC0415

    print(f"shardflow from {shardflow.__file__}, {torch.get_num_threads()} threads")
    print("\n| part of the compiled step (SmolLM2 shapes, 2 layers) | min ms |\n|---|---:|")
    parts = _parts(args.steps)
    named = sum(v for k, v in parts.items() if k not in ("step", "fused AdamW step"))
    parts["Python and the rest"] = parts["step"] - named
    for key, value in parts.items():
        print(f"| {key} | {value * 1e3:.2f} |")
    print("\n| tiny model (20 tensors, hidden 64) | min µs per step |\n|---|---:|")
    for key, value in _overhead(args.steps * 4).items():
        print(f"| {key} | {value * 1e6:.0f} |")


if __name__ == "__main__":
    main()
