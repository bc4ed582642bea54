"""Prototype: DolphinFlow vector mode's step in two passes, to measure what is achievable on CPU.

Run from the repository root::

    /work/venv/bin/python -m bench.proto_vector_step            # 4 layers, ~2 min incl. compile
    /work/venv/bin/python -m bench.proto_vector_step --layers 30 --steps 5

Not a library optimizer: a measuring stick for ``shardflow.optim.dolphinflow`` (vector mode,
``adaptive_lr=True``, Nesterov, ``restore_norm``, constant momentum, no trust region). It first
checks that it computes the same numbers as ``DolphinFlow`` (fp32, 3 steps, small vocab), then
times, interleaved round-robin on SmolLM2-135M's shapes: fused AdamW, ``DolphinFlow`` as it is,
and this step with its element-wise pass compiled (``torch.compile``, inductor C++) and eager.

The step touches memory twice instead of ~15 times:

1. **Sums pass** (reads ``g`` and ``w``): per row of every hidden matrix ``(⟨g,w⟩, ‖w‖², ‖g‖²)``
   (one row for the whole tensor in ``flat`` mode); ``‖g‖²`` for the element-wise params. The
   ``‖g‖²`` terms add up to the global gradient norm, so clipping and the NaN check come free.
2. **Host scalars**: clip scale ``s``, bias corrections; for each row the ⊥Grad coefficients
   folded into two numbers, ``g⊥ = a·g − b·w`` with ``a = s·f``, ``b = s·f·⟨g,w⟩/‖w‖²`` and
   ``f = √(‖g‖² / ‖g⊥‖²)`` (restore_norm; ⊥Grad is scale invariant so the raw sums serve).
   Element-wise params get ``a = s``, ``b = 0``.
3. **Update pass**, one fused loop per parameter (reads ``w, g, m, v``, writes ``w, m, v``, as
   fused AdamW does): ``g⊥ = a·g − b·w``; ``v ← β₂v + (1−β₂)g⊥²``; ``m ← m + (1−μ)(g⊥ − m)``;
   ``u = (μm + (1−μ)g⊥)/W / (√(v/(1−β₂ᵗ)) + eps)``; ``w ← w(1 − lr·wd) − lr·u``, with
   ``W = μ(1−μᵗ) + 1 − μ`` the Nesterov average's bias correction.

Hyperparameters reach the compiled function as 0-d tensors, so changing values (bias
corrections every step, an LR schedule) never recompiles. Shapes are static: one graph per
distinct (shape, dtype) — 5 for SmolLM2 (4 matrix shapes, the embedding, the norms), so the
dynamo recompile limit (8 by default) is raised to :data:`RECOMPILE_LIMIT`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bench.shapes import SMOLLM2_135M, build_model, random_grads
from bench.step import LR, WEIGHT_DECAY, split_groups
from shardflow.optim.dolphinflow import DolphinFlow
from shardflow.optim.routing import param_groups

RECOMPILE_LIMIT = 64


def row_sums(g: Tensor, w: Tensor) -> Tensor:
    """``(rows, 3)``: per row ``(⟨g,w⟩, ‖w‖², ‖g‖²)`` of two ``(rows, cols)`` tensors."""
    return torch.stack([(g * w).sum(1), (w * w).sum(1), (g * g).sum(1)], dim=1)


def update(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    lr: Tensor,
    decay: Tensor,
    mu: Tensor,
    beta2: Tensor,
    inv_weight: Tensor,
    v_debias: Tensor,
    eps: Tensor,
) -> None:
    """The element-wise chain of DolphinFlow's step, in place on ``w``, ``m``, ``v``."""
    gp = a * g - b * w
    v.copy_(beta2 * v + (1 - beta2) * gp * gp)
    m.copy_(m + (1 - mu) * (gp - m))
    u = (mu * m + (1 - mu) * gp) * inv_weight / (torch.sqrt(v * v_debias) + eps)
    w.copy_(w * decay - lr * u)


