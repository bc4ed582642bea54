"""The built-in Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Parameter names follow one plain scheme so param-group patterns are easy to write:
``embed.weight``, ``layers.<i>.attn_norm.weight``, ``layers.<i>.attn.{q,k,v,o}.weight``,
``layers.<i>.mlp_norm.weight``, ``layers.<i>.mlp.{gate,up,down}.weight``, ``norm.weight`` and,
without tied embeddings, ``lm_head.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shardflow.train.config import ConfigError, ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim of x: (batch, heads, seq, hd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal self-attention with grouped key/value heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        repeat = self.n_heads // self.n_kv_heads
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Token embedding, decoder blocks, final norm and output head; returns logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def blocks(self) -> list[nn.Module]:
        """The decoder blocks (what fsdp placement shards one by one)."""
        return list(self.layers)

    def reset_parameters(self, seed: int) -> None:
        """Deterministic init: normal(0, 0.02), output projections scaled by depth, norms 1.

        The values do not depend on the placement: sharded (DTensor) parameters receive their
        slice of the same full tensors, generated one parameter at a time.
        """
        gen = torch.Generator().manual_seed(seed)
        depth_scale = 1.0 / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                values = torch.ones(param.shape)
            else:
                std = 0.02 * (depth_scale if name.endswith(("o.weight", "down.weight")) else 1.0)
                values = torch.randn(param.shape, generator=gen) * std
            with torch.no_grad():
                param.copy_(_like(param, values.to(param.dtype)))

    def forward(self, tokens: torch.Tensor, docs: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``tokens`` (batch, seq). ``docs`` (batch, seq), packed examples: each
        token's example index; attention then stays inside each example (block-diagonal
        causal mask). Rotary embeddings are relative, so positions need no reset."""
        head_dim = self.cfg.dim // self.cfg.n_heads
        cos, sin = rotary_tables(head_dim, tokens.shape[1], self.cfg.rope_theta)
        cos, sin = cos.to(tokens.device), sin.to(tokens.device)
        mask = None if docs is None else document_mask(docs)
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, cos, sin, mask)
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight)


def document_mask(docs: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean attention mask: causal, and only within the same example."""
    t = docs.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=docs.device).tril()
    return (docs[:, None, :, None] == docs[:, None, None, :]) & causal


def _like(param: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (a full CPU tensor) laid out like ``param``: moved, and sharded for a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(values.to(param.device), param.device_mesh, param.placements)
    return values.to(param.device)


def check_model_config(cfg: ModelConfig, seq_len: int) -> None:
    """Raise :class:`ConfigError` for shapes the built-in decoder cannot build."""
    if cfg.dim % cfg.n_heads:
        raise ConfigError(f"model.dim={cfg.dim} is not divisible by model.n_heads={cfg.n_heads}.")
    if (cfg.dim // cfg.n_heads) % 2:
        raise ConfigError(
            f"model.dim/model.n_heads={cfg.dim // cfg.n_heads} must be even for rotary embeddings."
        )
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={cfg.n_kv_heads} must divide model.n_heads={cfg.n_heads}."
        )
    if cfg.vocab_size < 257:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is too small for byte tokens; use at least 257."
        )
    if seq_len > cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}; "
            "raise model.max_seq_len or lower data.seq_len."
        )


def build_decoder(cfg: ModelConfig, device: torch.device | str = "cpu") -> Decoder:
    """The built-in decoder on ``device`` (use "meta" to plan without allocating)."""
    with torch.device(device):
        model = Decoder(cfg)
    return model.to(dtype=getattr(torch, cfg.dtype))
