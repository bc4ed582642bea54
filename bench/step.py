"""Optimizer step time and state memory on SmolLM2-135M's parameter shapes.

Run from the repository root::

    /work/venv/bin/python -m bench.step                  # 2 layers: ~2.5 min of CPU; ~7 min wall at load 10
    /work/venv/bin/python -m bench.step --layers 30 --only adamw-fused,df-vector
    /work/venv/bin/python -m bench.step --profile        # + where DolphinFlow vector's time goes
    # the DolphinFlow targets: defaults vs fused AdamW on one thread, 42.5 M params (4 layers),
    # and the same rows from another checkout (the parent commit) side by side in this process
    /work/venv/bin/python -m bench.step --layers 4 --threads 1 --steps 7 \
        --only adamw-fused,df-vector-default,df-vector-compiled,df8-vector,df8-vector-compiled \
        --baseline /tmp/base

What it measures: the median wall time of ``optimizer.step()`` alone (gradients are fixed random
tensors, ``p.grad`` is set directly, nothing else is timed) and the optimizer state in bytes per
parameter, for DolphinFlow in each mode and for the anchors, all on the same parameters:

- ``torch.optim.AdamW`` with ``foreach=True`` and ``fused=True``;
- ``torch.optim.Muon`` on the hidden matrices + fused AdamW on the rest (embedding, norms), timed
  as one step; its Newton-Schulz runs in bf16 (hard-coded in torch), which on a CPU without bf16
  units is ~15x slower than fp32, so by default the bench also runs a "Muon (fp32 NS)" twin
  that only changes that dtype, and compares DolphinFlow's matrix mode (fp32 on CPU) with it;
- DolphinFlow's vector mode both eager (``compiled=False``) and with its element-wise pass
  through ``torch.compile`` (``compiled=True``; the compilation happens in the warm-up round and
  its first-step time is reported, not timed);
- the published ``dolphinflow`` 0.2.0 package (skipped with a note when it is not installed);
- DolphinFlow and DolphinFlow8bit with default arguments (``df-vector-default``,
  ``df8-vector``: whatever backend the optimizer picks by itself) and DolphinFlow8bit with
  ``compiled=True``.

``--baseline DIR`` also runs every ShardFlow row with the ``shardflow`` package of another
checkout (``git worktree add /tmp/base HEAD``), loaded into this process beside the working
tree's (its modules are imported from ``DIR`` under the same names, kept, and the working tree's
put back; lazy imports inside its functions then resolve to the working tree's modules, which
only the 8-bit code tables use): rows named ``<row>@base``, stepped round-robin with the others,
so both trees' ratios to fused AdamW come from the same run.

Every optimizer gets the same parameter groups: hidden matrices (every 2-D layer weight) are
orthogonalized, the embedding (tied head) and the norm gains are updated element-wise
(:func:`shardflow.optim.routing.param_groups`). The optimizers share one set of parameters and
one set of gradients, and are stepped round-robin, the starting one rotating every round, so
that drift and other load on the machine hit them all alike. A NaN anywhere fails the run.

Ratios: every row against fused AdamW; matrix-mode rows also against Muon + AdamW with the same
number of Newton-Schulz steps in the same dtype. Results go to
``bench/results/step-<machine>-<date>.md`` with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.shapes import SMOLLM2_135M, build_model, random_grads
from shardflow.optim.dolphinflow import DolphinFlow
from shardflow.optim.routing import param_groups

RESULTS = Path(__file__).resolve().parent / "results"
LR = 1e-4
WEIGHT_DECAY = 0.01


# -- contenders -------------------------------------------------------------------------------


@dataclass
class Contender:
    """One optimizer (or a pair stepped together) under test."""

    name: str
    optimizers: list[Any]
    """Stepped in order as one step (torch optimizers, or anything with ``step`` and ``state``)."""
    mutates_grads: bool = False
    """True when ``step`` changes ``p.grad`` (it then gets fresh copies, outside the timing)."""
    anchor: str | None = None
    """Name of the Muon row this one is compared with (matrix modes)."""
    note: str = ""
    times: list[float] = field(default_factory=list)
    first_step: float = 0.0
    """Wall time of the first (untimed) step: includes ``torch.compile`` for compiled rows."""

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_bytes_per_param(self, n_params: int) -> float:
        if len(self.optimizers) == 1 and hasattr(self.optimizers[0], "state_bytes_per_param"):
            return self.optimizers[0].state_bytes_per_param()
        return sum(state_tensor_bytes(o) for o in self.optimizers) / n_params


def state_tensor_bytes(opt: Any) -> int:
    """Bytes of an optimizer's state tensors; 0-d ones (step counters) are not counted."""
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, Tensor) and v.numel() > 1
    )