def update_eager(w, g, m, v, a, b, lr, decay, mu, beta2, inv_weight, v_debias, eps) -> None:
    """Same as :func:`update` with in-place eager ops and one scratch buffer (``g`` reused)."""
    g.mul_(a).addcmul_(b, w, value=-1.0)  # g⊥ = a·g − b·w, b broadcast over rows
    v.mul_(beta2).addcmul_(g, g, value=float(1 - beta2))
    m.lerp_(g, float(1 - mu))
    g.lerp_(m, float(mu)).mul_(inv_weight)
    w.mul_(decay).addcdiv_(g, v.mul(v_debias).sqrt_().add_(eps), value=-float(lr))


@dataclasses.dataclass
class TwoPassVector:
    """DolphinFlow vector mode (see the module docstring) over (hidden, element-wise) params."""

    hidden: list[nn.Parameter]
    rest: list[nn.Parameter]
    lr: float = LR
    weight_decay: float = WEIGHT_DECAY
    momentum: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    clip: float | None = 1.0
    rowwise: bool = True
    compiled: bool = True

    def __post_init__(self) -> None:
        self.m = {p: torch.zeros_like(p) for p in self.hidden + self.rest}
        self.v = {p: torch.zeros_like(p) for p in self.hidden + self.rest}
        self.t = 0
        self.nonfinite_steps = 0
        if self.compiled:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
            self._sums = torch.compile(row_sums, dynamic=False, fullgraph=True)
            self._update: Callable = torch.compile(update, dynamic=False, fullgraph=True)
        else:
            self._sums, self._update = row_sums, update_eager

    def _rows(self, t: Tensor) -> Tensor:
        return t.reshape(t.size(0), -1) if self.rowwise else t.reshape(1, -1)

    @torch.no_grad()
    def step(self) -> None:
        hidden = [p for p in self.hidden if p.grad is not None]
        rest = [p for p in self.rest if p.grad is not None]
        sums = [self._sums(self._rows(p.grad), self._rows(p)) for p in hidden]
        rows = torch.cat(sums) if sums else torch.zeros(0, 3, dtype=torch.float64)
        rest_sq = [torch.linalg.vector_norm(p.grad).square() for p in rest]
        total = float(rows[:, 2].double().sum() + sum(x.double() for x in rest_sq))
        if total != total or total == float("inf"):
            self.nonfinite_steps += 1
            return
        s = 1.0 if self.clip is None else min(1.0, self.clip / (total**0.5 + 1e-6))
        a, b = self._fold(rows, s)
        self.t += 1
        mu, beta2 = self.momentum, self.beta2
        weight = mu * (1 - mu**self.t) + (1 - mu)
        dtype = (hidden + rest)[0].dtype
        scalars = [
            torch.tensor(x, dtype=dtype)
            for x in (
                self.lr,
                1 - self.lr * self.weight_decay,
                mu,
                beta2,
                1 / weight,
                1 / (1 - beta2**self.t),
                self.eps,
            )
        ]
        counts = [s_.size(0) for s_ in sums]
        for p, ai, bi in zip(hidden, a.split(counts), b.split(counts)):
            shape = (-1,) + (1,) * (p.ndim - 1) if self.rowwise else ()
            self._update(
                p, p.grad, self.m[p], self.v[p], ai.reshape(shape), bi.reshape(shape), *scalars
            )
        a_rest, b_rest = torch.tensor(s, dtype=dtype), torch.zeros((), dtype=dtype)
        for p in rest:
            self._update(p, p.grad, self.m[p], self.v[p], a_rest, b_rest, *scalars)

    @staticmethod
    def _fold(rows: Tensor, s: float) -> tuple[Tensor, Tensor]:
        """Per row ``(a, b)`` with ``g⊥·restore = a·g − b·w`` (see the module docstring)."""
        gw, ww, gg = rows.unbind(1)
        tiny = torch.finfo(rows.dtype).tiny
        coef = torch.where(ww > 0, gw / ww.clamp_min(tiny), torch.zeros_like(gw))
        after = (gg - coef * gw).clamp_min(gg * 1e-12)
        f = torch.where(gg > 0, (gg / after.clamp_min(tiny)).sqrt(), torch.ones_like(gg))
        return s * f, s * f * coef

    def state_bytes_per_param(self) -> float:
        n = sum(p.numel() for p in self.m)
        return sum(t.numel() * t.element_size() for t in [*self.m.values(), *self.v.values()]) / n


