"""Parameter shapes of real decoder models, for benchmarks (no weights, no download).

Three Llama-style decoders, each described by a :class:`ModelShapes` record:

- ``smollm2-135m``: SmolLM2-135M — hidden 576, MLP 1536, 30 layers, 9 heads of dim 64,
  3 kv heads, vocab 49152, tied embeddings (134.5 M parameters);
- ``llama3-8b``: Llama-3-8B — hidden 4096, MLP 14336, 32 layers, 32 heads, 8 kv heads,
  vocab 128256, untied head (8.03 B);
- ``llama3-70b``: Llama-3-70B — hidden 8192, MLP 28672, 80 layers, 64 heads, 8 kv heads,
  vocab 128256, untied head (70.6 B).

Every layer holds q ``(H·d, h)``, k and v ``(K·d, h)``, o ``(h, H·d)``, gate and up ``(m, h)``,
down ``(h, m)`` and two RMSNorm gains ``(h,)`` (``h`` hidden, ``m`` MLP, ``H`` heads, ``K`` kv heads,
``d`` head dim); the model adds the embedding ``(vocab, h)``, a final norm and, when untied, the
head ``(vocab, h)``. Names follow Hugging Face's Llama (``model.layers.0.self_attn.q_proj.weight``)
so name-based routing (:mod:`shardflow.optim.routing`) sees what it would see on the real model.

Use :func:`build_model` for an ``nn.Module`` skeleton (parameters only, no ``forward``) on the meta
device (free, for counting and planning) or with real tensors, and :meth:`ModelShapes.param_shapes`
for the plain ``name → shape`` table::

    from bench.shapes import SHAPES, build_model
    shapes = SHAPES["smollm2-135m"].with_layers(4)
    model = build_model(shapes, device="cpu", seed=0)   # or device="meta"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShapes:
    """The sizes that fix every parameter shape of a Llama-style decoder."""

    name: str
    hidden: int
    """Model width ``h``."""
    intermediate: int
    """MLP width ``m`` (gate/up project ``h → m``, down ``m → h``)."""
    layers: int
    heads: int
    """Attention (query) heads ``H``."""
    kv_heads: int
    """Key/value heads ``K`` (grouped-query attention when ``K < H``)."""
    vocab: int
    tied_embeddings: bool
    """Whether the output head reuses the embedding matrix."""
    head_dim: int | None = None
    """Per-head width ``d``; ``None`` means ``hidden // heads``."""

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    def with_layers(self, layers: int) -> ModelShapes:
        """The same model with ``layers`` decoder layers (benchmarks on small machines)."""
        if layers < 0:
            raise ValueError(f"layers={layers} is invalid: pass a layer count >= 0.")
        return dataclasses.replace(self, layers=layers)

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """``name → shape`` of one decoder layer's parameters (names relative to the layer)."""
        h, m, d = self.hidden, self.intermediate, self.dim_per_head
        q, kv = self.heads * d, self.kv_heads * d
        return {
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (m, h),
            "mlp.up_proj.weight": (m, h),
            "mlp.down_proj.weight": (h, m),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """``name → shape`` of every distinct parameter (a tied head is not listed twice)."""
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            for name, shape in self.layer_shapes().items():
                out[f"model.layers.{i}.{name}"] = shape
        out["model.norm.weight"] = (self.hidden,)
        if not self.tied_embeddings:
            out["lm_head.weight"] = (self.vocab, self.hidden)
        return out

    def num_params(self) -> int:
        """Distinct parameter elements (a tied head counted once)."""
        return sum(_numel(s) for s in self.param_shapes().values())

    def hidden_matrix_params(self) -> int:
        """Elements of the hidden (orthogonalized) matrices: every 2-D layer weight."""
        per_layer = sum(_numel(s) for s in self.layer_shapes().values() if len(s) == 2)
        return per_layer * self.layers


SMOLLM2_135M = ModelShapes(
    name="smollm2-135m",
    hidden=576,
    intermediate=1536,
    layers=30,
    heads=9,
    kv_heads=3,
    vocab=49152,
    tied_embeddings=True,
)
LLAMA3_8B = ModelShapes(
    name="llama3-8b",
    hidden=4096,
    intermediate=14336,
    layers=32,
    heads=32,
    kv_heads=8,
    vocab=128256,
    tied_embeddings=False,
)
LLAMA3_70B = ModelShapes(
    name="llama3-70b",
    hidden=8192,
    intermediate=28672,
    layers=80,
    heads=64,
    kv_heads=8,
    vocab=128256,
    tied_embeddings=False,
)
LLAMA3_405B = ModelShapes(
    name="llama3-405b",
    hidden=16384,
    intermediate=53248,
    layers=126,
    heads=128,
    kv_heads=8,
    vocab=128256,
    tied_embeddings=False,
)
SHAPES: dict[str, ModelShapes] = {
    s.name: s for s in (SMOLLM2_135M, LLAMA3_8B, LLAMA3_70B, LLAMA3_405B)
}
"""The models above by name."""


class _Attention(nn.Module):
    def __init__(self, s: ModelShapes) -> None:
        super().__init__()
        q, kv = s.heads * s.dim_per_head, s.kv_heads * s.dim_per_head
        self.q_proj = nn.Linear(s.hidden, q, bias=False)
        self.k_proj = nn.Linear(s.hidden, kv, bias=False)
        self.v_proj = nn.Linear(s.hidden, kv, bias=False)
        self.o_proj = nn.Linear(q, s.hidden, bias=False)


class _MLP(nn.Module):
    def __init__(self, s: ModelShapes) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)


class _Layer(nn.Module):
    def __init__(self, s: ModelShapes) -> None:
        super().__init__()
        self.self_attn = _Attention(s)
        self.mlp = _MLP(s)
        self.input_layernorm = nn.RMSNorm(s.hidden)
        self.post_attention_layernorm = nn.RMSNorm(s.hidden)


class _Body(nn.Module):
    def __init__(self, s: ModelShapes) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(_Layer(s) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.hidden)


class DecoderSkeleton(nn.Module):
    """A Llama-style decoder's parameters under Hugging Face names; it has no ``forward``.

    Enough for optimizers, routing (:func:`shardflow.optim.routing.param_groups` finds the
    ``nn.Embedding``) and sharding plans; not a model to run.
    """

    def __init__(self, shapes: ModelShapes) -> None:
        super().__init__()
        self.shapes = shapes
        self.model = _Body(shapes)
        self.lm_head = nn.Linear(shapes.hidden, shapes.vocab, bias=False)
        if shapes.tied_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def build_model(
    shapes: ModelShapes,
    *,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> DecoderSkeleton:
    """A :class:`DecoderSkeleton` of ``shapes`` on ``device``.

    On the meta device nothing is allocated. Elsewhere the matrices are drawn from
    ``N(0, 0.02²)`` with a generator seeded by ``seed`` (the same seed gives the same weights)
    and norm gains are 1.
    """
    with torch.device("meta"):
        model = DecoderSkeleton(shapes)
    if torch.device(device).type == "meta":
        return model.to(dtype=dtype)
    model = model.to_empty(device=device).to(dtype=dtype)
    if shapes.tied_embeddings:  # to_empty re-creates parameters: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02)
    return model


def random_grads(
    model: nn.Module, *, seed: int = 1, scale: float = 1e-3
) -> dict[str, torch.Tensor]:
    """A fixed random gradient for every parameter: ``N(0, scale²)``, same seed → same values."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale).to(
            device=p.device, dtype=p.dtype
        )
        for name, p in model.named_parameters()
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