class ClipThen:
    """``clip_grad_norm_(max_norm)`` then the wrapped optimizer's step: what DolphinFlow's default
    ``gradient_clipping=1.0`` does inside its step, done the way AdamW users do it."""

    def __init__(self, inner: torch.optim.Optimizer, max_norm: float) -> None:
        self.inner, self.max_norm = inner, max_norm
        self.state = inner.state
        self.param_groups = inner.param_groups

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        return self.inner.step(closure)


def split_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, the rest), as :func:`param_groups` routes them."""
    groups = param_groups(model)
    hidden = [p for g in groups if "ortho_mode" not in g for p in g["params"]]
    rest = [p for g in groups if "ortho_mode" in g for p in g["params"]]
    return hidden, rest


def dolphinflow(model: nn.Module, ns_steps: int, cls: Any = DolphinFlow, **kw: Any) -> Any:
    """ShardFlow's DolphinFlow (or ``cls``) with the routing groups; Newton-Schulz fixed at
    ``ns_steps``."""
    return cls(
        param_groups(model),
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        ns_min_steps=ns_steps,
        ns_max_steps=ns_steps,
        **kw,
    )


def adamw(params: list[nn.Parameter], **kw: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **kw)


def muon_pair(model: nn.Module, ns_steps: int) -> list[torch.optim.Optimizer]:
    """torch.optim.Muon (momentum 0.95, Nesterov) on hidden matrices + fused AdamW on the rest."""
    hidden, rest = split_groups(model)
    muon = torch.optim.Muon(hidden, lr=LR, weight_decay=WEIGHT_DECAY, ns_steps=ns_steps)
    return [muon, adamw(rest, fused=True)]


class Fp32MuonNS(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz runs in fp32 instead of bf16; nothing else changes.

    torch casts the update to bf16 before Newton-Schulz (``torch/optim/_muon.py``); CPUs without
    bf16 matrix units run that ~15x slower than fp32, which would make any fp32 implementation
    look fast. This twin swaps torch's module-level NS function for the same quintic iteration
    (coefficients and normalization as torch's) in fp32, only while its own ``step`` runs.
    """

    def step(self, closure=None):  # type: ignore[override]
        from torch.optim import _muon  # noqa: PLC0415 - private module, bench only

        original = _muon._zeropower_via_newtonschulz
        _muon._zeropower_via_newtonschulz = _ns_fp32
        try:
            return super().step(closure)
        finally:
            _muon._zeropower_via_newtonschulz = original


