"""DolphinFlow8bit against its anchors: state memory, CPU step time, convergence.

Run from the repository root (about 6 minutes on the shared 2-core CPU):

    /work/venv/bin/python -m bench.dolphinflow8bit all --out bench/results/dolphinflow8bit-cpu2core-2026-11-23.md

or one part: ``memory`` | ``step`` | ``convergence``. Needs bitsandbytes.

- **memory**: optimizer state bytes per parameter on SmolLM2-135M's shapes (hidden 576, MLP 1536,
  30 layers, 9 heads and 3 kv heads of dim 64, vocab 49152, tied embedding; built from random
  values, nothing downloaded), for DolphinFlow8bit, bitsandbytes' AdamW8bit (its state appears
  at the first step, taken with zero gradients) and DolphinFlow 32-bit. Target: ≤ 2.1 B/param.
- **step**: wall time of ``optimizer.step()`` alone (fixed random gradients) for DolphinFlow8bit
  and DolphinFlow 32-bit with the same ``compiled`` setting (eager, then ``compiled=True``),
  interleaved round-robin so machine load hits both alike; the median of the per-round ratios is
  printed. Two SmolLM2 layers (the hidden matrices, default vector mode), and the same layers plus
  the embedding with name routing. Target: ≤ 1.5×. On an x86-64 CPU with AVX2 the 8-bit step
  runs the native kernel (``shardflow.ops.native.quant8``), in the best build the CPU runs
  (``--isa avx2|avx512|avx512vbmi`` picks one); ``SHARDFLOW_NATIVE=0`` measures the torch path
  instead.
- **convergence**: a byte-level decoder (2 layers, width 192, 3 heads, MLP 768, context 128)
  trained for 200 steps on the running Python's standard library sources, 8-bit and 32-bit from
  the same initialization and batches; validation loss on held-out text. Target: within 1%.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import stdlib_bytes
from shardflow import DolphinFlow, param_groups
from shardflow.ops.native import quant8 as quant8_native
from shardflow.optim.dolphinflow8bit import DolphinFlow8bit

# -- SmolLM2-135M shapes ------------------------------------------------------------------------

HIDDEN, MLP, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 30, 9, 3, 64, 49152


def smollm2_params(layers: int = LAYERS, embedding: bool = True) -> dict[str, nn.Parameter]:
    """SmolLM2-135M's parameters by Hugging Face name (random values; tied head = embedding)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if embedding:
        shapes["model.embed_tokens.weight"] = (VOCAB, HIDDEN)
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes |= {
            pre + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            pre + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            pre + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            pre + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            pre + "mlp.gate_proj.weight": (MLP, HIDDEN),
            pre + "mlp.up_proj.weight": (MLP, HIDDEN),
            pre + "mlp.down_proj.weight": (HIDDEN, MLP),
            pre + "input_layernorm.weight": (HIDDEN,),
            pre + "post_attention_layernorm.weight": (HIDDEN,),
        }
    if embedding:
        shapes["model.norm.weight"] = (HIDDEN,)
    gen = torch.Generator().manual_seed(0)
    return {n: nn.Parameter(torch.randn(s, generator=gen) * 0.02) for n, s in shapes.items()}


