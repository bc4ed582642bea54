"""WhiteFlow benchmarks: state bytes, step time and a small language-model run, against AdamW.

Run from the repository root (CPU, one thread, so that timings on a shared machine are stable)::

    python bench/whiteflow.py memory            # bytes/param on SmolLM2-135M shapes (meta tensors)
    python bench/whiteflow.py speed  --reps 7   # step time vs torch AdamW fused/foreach, interleaved
    python bench/whiteflow.py floor  --reps 7   # bandwidth, matmul GFLOP/s: the best ratio reachable
    python bench/whiteflow.py train  --steps 300 --final-steps 1000   # lr sweep + ablation + long run
    python bench/whiteflow.py report RUN_DIR...  # table + PNG from launch/compare.py run dirs
    python bench/whiteflow.py step --reps 5     # default-argument step vs fused AdamW + memory
    python bench/whiteflow.py step --repo /tmp/wf-base   # the same bench on another checkout
    python bench/whiteflow.py step --ranks 64 128        # plus WhiteFlow at smaller ranks

``step`` measures WhiteFlow exactly as a user gets it (default arguments: no ``compiled=``, no
flags) on 42.5 M parameters of SmolLM2 shapes (tied embedding + 4 layers + final norm, from
:mod:`bench.shapes`), interleaved with fused AdamW in the same process, one thread; and what each
step allocates beyond the state (peak RSS growth per step, and torch's own allocations from the
profiler's memory events). ``--repo DIR`` imports ``shardflow`` from another checkout (a ``git
worktree`` of the parent commit: the "before" of a change, measured by the same script).

``memory`` takes seconds; ``speed`` about a minute; ``train`` about 5–10 minutes on a 2-core
CPU. Each prints Markdown tables with ratios against AdamW measured in the same run.

SmolLM2-135M shapes (shapes only, nothing downloaded): hidden 576, MLP 1536, 9 heads, 3 kv heads
(head dim 64), 30 layers, vocab 49152, tied embedding. The ``train`` model is a tiny byte-level
decoder written here, trained on the running Python's standard-library sources.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--repo" in sys.argv:  # before shardflow is imported: `step --repo DIR` measures that checkout
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--repo") + 1]).resolve()))

from bench.common import stdlib_bytes  # noqa: E402
from shardflow.optim.whiteflow import WhiteFlow  # noqa: E402

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 576, 1536, 9, 3, 64, 30, 49152
CTX, BATCH = 64, 16
"""Training context (bytes) and batch size of the ``train`` runs."""


def smollm2_shapes(layers: int = LAYERS, embedding: bool = True) -> list[tuple[str, tuple]]:
    """``(name, shape)`` of SmolLM2-135M's parameters (tied head: one embedding)."""
    out = [("embed_tokens.weight", (VOCAB, HIDDEN))] if embedding else []
    kv = KV_HEADS * HEAD_DIM
    for i in range(layers):
        p = f"layers.{i}."
        out += [
            (p + "q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (p + "k_proj.weight", (kv, HIDDEN)),
            (p + "v_proj.weight", (kv, HIDDEN)),
            (p + "o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
            (p + "gate_proj.weight", (MLP, HIDDEN)),
            (p + "up_proj.weight", (MLP, HIDDEN)),
            (p + "down_proj.weight", (HIDDEN, MLP)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    out.append(("norm.weight", (HIDDEN,)))
    return out


def _named(shapes, device):
    return [(n, nn.Parameter(torch.zeros(s, device=device))) for n, s in shapes]


# -- memory ---------------------------------------------------------------------------------


def adamw_bytes_per_param() -> float:
    """Measured on a small model: torch AdamW's state after one step, per parameter."""
    model = nn.Linear(64, 32)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    state = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if v.numel() > 1
    )
    return state / sum(p.numel() for p in model.parameters())


def memory() -> None:
    adamw = adamw_bytes_per_param()
    print(f"AdamW (torch, fp32 params), measured: {adamw:.3f} B/param\n")
    print("| optimizer | scope | B/param | × AdamW | projection cache (MiB) |")
    print("|---|---|---:|---:|---:|")
    for scope, emb in (("whole model", True), ("hidden layers only", False)):
        for label, cfg in (
            ("WhiteFlow projected r=256", {"second_moment": "projected", "rank": 256}),
            ("WhiteFlow projected r=128", {"second_moment": "projected", "rank": 128}),
            ("WhiteFlow projected r=64", {"second_moment": "projected", "rank": 64}),
            ("WhiteFlow dense", {"second_moment": "dense"}),
        ):
            named = _named(smollm2_shapes(embedding=emb), "meta")
            opt = WhiteFlow(named, **cfg)
            bpp = opt.state_bytes_per_param()
            hidden = [s for n, s in smollm2_shapes(embedding=False) if len(s) == 2]
            rank = cfg.get("rank", 0)
            cache = sum(w * min(rank, w) * 4 for w in {s[1] for s in hidden})
            per_param_cache = sum(s[1] * min(rank, s[1]) * 4 for s in hidden)
            note = (
                f"{cache / 2**20:.2f} (per-param keys would be {per_param_cache / 2**20:.0f})"
                if cache
                else "0"
            )
            print(f"| {label} | {scope} | {bpp:.3f} | {bpp / adamw:.3f} | {note} |")


# -- speed ----------------------------------------------------------------------------------


def _grads(params, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3


SPEED_VARIANTS = {
    "AdamW fused": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, fused=True),
    "AdamW foreach": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, foreach=True),
    "WhiteFlow projected r=256, eager": lambda ps: WhiteFlow(ps, rank=256, compiled=False),
    "WhiteFlow dense, eager": lambda ps: WhiteFlow(ps, second_moment="dense", compiled=False),
    "WhiteFlow projected r=256, compiled": lambda ps: WhiteFlow(ps, rank=256, compiled=True),
    "WhiteFlow dense, compiled": lambda ps: WhiteFlow(ps, second_moment="dense", compiled=True),
    "WhiteFlow dense, compiled, RTN": lambda ps: WhiteFlow(
        ps, second_moment="dense", compiled=True, stochastic_rounding=False
    ),
}
"""Optimizers of ``speed`` (``--only`` picks those whose name contains a given text)."""


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def speed(reps: int, layers: int, embedding: bool = True, only: str = "") -> None:
    """Min and median step time per optimizer, interleaved (one step of each, ``reps`` rounds).

    Scopes: ``layers`` SmolLM2 hidden layers, and (``embedding``) the same layers plus the tied
    embedding (49152×576) and final norm in one optimizer, as a model's step sees them.
    """
    print(f"UTC {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}; load before: {_load()}")
    scopes = {f"{layers} hidden layers": smollm2_shapes(layers, embedding=False)}
    if embedding:
        scopes[f"{layers} layers + embedding"] = smollm2_shapes(layers, embedding=True)
    makers = {k: v for k, v in SPEED_VARIANTS.items() if k == "AdamW fused" or only in k}
    compile_s: dict[str, float] = {}
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for scope, shapes in scopes.items():
        runs = {}
        for name, make in makers.items():
            named = [(n, nn.Parameter(torch.randn(s) * 0.02)) for n, s in shapes]
            _grads([p for _, p in named])
            opt = make(named)
            start = time.perf_counter()
            opt.step()  # warm-up (state, projections; compilation for the compiled variants)
            opt.step()  # a second shape-generic compile may happen here
            if "compiled" in name:
                compile_s[f"{name}, {scope}"] = time.perf_counter() - start
            runs[name] = (opt, [])
        for _ in range(reps):
            for _name, (opt, times) in runs.items():
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
        results[scope] = {n: (min(t), statistics.median(t)) for n, (_, t) in runs.items()}
        del runs
    print(f"load after: {_load()}")
    print(f"{reps} interleaved steps, torch threads = {torch.get_num_threads()}\n")
    head = " | ".join(f"{s}: min ms | median ms | × fused (min) | × fused (median)" for s in scopes)
    print(f"| optimizer | {head} |")
    print("|---|" + "---:|---:|---:|---:|" * len(scopes))
    for name in makers:
        cells = []
        for scope in scopes:
            (lo, med), (ref_lo, ref_med) = results[scope][name], results[scope]["AdamW fused"]
            cells.append(
                f"{lo * 1e3:.2f} | {med * 1e3:.2f} | {lo / ref_lo:.2f} | {med / ref_med:.2f}"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nFirst two steps of the compiled variants (compilation included):\n")
    for key, seconds in compile_s.items():
        print(f"- {key}: {seconds:.1f} s")


# -- step: default arguments, 42.5 M params, time and memory ---------------------------------


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _rss_growth(fn) -> int:
    """Bytes the process's peak RSS rose above its RSS before ``fn()`` while it ran.

    Free heap memory is first returned to the kernel (glibc ``malloc_trim(0)``), so that a
    temporary which reuses memory freed earlier is counted when its pages are touched again;
    the peak is then reset through ``/proc/self/clear_refs`` (Linux)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _products(model, rank: int = 256):
    """The projected mode's unavoidable arithmetic, as a step to time: per hidden matrix
    ``(rows, n)``, one ``torch.mm`` of ``(2·rows, n) @ (n, r)`` (``g⊥·P`` and ``M·P`` stacked),
    ``r = min(rank, n)``: 4·r FLOP per parameter, at torch's own GEMM speed."""
    from shardflow.optim.routing import is_hidden_matrix  # noqa: PLC0415

    work = []
    for name, p in model.named_parameters():
        if is_hidden_matrix(p, name):
            rows, n = p.shape[0], p[0].numel()
            r = min(rank, n)
            work.append((torch.randn(2 * rows, n), torch.randn(n, r), torch.empty(2 * rows, r)))
    return lambda: [torch.mm(x, proj, out=out) for x, proj, out in work]


def step_bench(reps: int, layers: int, repo: str | None, ranks: list[int] = ()) -> None:
    """WhiteFlow with default arguments (and ``second_moment="dense"``) against fused AdamW,
    interleaved in one process; the projection products alone; memory per WhiteFlow step.
    ``ranks``: extra rows with ``rank=r`` (not the default: what a smaller sketch costs)."""
    import shardflow  # noqa: PLC0415
    from bench.shapes import SHAPES, build_model, random_grads  # noqa: PLC0415

    source = Path(shardflow.__file__).resolve().parents[1]
    print(f"UTC {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}; load before: {_load()}")
    print(f"shardflow from {source}" + (f" (--repo {repo})" if repo else ""))
    shapes = SHAPES["smollm2-135m"].with_layers(layers)
    makers = {
        "AdamW fused": lambda m: torch.optim.AdamW(m.parameters(), fused=True),
        "WhiteFlow (defaults)": lambda m: WhiteFlow(m.named_parameters()),
        'WhiteFlow second_moment="dense"': lambda m: WhiteFlow(
            m.named_parameters(), second_moment="dense"
        ),
    }
    for r in ranks:
        makers[f"WhiteFlow rank={r}"] = lambda m, r=r: WhiteFlow(m.named_parameters(), rank=r)
    steps, states = {}, {}
    for name, make in makers.items():
        model = build_model(shapes, device="cpu", seed=0)
        grads = random_grads(model)
        for n, p in model.named_parameters():
            p.grad = grads[n]
        opt = make(model)
        steps[name] = opt.step
        if isinstance(opt, WhiteFlow):
            states[name] = opt.state_bytes()
    steps["products alone (projected r=256)"] = _products(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{shapes.name} with {layers} layers: {n_params / 1e6:.2f} M parameters, "
        f"torch threads = {torch.get_num_threads()}\n"
    )
    print("| WhiteFlow | state MiB (B/param) | step | wall s | peak RSS growth MiB | B/param |")
    print("|---|---:|---|---:|---:|---:|")
    for name, state in states.items():
        for label in ("1 (first)", "2", "3"):
            start = time.perf_counter()
            grew = _rss_growth(steps[name])
            wall = time.perf_counter() - start
            print(
                f"| {name} | {state / 2**20:.1f} ({state / n_params:.3f}) | {label} | "
                f"{wall:.2f} | {grew / 2**20:.1f} | {grew / n_params:.3f} |"
            )
    adamw_first = _rss_growth(steps["AdamW fused"])  # creates its state: not a step to time
    print(
        f"\n(fused AdamW's first step, for scale: {adamw_first / 2**20:.1f} MiB, "
        f"{adamw_first / n_params:.3f} B/param — its state, created lazily)\n"
    )
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            step()
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    print(f"{reps} interleaved steps each; load after: {_load()}\n")
    print(
        "| step | wall min ms | wall median ms | × fused AdamW (min / median) | CPU min ms | "
        "CPU median ms | × fused AdamW, CPU (min / median) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in steps:
        cells = []
        for t in (wall, cpu):
            lo, med = min(t[name]), statistics.median(t[name])
            ref_lo, ref_med = min(t["AdamW fused"]), statistics.median(t["AdamW fused"])
            cells.append(
                f"{lo * 1e3:.1f} | {med * 1e3:.1f} | {lo / ref_lo:.2f} / {med / ref_med:.2f}"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "\nCPU = the calling thread's CPU time (time.thread_time; one torch thread, so the whole "
        "step): less disturbed than wall time by other processes on a shared machine."
    )


# -- floor ----------------------------------------------------------------------------------

DENSE_PASSES = {
    "clipping norm (read g)": 4,
    "pass 1, row scales (read g, w, m, v; write v)": 4 + 4 + 2 + 2 + 2,
    "pass 2, momentum + weights (read g, w, m; write w, m)": 4 + 4 + 2 + 4 + 2,
}
"""Bytes per parameter each pass of WhiteFlow dense must move (fp32 w/g, bf16 m/v)."""

ADAMW_BYTES = 28
"""Fused AdamW: read w, g, m, v (fp32) and write w, m, v: 7 × 4 bytes per parameter."""


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def floor(reps: int, layers: int, rank: int = 256) -> None:
    """Measured lower bounds of WhiteFlow's step against fused AdamW on this machine.

    Memory: streaming bandwidth of three kernels over all parameters (a read-only dot, an
    ``out = a + s·b`` triad, fused AdamW itself) and the bytes each WhiteFlow pass must move.
    Matmul: ``torch.mm`` GFLOP/s on the projection shapes ``(rows, n) @ (n, r)``, and the FLOPs
    projected mode needs (two such products per hidden matrix per step).
    """
    print(f"UTC {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}; load before: {_load()}")
    print(f"torch threads = {torch.get_num_threads()}, {layers} SmolLM2 hidden layers\n")
    shapes = [s for _, s in smollm2_shapes(layers, embedding=False)]
    params = [torch.randn(s) * 0.02 for s in shapes]
    n = sum(p.numel() for p in params)
    named = [(f"p{i}", nn.Parameter(p)) for i, p in enumerate(params)]
    _grads([p for _, p in named])
    adam = torch.optim.AdamW([p for _, p in named], lr=1e-3, fused=True)
    t_adam = _best(adam.step, reps)
    grads = [p.grad for _, p in named]
    t_read = _best(lambda: [torch.dot(g.view(-1), g.view(-1)) for g in grads], reps)
    outs = [torch.empty_like(g) for g in grads]
    ws = [p.detach() for _, p in named]
    t_triad = _best(
        lambda: [torch.add(w, g, alpha=0.5, out=o) for w, g, o in zip(ws, grads, outs)], reps
    )
    bw = {
        "read (dot, 4 B)": 4 * n / t_read,
        "triad (a + s·b, 12 B)": 12 * n / t_triad,
        "fused AdamW (28 B)": ADAMW_BYTES * n / t_adam,
    }
    print(f"parameters: {n / 1e6:.2f} M; fused AdamW step: {t_adam * 1e3:.2f} ms (min of {reps})\n")
    print("| kernel | GB/s |")
    print("|---|---:|")
    for name, value in bw.items():
        print(f"| {name} | {value / 1e9:.1f} |")
    hidden = [s for s in shapes if len(s) == 2]
    flops = 0.0
    t_mm = 0.0
    for rows, cols in hidden:
        a, b = torch.randn(rows, cols), torch.randn(cols, min(rank, cols))
        t_mm += 2 * _best(lambda a=a, b=b: torch.mm(a, b), reps)  # gradient and momentum
        flops += 2 * 2 * rows * cols * min(rank, cols)
    gflops = flops / t_mm / 1e9
    dense = sum(DENSE_PASSES.values())
    print("\n| WhiteFlow dense pass | B/param |\n|---|---:|")
    for name, value in DENSE_PASSES.items():
        print(f"| {name} | {value} |")
    print(f"| total | {dense} (fused AdamW: {ADAMW_BYTES}) |")
    at_adam = dense / ADAMW_BYTES
    print(
        f"\nMemory floor, dense, at fused AdamW's own bandwidth: {dense}/{ADAMW_BYTES} = "
        f"**{at_adam:.2f}× fused AdamW** ({at_adam * t_adam * 1e3:.2f} ms)."
    )
    proj_extra = 4 + 4 + 4 + 4  # write g⊥ and M̂ for the products, which read them back
    proj_bytes = dense - 2 + proj_extra  # v is rows × r, not rows × n (≈ 0 B/param)
    t_proj = proj_bytes / ADAMW_BYTES * t_adam + t_mm
    print(
        f"\nProjected r={rank}: {flops / 1e9:.2f} GFLOP per step (2 products per matrix), torch.mm "
        f"on these shapes: {gflops:.1f} GFLOP/s → {t_mm * 1e3:.2f} ms = "
        f"{t_mm / t_adam:.2f}× fused AdamW for the products alone; with ≈{proj_bytes} B/param "
        f"of passes: floor ≈ **{t_proj / t_adam:.2f}× fused AdamW** ({t_proj * 1e3:.2f} ms)."
    )
    print(f"\nload after: {_load()}")


# -- training -------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """A byte-level decoder: embedding, pre-norm blocks, untied head."""

    def __init__(self, d: int = 128, layers: int = 2, heads: int = 4, ctx: int = CTX) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, idx):
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def _batch(data, gen, batch, ctx):
    starts = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
    x = torch.stack([data[s : s + ctx] for s in starts])
    y = torch.stack([data[s + 1 : s + ctx + 1] for s in starts])
    return x, y


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def train_run(optimizer: str, lr: float, steps: int, data, val, evals, cfg=None) -> dict:
    """One run; returns val losses at ``evals``, train losses and stability figures."""
    torch.manual_seed(0)
    model = TinyLM()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    else:
        opt = WhiteFlow(model.named_parameters(), lr=lr, weight_decay=0.01, **(cfg or {}))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        ),
    )
    gen = torch.Generator().manual_seed(1)
    vgen = torch.Generator().manual_seed(2)
    val_batches = [_batch(val, vgen, BATCH, CTX) for _ in range(8)]
    losses, val_losses, step_time = [], {}, 0.0
    for step in range(1, steps + 1):
        x, y = _batch(data, gen, BATCH, CTX)
        loss = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer == "adamw":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # WhiteFlow clips at 1.0
        start = time.perf_counter()
        opt.step()
        step_time += time.perf_counter() - start
        sched.step()
        losses.append(loss.item())
        if step in evals:
            with torch.no_grad():
                val_losses[step] = statistics.fmean(_loss(model, *b).item() for b in val_batches)
    spikes = [
        losses[i] / statistics.median(losses[max(0, i - 50) : i]) for i in range(10, len(losses))
    ]
    state = (
        opt.state_bytes_per_param()
        if isinstance(opt, WhiteFlow)
        else sum(
            v.numel() * v.element_size()
            for s in opt.state.values()
            for v in s.values()
            if v.numel() > 1
        )
        / sum(p.numel() for p in model.parameters())
    )
    return {
        "val": val_losses,
        "nan": sum(not math.isfinite(v) for v in losses),
        "max_spike": max(spikes) if spikes else float("nan"),
        "opt_ms": 1e3 * step_time / steps,
        "bytes_per_param": state,
    }


def train(steps: int, final_steps: int, lrs: list[float], only: str = "") -> None:
    data = stdlib_bytes(3_000_000)
    split = int(0.9 * len(data))
    train_data, val = data[:split], data[split:]
    print(
        f"data: {len(data)} bytes of stdlib .py sources; model: TinyLM "
        f"({sum(p.numel() for p in TinyLM().parameters())} params), batch {BATCH}×{CTX} bytes\n"
    )
    variants = {
        "AdamW": ("adamw", None),
        "WhiteFlow projected r=256 (default)": ("whiteflow", {"second_moment": "projected"}),
        "WhiteFlow projected r=32": ("whiteflow", {"second_moment": "projected", "rank": 32}),
        "WhiteFlow dense": ("whiteflow", {"second_moment": "dense"}),
    }
    variants = {k: v for k, v in variants.items() if only in k}
    evals = {100, steps}
    print(f"### lr sweep: {steps} steps, warm-up {max(1, steps // 20)}, cosine to 10%\n")
    print(f"| optimizer | lr | val@100 | val@{steps} | max spike | NaN | opt ms/step | B/param |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    best = {}
    for label, (name, cfg) in variants.items():
        for lr in lrs:
            r = train_run(name, lr, steps, train_data, val, evals, cfg)
            print(
                f"| {label} | {lr:g} | {r['val'][100]:.4f} | {r['val'][steps]:.4f} | "
                f"{r['max_spike']:.2f} | {r['nan']} | {r['opt_ms']:.2f} | "
                f"{r['bytes_per_param']:.2f} |",
                flush=True,
            )
            if label not in best or r["val"][steps] < best[label][1]["val"][steps]:
                best[label] = (lr, r)
    if not final_steps:
        return
    evals = {100, min(300, final_steps), final_steps}
    print(f"\n### best lr of each, {final_steps} steps (same schedule shape)\n")
    print(
        f"| optimizer | lr | val@100 | val@300 | val@{final_steps} | × AdamW @100 | "
        f"× AdamW @{final_steps} | max spike | NaN |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref = None
    for label, (name, cfg) in variants.items():
        lr = best[label][0]
        r = train_run(name, lr, final_steps, train_data, val, evals, cfg)
        ref = ref or r
        v = r["val"]
        print(
            f"| {label} | {lr:g} | {v[100]:.4f} | {v[min(300, final_steps)]:.4f} | {v[final_steps]:.4f} | "
            f"{v[100] / ref['val'][100]:.3f} | {v[final_steps] / ref['val'][final_steps]:.3f} | "
            f"{r['max_spike']:.2f} | {r['nan']} |",
            flush=True,
        )


# -- convergence report (runs of bench/convergence.py / launch/compare.py) --------------------


def _read_run(metrics: Path) -> tuple[list[float], dict[int, float]]:
    """Train losses (by step) and validation losses from one run's metrics.jsonl."""
    losses, val = [], {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "val_loss" in row:
            val[row["step"]] = row["val_loss"]
        elif "loss" in row:
            losses.append(row["loss"])
    return losses, val


def _max_spike(losses: list[float], window: int = 50) -> float:
    """max over steps of loss / median of the previous ``window`` losses (from step 10)."""
    return max(
        (losses[i] / statistics.median(losses[max(0, i - window) : i]))
        for i in range(10, len(losses))
    )


def report(run_dirs: list[str], out_stem: str) -> None:
    """Table (val@100, val@last, × AdamW, NaN, max spike) and a PNG of the best lr of each.

    ``run_dirs`` are directories named ``<optimizer>-lr<lr>`` holding ``metrics.jsonl``. The
    best lr per optimizer is chosen by the final validation loss.
    """
    runs = {}
    for d in map(Path, run_dirs):
        name, lr = d.name.rsplit("-lr", 1)
        runs[(name, float(lr))] = _read_run(d / "metrics.jsonl")
    last = max(max(v) for _, v in runs.values())
    best = {}
    for (name, lr), (_, val) in runs.items():
        if name not in best or val[last] < runs[(name, best[name])][1][last]:
            best[name] = lr
    ref = runs[("adamw", best["adamw"])][1]
    print(
        f"| optimizer | lr | val@100 | val@{last} | × AdamW @100 | × AdamW @{last} | NaN | "
        "max spike (× median of previous 50) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, lr), (losses, val) in sorted(runs.items()):
        mark = " **(best)**" if best[name] == lr else ""
        nan = sum(not math.isfinite(x) for x in losses) + sum(
            not math.isfinite(x) for x in val.values()
        )
        print(
            f"| {name}{mark} | {lr:g} | {val[100]:.4f} | {val[last]:.4f} | "
            f"{val[100] / ref[100]:.3f} | {val[last] / ref[last]:.3f} | {nan} | "
            f"{_max_spike(losses):.2f} |"
        )
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, lr), (losses, val) in sorted(runs.items()):
        style = "-" if best[name] == lr else ":"
        smooth = [statistics.fmean(losses[max(0, i - 20) : i + 1]) for i in range(len(losses))]
        left.plot(range(1, len(losses) + 1), smooth, style, label=f"{name} lr={lr:g}")
        steps = sorted(val)
        right.plot(steps, [val[s] for s in steps], style + "o", label=f"{name} lr={lr:g}")
    left.set(title="train loss (mean of 21 steps)", xlabel="step", ylabel="nats", ylim=(1.2, 3.5))
    right.set(title="validation loss", xlabel="step", ylabel="nats", ylim=(1.2, 3.5))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out_stem}.png", dpi=110)
    print(f"\n![convergence]({Path(out_stem).name}.png)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["memory", "speed", "floor", "train", "report", "step"])
    parser.add_argument("runs", nargs="*", help="report: run directories <optimizer>-lr<lr>")
    parser.add_argument("--out", default="bench/results/whiteflow-convergence", help="report")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="SmolLM2 layers (default 2; step: 4, 42.5 M params)",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--final-steps", type=int, default=1000)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-embedding", action="store_true", help="speed: hidden layers only")
    parser.add_argument("--repo", default=None, help="step: import shardflow from this checkout")
    parser.add_argument(
        "--ranks", type=int, nargs="*", default=[], help="step: extra WhiteFlow rows at these ranks"
    )
    parser.add_argument(
        "--only", default="", help="train/speed: variants whose label contains this"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "memory":
        memory()
    elif args.what == "floor":
        floor(args.reps, args.layers or 2)
    elif args.what == "speed":
        speed(args.reps, args.layers or 2, not args.no_embedding, args.only)
    elif args.what == "step":
        step_bench(args.reps, 4 if args.layers is None else args.layers, args.repo, args.ranks)
    elif args.what == "report":
        report(args.runs, args.out)
    else:
        train(args.steps, args.final_steps, args.lrs, args.only)


if __name__ == "__main__":
    main()