def _ns_fp32(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float):
    """Quintic Newton-Schulz ``X ← aX + (bA + cA²)X``, ``A = XXᵀ``, on the short side, in fp32."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().mT if tall else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_fp32_pair(model: nn.Module, ns_steps: int) -> list[torch.optim.Optimizer]:
    hidden, rest = split_groups(model)
    muon = Fp32MuonNS(hidden, lr=LR, weight_decay=WEIGHT_DECAY, ns_steps=ns_steps)
    return [muon, adamw(rest, fused=True)]


def peer(model: nn.Module, mode: str | None, ns_steps: int) -> torch.optim.Optimizer | None:
    """The published dolphinflow 0.2.0 with the same routing groups, or None if not installed."""
    try:
        import dolphinflow  # noqa: PLC0415 - optional anchor
    except ImportError:
        return None
    hidden, rest = split_groups(model)
    groups = [{"params": hidden, "ortho_mode": mode}, {"params": rest, "ortho_mode": None}]
    return dolphinflow.DolphinFlow(
        groups, lr=LR, weight_decay=WEIGHT_DECAY, ns_steps=ns_steps, ortho_mode=mode
    )


CATALOG: dict[str, str] = {
    "adamw-foreach": "torch.optim.AdamW(foreach=True)",
    "adamw-fused": "torch.optim.AdamW(fused=True)",
    "adamw-fused-clip": "clip_grad_norm_(1.0) + torch.optim.AdamW(fused=True)",
    "muon-fp32": "torch.optim.Muon, NS in fp32 (+ fused AdamW on the rest)",
    "muon-bf16": "torch.optim.Muon as shipped, NS in bf16 (+ fused AdamW on the rest)",
    "df-vector": "DolphinFlow ortho_mode=vector (rowwise), compiled=False (CPU: native kernel)",
    "df-vector-compiled": "DolphinFlow ortho_mode=vector (rowwise), compiled=True",
    "df-vector-default": "DolphinFlow ortho_mode=vector (rowwise), default arguments",
    "df8-vector": "DolphinFlow8bit ortho_mode=vector (rowwise), default arguments",
    "df8-vector-compiled": "DolphinFlow8bit ortho_mode=vector (rowwise), compiled=True",
    "df-vector-flat": "DolphinFlow ortho_mode=vector, vector_mode=flat",
    "df-vector-noadapt": "DolphinFlow ortho_mode=vector, adaptive_lr=False",
    "df-block": "DolphinFlow ortho_mode=block, block_size=128",
    "df-matrix": "DolphinFlow ortho_mode=matrix (NS fp32 on CPU)",
    "df-matrix-compiled": "DolphinFlow ortho_mode=matrix, compiled=True (element-wise params)",
    "df-matrix-bf16": "DolphinFlow ortho_mode=matrix, ns_dtype=bf16",
    "df-none": "DolphinFlow ortho_mode=None",
    "peer-vector": "dolphinflow 0.2.0, ortho_mode=vector",
    "peer-matrix": "dolphinflow 0.2.0, ortho_mode=matrix",
}
DEFAULT = [
    "adamw-foreach",
    "adamw-fused",
    "adamw-fused-clip",
    "muon-fp32",
    "df-vector",
    "df-vector-compiled",
    "df-vector-flat",
    "df-vector-noadapt",
    "df-block",
    "df-matrix",
    "df-matrix-compiled",
    "df-none",
    "peer-vector",
]
"""Run by default; ``muon-bf16``, ``df-matrix-bf16`` and ``peer-matrix`` are opt-in (``--only``):
bf16 matrix products run at ~1 GFLOP/s on an AVX2 CPU, and the package's matrix mode squares
tall matrices on the long side (a 1536² Gram matrix for gate/up)."""


def classes(root: str | None = None) -> dict[str, Any]:
    """ShardFlow's optimizer classes by row prefix, from the working tree or (``root``) from the
    ``shardflow`` package of another checkout, loaded beside the working tree's."""
    if root is None:
        from shardflow.optim.dolphinflow8bit import DolphinFlow8bit  # noqa: PLC0415

        return {"df": DolphinFlow, "df8": DolphinFlow8bit}
    import importlib  # noqa: PLC0415

    def ours(name: str) -> bool:
        return name == "shardflow" or name.startswith("shardflow.")

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(Path(root).resolve()))
    try:
        df = importlib.import_module("shardflow.optim.dolphinflow")
        df8 = importlib.import_module("shardflow.optim.dolphinflow8bit")
        if not Path(df.__file__).resolve().is_relative_to(Path(root).resolve()):
            raise SystemExit(f"--baseline {root}: no shardflow package there")
        return {"df": df.DolphinFlow, "df8": df8.DolphinFlow8bit}
    finally:
        sys.path.remove(str(Path(root).resolve()))
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


BASE = "@base"
"""Suffix of the rows run with ``--baseline``'s package."""


def make_contender(
    name: str, model: nn.Module, ns: int, base: dict[str, Any] | None = None
) -> Contender | None:
    """Build one contender by catalog name (``<name>@base``: with ``base``'s classes); None
    when its package is missing."""
    found = classes() if not name.endswith(BASE) else base
    row = name.removesuffix(BASE)
    hidden, rest = split_groups(model)
    everything = hidden + rest
    if row.startswith("df8-"):
        kw = {"compiled": True} if row.endswith("-compiled") else {}
        opt = dolphinflow(model, ns, found["df8"], ortho_mode="vector", **kw)
        return Contender(name, [opt])
    if name == "adamw-foreach":
        return Contender(name, [adamw(everything, foreach=True)])
    if name == "adamw-fused":
        return Contender(name, [adamw(everything, fused=True)])
    if name == "adamw-fused-clip":
        return Contender(name, [ClipThen(adamw(everything, fused=True), 1.0)], mutates_grads=True)
    if name == "muon-fp32":
        return Contender(name, muon_fp32_pair(model, ns))
    if name == "muon-bf16":
        return Contender(name, muon_pair(model, ns))
    modes: dict[str, dict[str, Any]] = {
        "df-vector": dict(ortho_mode="vector", compiled=False),
        "df-vector-compiled": dict(ortho_mode="vector", compiled=True),
        "df-vector-default": dict(ortho_mode="vector"),
        "df-vector-flat": dict(ortho_mode="vector", vector_mode="flat"),
        "df-vector-noadapt": dict(ortho_mode="vector", adaptive_lr=False),
        "df-block": dict(ortho_mode="block", block_size=128),
        "df-matrix": dict(ortho_mode="matrix"),
        "df-matrix-compiled": dict(ortho_mode="matrix", compiled=True),
        "df-matrix-bf16": dict(ortho_mode="matrix", ns_dtype=torch.bfloat16),
        "df-none": dict(ortho_mode=None),
    }
    if row in modes:
        anchor = {
            "df-matrix": "muon-fp32",
            "df-matrix-compiled": "muon-fp32",
            "df-matrix-bf16": "muon-bf16",
        }.get(row)
        opt = dolphinflow(model, ns, found["df"], **modes[row])
        return Contender(name, [opt], anchor=anchor)
    if name in ("peer-vector", "peer-matrix"):
        opt = peer(model, name.removeprefix("peer-"), ns)
        if opt is None:
            return None
        anchor = "muon-fp32" if name == "peer-matrix" else None
        return Contender(name, [opt], mutates_grads=True, anchor=anchor)
    raise ValueError(f"unknown optimizer {name!r}: choose from {', '.join(CATALOG)}")