def unique_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor storage in ``opt.state`` holding more than one value."""
    seen, total = set(), 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                ptr = value.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += value.untyped_storage().nbytes()
    return total


def bench_memory() -> list[str]:
    params = smollm2_params()
    n = sum(p.numel() for p in params.values())
    rows = [f"SmolLM2-135M shapes: {n / 1e6:.1f} M parameters in {len(params)} tensors", ""]
    rows += ["| optimizer | state MB | bytes/param | vs DolphinFlow 32-bit |", "|---|---|---|---|"]
    results = {}
    opt = DolphinFlow8bit(list(params.items()))
    results["DolphinFlow8bit"] = unique_state_bytes(opt)
    del opt
    import bitsandbytes as bnb  # noqa: PLC0415

    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt = bnb.optim.AdamW8bit(list(params.values()), lr=0.0)
    opt.step()
    results["bitsandbytes AdamW8bit"] = unique_state_bytes(opt)
    del opt
    for p in params.values():
        p.grad = None
    opt = DolphinFlow(list(params.items()))
    results["DolphinFlow 32-bit"] = unique_state_bytes(opt)
    del opt
    base = results["DolphinFlow 32-bit"]
    for name, b in results.items():
        rows.append(f"| {name} | {b / 2**20:.1f} | {b / n:.3f} | {b / base:.3f} |")
    return rows


# -- step time ----------------------------------------------------------------------------------


def _time_step(opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def bench_step(rounds: int = 7, compiled: tuple[bool, ...] = (False, True)) -> list[str]:
    """Step time of DolphinFlow8bit against DolphinFlow 32-bit with the same ``compiled``."""
    rows = [
        "| parameters | compiled | DolphinFlow ms | DolphinFlow8bit ms | median ratio (per round) |",
        "|---|---|---|---|---|",
    ]
    for label, embedding in (
        ("2 layers, hidden matrices (vector mode)", False),
        ("2 layers + embedding, name routing", True),
    ):
        for comp in compiled:
            contenders = {}
            for name, cls in (("32", DolphinFlow), ("8", DolphinFlow8bit)):
                params = smollm2_params(layers=2, embedding=embedding)
                if not embedding:
                    params = {k: p for k, p in params.items() if p.ndim == 2}
                gen = torch.Generator().manual_seed(1)
                for p in params.values():
                    p.grad = torch.randn(p.shape, generator=gen) * 1e-3
                opt = cls(list(params.items()), lr=1e-4, compiled=comp)
                _time_step(opt)  # warm-up (and compilation)
                _time_step(opt)
                contenders[name] = opt
            times: dict[str, list[float]] = {"32": [], "8": []}
            for _ in range(rounds):
                for name, opt in contenders.items():
                    times[name].append(_time_step(opt))
            ratio = statistics.median(b / a for a, b in zip(times["32"], times["8"]))
            n = sum(p.numel() for g in contenders["8"].param_groups for p in g["params"])
            rows.append(
                f"| {label} ({n / 1e6:.1f} M) | {comp} | {1e3 * statistics.median(times['32']):.0f} | "
                f"{1e3 * statistics.median(times['8']):.0f} | {ratio:.2f}× |"
            )
            print(rows[-1], flush=True)
    return rows


# -- convergence --------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """A byte-level pre-norm decoder: embedding (tied head), attention + MLP blocks."""

    def __init__(self, width: int = 192, layers: int = 2, heads: int = 3, mlp: int = 768):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, mlp, dropout=0.0, batch_first=True, norm_first=True, bias=False
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(1))
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.norm(h) @ self.embed.weight.T


def _batch(data: torch.Tensor, gen: torch.Generator, batch: int, ctx: int):
    starts = torch.randint(0, data.numel() - ctx - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(ctx + 1)
    seq = data[idx]
    return seq[:, :-1], seq[:, 1:]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def train_lm(cls, seed: int, steps: int, lr: float, batch: int = 16, ctx: int = 128):
    data = stdlib_bytes(4_000_000)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    torch.manual_seed(seed)
    model = TinyLM()
    opt = cls(param_groups(model, weight_decay=0.0), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = _batch(train, gen, batch, ctx)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    elapsed = time.perf_counter() - start
    vgen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        val_loss = statistics.mean(
            _loss(model, *_batch(val, vgen, 32, ctx)).item() for _ in range(8)
        )
    return val_loss, elapsed, opt.state_bytes_per_param()


def bench_convergence(steps: int = 200, seeds: tuple[int, ...] = (0, 1), lr: float = 3e-3):
    rows = [
        f"TinyLM: {sum(p.numel() for p in TinyLM().parameters()) / 1e6:.2f} M params, "
        f"{steps} steps, batch 16 × 128 bytes, lr {lr}, stdlib text (90/10 split)",
        "",
        "| seed | DolphinFlow val loss | DolphinFlow8bit val loss | difference | B/param 32 / 8 |",
        "|---|---|---|---|---|",
    ]
    for seed in seeds:
        ref, _, b32 = train_lm(DolphinFlow, seed, steps, lr)
        got, _, b8 = train_lm(DolphinFlow8bit, seed, steps, lr)
        rows.append(
            f"| {seed} | {ref:.4f} | {got:.4f} | {100 * (got - ref) / ref:+.2f}% | "
            f"{b32:.2f} / {b8:.2f} |"
        )
    return rows


# -- entry point --------------------------------------------------------------------------------


def _kernel() -> str:
    """Which build of the native 8-bit kernel runs (or that the torch path does)."""
    return quant8_native.active_isa() or "off (torch path)"


def _machine() -> list[str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:15]
    except OSError:
        lscpu = [platform.processor()]
    return [
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"bitsandbytes {__import__('bitsandbytes').__version__}, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}, "
        f"native 8-bit kernel: {_kernel()}",
        "```",
        *lscpu,
        "```",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["memory", "step", "convergence", "all"])
    parser.add_argument("--out", type=Path, help="also write the results to this Markdown file")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--isa",
        choices=list(quant8_native.ISA_FLAGS),
        help="the native kernel's build (default: the best this CPU runs)",
    )
    args = parser.parse_args()
    if args.isa:
        quant8_native._library = quant8_native.library(args.isa)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = ["memory", "step", "convergence"] if args.part == "all" else [args.part]
    lines = [
        "# DolphinFlow8bit benchmark",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, '-m', 'bench.dolphinflow8bit', *sys.argv[1:]])}`",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
    ]
    print(f"native 8-bit kernel: {_kernel()}", flush=True)
    for part in parts:
        started = time.perf_counter()
        if part == "memory":
            rows = bench_memory()
        elif part == "step":
            rows = bench_step(args.rounds)
        else:
            rows = bench_convergence(args.steps)
        rows += ["", f"({part}: {time.perf_counter() - started:.0f} s)"]
        lines += [f"## {part}", "", *rows, ""]
        print("\n".join([f"## {part}", *rows]), flush=True)
    lines += ["## machine", "", *_machine()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
