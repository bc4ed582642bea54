"""Factored optimizers: state bytes/param, step time against torch AdamW, small convergence run.

Run (CPU, ~10 min on a 2-core machine; each part can run alone):

    /work/venv/bin/python bench/factored.py memory
    /work/venv/bin/python bench/factored.py speed [--rounds 7]
    /work/venv/bin/python bench/factored.py convergence [--steps 300]

- ``memory``: state bytes/param on SmolLM2-135M shapes (hidden 576, MLP 1536, 9 heads, 3 kv heads
  of dim 64, vocab 49152 tied, 30 layers; shapes only, built on the ``meta`` device) and on one
  768×1024 matrix, against adv_optm 2.5.16's ≈0.14 (ANCHORS.md) and AdamW's 8.
- ``speed``: optimizer step time on one SmolLM2 decoder layer's weights (3.5 M params) and on a
  768×1024 matrix: torch AdamW fused and foreach (the anchors) and FactoredAdam (factored and
  dense), measured interleaved round by round in one process; medians and ratios printed.
- ``convergence``: a byte-level 2-layer transformer LM on the running Python's standard library
  sources, FactoredAdam factored vs ``factored=False`` vs torch AdamW, same seed and data; the
  validation loss at the end and the ratio. A small stand-in for the runtime's 1000-step
  benchmark (which this CPU cannot run), reported as such.

Results are appended to ``bench/results/factored-cpu-<date>.md`` with the command and machine.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardflow.optim.factored import FactoredAdam, FactoredAdopt, FactoredProdigy  # noqa: E402
from shardflow.optim.memory import estimate_state_footprint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def smollm2_135m_shapes() -> dict[str, tuple[int, ...]]:
    """Weight shapes of SmolLM2-135M (Llama architecture, tied embeddings), (out, in) order."""
    hidden, mlp, heads, kv_heads, head_dim, vocab, layers = 576, 1536, 9, 3, 64, 49152, 30
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (vocab, hidden)}
    for i in range(layers):
        shapes.update(_layer_shapes(i, hidden, mlp, heads * head_dim, kv_heads * head_dim))
    shapes["norm"] = (hidden,)
    return shapes


def _layer_shapes(i, hidden, mlp, q_out, kv_out):
    p = f"layers.{i}."
    return {
        p + "q_proj": (q_out, hidden),
        p + "k_proj": (kv_out, hidden),
        p + "v_proj": (kv_out, hidden),
        p + "o_proj": (hidden, q_out),
        p + "gate_proj": (mlp, hidden),
        p + "up_proj": (mlp, hidden),
        p + "down_proj": (hidden, mlp),
        p + "input_layernorm": (hidden,),
        p + "post_attention_layernorm": (hidden,),
    }


def memory() -> list[str]:
    model = smollm2_135m_shapes()
    matrix = {"w": (768, 1024)}
    n_params = sum(math.prod(s) for s in model.values())
    configs = [
        ("torch AdamW", torch.optim.AdamW, {}),
        ("FactoredAdam", FactoredAdam, {}),
        ("FactoredAdam grams", FactoredAdam, {"grams": True}),
        ("FactoredAdam ademamix", FactoredAdam, {"ademamix": True}),
        ("FactoredAdopt", FactoredAdopt, {}),
        ("FactoredProdigy slice_p=11", FactoredProdigy, {}),
        ("FactoredProdigy slice_p=64", FactoredProdigy, {"slice_p": 64}),
        ("FactoredAdam factored=False", FactoredAdam, {"factored": False}),
    ]
    lines = [
        f"SmolLM2-135M shapes: {n_params:,} params; 768x1024 matrix: 786,432 params.",
        "",
        "| optimizer | SmolLM2-135M B/param | of which sign | 768x1024 B/param | vs adv_optm 0.1432 |",
        "|---|---|---|---|---|",
    ]
    for name, factory, hyper in configs:
        fm = estimate_state_footprint(factory, model, **hyper)
        fw = estimate_state_footprint(factory, matrix, **hyper)
        signs = sum(v for k, v in fm.by_key.items() if k.endswith("_sign")) / fm.param_elements
        lines.append(
            f"| {name} | {fm.bytes_per_param:.4f} | {signs:.4f} | {fw.bytes_per_param:.4f} | "
            f"{fw.bytes_per_param / 0.1432:.3f}x |"
        )
    fm = estimate_state_footprint(FactoredAdam, model)
    lines += ["", "FactoredAdam on SmolLM2-135M, by state key:", "```", fm.describe(), "```"]
    return lines


def _time_steps(opt, params, grads, steps):
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # warm-up (state, lazy init)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps


def speed(rounds: int) -> list[str]:
    layer = _layer_shapes(0, 576, 1536, 576, 192)
    cases = {"SmolLM2 layer (3.5M)": layer, "768x1024": {"w": (768, 1024)}}
    contenders = {
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "FactoredAdam": lambda ps: FactoredAdam(ps, lr=1e-4),
        "FactoredAdam dense": lambda ps: FactoredAdam(ps, lr=1e-4, factored=False),
    }
    lines = [
        f"torch threads: {torch.get_num_threads()}; {rounds} interleaved rounds of 5 steps; "
        "median ms/step",
        "",
        "| weights | " + " | ".join(contenders) + " | FactoredAdam / fused | / foreach |",
        "|---|" + "---|" * (len(contenders) + 2),
    ]
    for case, shapes in cases.items():
        torch.manual_seed(0)
        params = {
            n: [torch.nn.Parameter(torch.randn(s)) for s in shapes.values()] for n in contenders
        }
        grads = [torch.randn(s) for s in shapes.values()]
        opts = {n: make(params[n]) for n, make in contenders.items()}
        times: dict[str, list[float]] = {n: [] for n in contenders}
        for _ in range(rounds):
            for n in contenders:
                times[n].append(_time_steps(opts[n], params[n], grads, 5))
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        lines.append(
            f"| {case} | "
            + " | ".join(f"{med[n]:.1f}" for n in contenders)
            + f" | {med['FactoredAdam'] / med['AdamW fused']:.2f}x"
            + f" | {med['FactoredAdam'] / med['AdamW foreach']:.2f}x |"
        )
    return lines


# -- convergence --------------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    """Byte-level decoder: 2 pre-norm transformer blocks, d=128, 4 heads, tied embedding."""

    def __init__(self, d=128, layers=2, heads=4, ctx=128):
        super().__init__()
        self.embed = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Parameter(torch.randn(ctx, d) * 0.02)
        block = torch.nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t)
        h = self.blocks(self.embed(x) + self.pos[:t], mask=mask, is_causal=True)
        return self.norm(h) @ self.embed.weight.T


def _corpus(limit: int = 4_000_000) -> torch.Tensor:
    root = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def convergence(steps: int) -> list[str]:
    data = _corpus()
    split = int(len(data) * 0.95)
    train, val = data[:split], data[split:]
    ctx, batch = 128, 16
    g_val = torch.Generator().manual_seed(1)
    val_idx = torch.randint(0, len(val) - ctx - 1, (32,), generator=g_val)
    xv = torch.stack([val[i : i + ctx] for i in val_idx])
    yv = torch.stack([val[i + 1 : i + ctx + 1] for i in val_idx])
    contenders = {
        "FactoredAdam factored": lambda ps: FactoredAdam(ps, lr=2e-3, weight_decay=0.01),
        "FactoredAdam factored=False": lambda ps: FactoredAdam(
            ps, lr=2e-3, weight_decay=0.01, factored=False
        ),
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=2e-3, weight_decay=0.01),
    }
    results, curves = {}, {}
    for name, make in contenders.items():
        torch.manual_seed(0)
        model = TinyLM(ctx=ctx)
        opt = make(model.parameters())
        g = torch.Generator().manual_seed(2)
        curve = []
        start = time.perf_counter()
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(train) - ctx - 1, (batch,), generator=g)
            x = torch.stack([train[i : i + ctx] for i in idx])
            y = torch.stack([train[i + 1 : i + ctx + 1] for i in idx])
            lr_scale = min(1.0, step / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
                group["lr"] = group["base_lr"] * lr_scale
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % (steps // 5) == 0 or step == steps:
                with torch.no_grad():
                    vl = torch.nn.functional.cross_entropy(model(xv).flatten(0, 1), yv.flatten())
                curve.append((step, round(vl.item(), 4)))
        results[name] = curve[-1][1]
        curves[name] = (curve, time.perf_counter() - start)
    ref = results["FactoredAdam factored=False"]
    lines = [
        f"TinyLM (2 blocks, d=128, byte-level, {sum(p.numel() for p in model.parameters()):,} "
        f"params), {steps} steps, batch {batch}x{ctx}, lr 2e-3 cosine with 30-step warm-up, "
        f"wd 0.01; val = 32 fixed windows of held-out stdlib source.",
        "",
        "| optimizer | val loss @ end | vs factored=False | curve (step, val) | wall s |",
        "|---|---|---|---|---|",
    ]
    for name, (curve, wall) in curves.items():
        lines.append(
            f"| {name} | {results[name]:.4f} | {results[name] / ref - 1:+.2%} | {curve} | "
            f"{wall:.0f} |"
        )
    return lines


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        lscpu = []
    head = [ln for ln in lscpu if ln.split(":")[0] in ("Architecture", "CPU(s)", "Model name")]
    return (
        f"{platform.node()}: "
        + "; ".join(" ".join(ln.split()) for ln in head)
        + (f"; torch {torch.__version__}")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["memory", "speed", "convergence"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    lines = {"memory": memory, "speed": lambda: speed(args.rounds)}.get(
        args.part, lambda: convergence(args.steps)
    )()
    today = datetime.date.today().isoformat()
    header = [
        f"## {args.part} — {today}",
        "",
        f"Command: `/work/venv/bin/python bench/factored.py {' '.join(sys.argv[1:])}`",
        f"Machine: {_machine()}",
        "",
    ]
    text = "\n".join(header + lines) + "\n\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"factored-cpu-{today}.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