# -- the run ----------------------------------------------------------------------------------


def set_grads(params: list[tuple[str, nn.Parameter]], grads: dict[str, Tensor], fresh: bool):
    for name, p in params:
        p.grad = grads[name].clone() if fresh else grads[name]


def run_round_robin(
    contenders: list[Contender],
    params: list[tuple[str, nn.Parameter]],
    grads: dict[str, Tensor],
    warmup: int,
    steps: int,
    log: Callable[[str], None],
) -> None:
    """``warmup + steps`` rounds; each round steps every contender once, in rotated order."""
    n = len(contenders)
    for r in range(warmup + steps):
        t_round = time.perf_counter()
        for k in range(n):
            c = contenders[(r + k) % n]
            set_grads(params, grads, c.mutates_grads)
            t0 = time.perf_counter()
            c.step()
            elapsed = time.perf_counter() - t0
            if r == 0:
                c.first_step = elapsed
            if r >= warmup:
                c.times.append(elapsed)
        kind = "warm-up" if r < warmup else "timed"
        log(f"  round {r + 1}/{warmup + steps} ({kind}): {time.perf_counter() - t_round:.1f} s")


def check_finite(model: nn.Module, contenders: list[Contender]) -> None:
    """Fail when a weight went non-finite or DolphinFlow skipped a step (timings would lie)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"parameter {name} is not finite after the run")
    for c in contenders:
        skipped = sum(getattr(o, "nonfinite_steps", 0) for o in c.optimizers)
        if skipped:
            raise RuntimeError(f"{c.name} skipped {skipped} steps on non-finite gradients")


def table(contenders: list[Contender], n_params: int) -> list[str]:
    by_name = {c.name: c for c in contenders}
    fused = by_name.get("adamw-fused")
    base = statistics.median(fused.times) if fused else None
    lines = [
        "| optimizer | what | median ms | min ms | × AdamW fused | × Muon+AdamW | state B/param |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in contenders:
        med = statistics.median(c.times)
        vs_adamw = f"{med / base:.2f}" if base else "–"
        anchor = by_name.get(c.anchor) if c.anchor else None
        vs_muon = f"{med / statistics.median(anchor.times):.2f}" if anchor else "–"
        lines.append(
            f"| {c.name} | {describe(c.name)} | {med * 1e3:.1f} | {min(c.times) * 1e3:.1f} | "
            f"{vs_adamw} | {vs_muon} | {c.state_bytes_per_param(n_params):.2f} |"
        )
    return lines


def describe(name: str) -> str:
    row = name.removesuffix(BASE)
    return CATALOG[row] + (" (the --baseline checkout)" if row != name else "")


# -- profile ----------------------------------------------------------------------------------


def profile(
    contenders: list[Contender],
    names: list[str],
    params: list[tuple[str, nn.Parameter]],
    grads: dict[str, Tensor],
    steps: int,
    rows: int,
) -> list[str]:
    """torch.profiler op tables (self CPU time) over ``steps`` steps of the named contenders."""
    from torch.profiler import ProfilerActivity  # noqa: PLC0415
    from torch.profiler import profile as torch_profile  # noqa: PLC0415

    out = []
    for c in contenders:
        if c.name not in names:
            continue
        set_grads(params, grads, c.mutates_grads)
        c.step()  # warm
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                set_grads(params, grads, c.mutates_grads)
                c.step()
        text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        out += [f"### {c.name}: {describe(c.name)} ({steps} steps)", "", "```", text, "```", ""]
    return out


# -- main -------------------------------------------------------------------------------------


def machine() -> tuple[str, str]:
    """(short machine tag, lscpu model line)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (ln.strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
            platform.processor(),
        )
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or "unknown CPU"
    return f"cpu{torch.get_num_threads()}", " ".join(model.split())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (SmolLM2-135M has 30)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (median over them)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--ns-steps", type=int, default=5, help="Newton-Schulz steps for every NS mode")
    ap.add_argument(
        "--only", default=None, help=f"comma list of optimizers (default: {','.join(DEFAULT)})"
    )
    ap.add_argument("--profile", action="store_true", help="also profile df-vector vs adamw-fused")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument(
        "--baseline",
        default=None,
        help="another checkout (e.g. a git worktree of the parent commit): every ShardFlow row "
        "also runs with its shardflow package, as <row>@base, in the same rounds",
    )
    ap.add_argument("--out", default=None, help="results file (default bench/results/step-...md)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = args.only.split(",") if args.only else DEFAULT
    for name in names:
        if name.removesuffix(BASE) not in CATALOG:
            raise SystemExit(
                f"--only: unknown optimizer {name!r}; choose from {', '.join(CATALOG)}"
            )
    log = print
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = SMOLLM2_135M.with_layers(args.layers)
    model = build_model(shapes, device="cpu", seed=0)
    grads = random_grads(model, seed=1)
    params = list(model.named_parameters())
    n_params = sum(p.numel() for _, p in params)
    hidden, _ = split_groups(model)
    n_hidden = sum(p.numel() for p in hidden)
    log(
        f"SmolLM2-135M shapes, {args.layers} layers: {n_params / 1e6:.1f} M params "
        f"({n_hidden / 1e6:.1f} M in hidden matrices, the rest embedding + norms); "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )

    base = None
    if args.baseline:
        base = classes(args.baseline)
        names = [*names, *(n + BASE for n in names if n.startswith("df") and BASE not in n)]
    contenders, notes = [], []
    for name in names:
        c = make_contender(name, model, args.ns_steps, base)
        if c is None:
            notes.append(f"{name}: skipped, the `dolphinflow` package is not installed")
            log(f"note: {notes[-1]}")
            continue
        contenders.append(c)
    grad_sum = sum(float(g.double().sum()) for g in grads.values())
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    run_round_robin(contenders, params, grads, args.warmup, args.steps, log)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    check_finite(model, contenders)
    if abs(sum(float(g.double().sum()) for g in grads.values()) - grad_sum) > 1e-9 * max(
        1.0, abs(grad_sum)
    ):
        raise RuntimeError("a contender not marked mutates_grads changed the shared gradients")

    lines = table(contenders, n_params)
    for c in contenders:
        if "compiled" in c.name:
            notes.append(
                f"{c.name}: first step {c.first_step:.1f} s (includes torch.compile; in the "
                "warm-up round, not in the median)"
            )
            log(f"note: {notes[-1]}")
    log("")
    log("\n".join(lines))
    prof_lines: list[str] = []
    if args.profile:
        prof_lines = profile(
            contenders,
            ["adamw-fused", "df-vector", "df-vector-compiled"],
            params,
            grads,
            args.profile_steps,
            25,
        )
        log("\n".join(prof_lines))

    tag, cpu = machine()
    date = datetime.date.today().isoformat()
    command = "/work/venv/bin/python -m bench.step " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    report = [
        f"# Optimizer step time — SmolLM2-135M shapes, {args.layers} layers — {tag}, {date}",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {cpu}, {torch.get_num_threads()} threads (`lscpu` model line)",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- model: {n_params / 1e6:.2f} M params, {n_hidden / 1e6:.2f} M in hidden matrices "
        f"(orthogonalized), rest element-wise (embedding, tied head, norms)",
        *([f"- baseline (`@base` rows): the shardflow package of {args.baseline}"] if base else []),
        f"- rounds: {args.warmup} warm-up + {args.steps} timed, round-robin; Newton-Schulz steps "
        f"{args.ns_steps} for every NS mode; run wall time {wall:.0f} s",
        f"- caveat: 2 CPU cores shared with other engineers' jobs (1-min load average "
        f"{load_before:.1f} before, {load_after:.1f} after the timed rounds); medians damp that, "
        "but compare ratios within a run, and expect them to move between runs",
        *[f"- {n}" for n in notes],
        "",
        *lines,
        "",
    ]
    if prof_lines:
        report += ["## Profile", "", *prof_lines]
    if not args.no_write:
        out = Path(args.out) if args.out else RESULTS / f"step-{tag}-{date}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(report))
        log(f"\nwrote {out}")


if __name__ == "__main__":
    main()