def check_against_dolphinflow(compiled: bool, steps: int = 3) -> float:
    """Max difference of weights vs ``DolphinFlow`` after ``steps``, relative to ``lr``.

    In float64 (small vocab, one layer), so that only a difference in the maths can show: the
    first steps divide by ``√v`` of a single gradient, which amplifies fp32 rounding. The bound,
    1e-6·lr, leaves room for DolphinFlow keeping its Nesterov bias correction (``momentum_weight``)
    in fp32 (≈1e-8 relative); a wrong formula differs by O(lr).
    """
    shapes = dataclasses.replace(SMOLLM2_135M, vocab=512).with_layers(1)
    f64 = dict(device="cpu", dtype=torch.float64)
    ref, mine = build_model(shapes, **f64), build_model(shapes, **f64)
    df = DolphinFlow(param_groups(ref), lr=1e-2, weight_decay=WEIGHT_DECAY, ortho_mode="vector")
    hidden, rest = split_groups(mine)
    proto = TwoPassVector(hidden, rest, lr=1e-2, compiled=compiled)
    for k in range(steps):
        grads = random_grads(ref, seed=10 + k, scale=1e-2 if k else 1.0)  # step 1 clips
        for model in (ref, mine):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
        df.step()
        proto.step()
    worst = 0.0
    for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
        err = float((p - q).detach().abs().max() / 1e-2)
        if not err < 1e-6:
            raise RuntimeError(f"prototype differs from DolphinFlow on {name}: rel {err:.2e}")
        worst = max(worst, err)
    return worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="DolphinFlow vector step prototype vs fused AdamW")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    err_c = check_against_dolphinflow(compiled=True)
    compile_s = time.perf_counter() - t0
    err_e = check_against_dolphinflow(compiled=False)
    print(
        f"matches DolphinFlow (float64, 3 steps): max |Δw|/lr {err_c:.1e} compiled, {err_e:.1e} eager"
    )
    print(f"first compiled use (2 graphs + checks, incl. compile): {compile_s:.1f} s")

    model = build_model(SMOLLM2_135M.with_layers(args.layers), device="cpu")
    grads = random_grads(model, seed=1)
    params = list(model.named_parameters())
    hidden, rest = split_groups(model)
    contenders: dict[str, object] = {
        "adamw-fused": torch.optim.AdamW(
            hidden + rest, lr=LR, weight_decay=WEIGHT_DECAY, fused=True
        ),
        "df-vector": DolphinFlow(
            param_groups(model), lr=LR, weight_decay=WEIGHT_DECAY, ortho_mode="vector"
        ),
        "proto-compiled": TwoPassVector(hidden, rest, compiled=True),
        "proto-eager": TwoPassVector(hidden, rest, compiled=False),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(args.warmup + args.steps):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            for n, p in params:
                p.grad = grads[n].clone() if name.startswith("proto") else grads[n]
            t = time.perf_counter()
            contenders[name].step()  # type: ignore[attr-defined]
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
    for n, p in params:
        if not torch.isfinite(p).all():
            raise RuntimeError(f"{n} is not finite")
    base = statistics.median(times["adamw-fused"])
    n_params = sum(p.numel() for _, p in params)
    print(
        f"\nSmolLM2-135M shapes, {args.layers} layers, {n_params / 1e6:.1f} M params, "
        f"{torch.get_num_threads()} threads"
    )
    print("| step | median ms | min ms | × AdamW fused |")
    print("|---|---:|---:|---:|")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
