"""Hugging Face causal LMs from a local directory (the ``hf`` extra: transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shardflow.train.config import ConfigError, ModelConfig


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "model.kind='hf' needs transformers; install the hf extra: pip install 'shardflow[hf]'."
        ) from exc
    return transformers


def check_hf_path(cfg: ModelConfig) -> Any:
    """The model's config; raise :class:`ConfigError` unless ``cfg.path`` holds a causal LM."""
    transformers = _transformers()
    path = Path(cfg.path).expanduser()
    if not cfg.path or not (path / "config.json").is_file():
        raise ConfigError(
            f"model.path={cfg.path!r} is not a Hugging Face model directory (no config.json); "
            "download the model to a local folder and point model.path at it."
        )
    try:
        hf_config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"model.path={cfg.path!r}: config.json cannot be read ({exc}).") from exc
    causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if hf_config.model_type not in causal:
        raise ConfigError(
            f"model.path={cfg.path!r} holds a {hf_config.model_type!r} model, which is not a "
            "causal language model; give a causal LM (Llama, SmolLM2, Qwen2, GPT-2, ...)."
        )
    return hf_config


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weight files ``from_pretrained`` reads from a local folder (any one of them)."""


def check_hf_weights(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` unless ``cfg.path`` holds the model's weights (a dry run needs
    only config.json; training loads the weights)."""
    path = Path(cfg.path).expanduser()
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(
            f"model.path={cfg.path!r} has config.json but no weights (none of "
            f"{', '.join(WEIGHT_FILES)}); download the whole model folder."
        )


class HFTokenizer:
    """A Hugging Face tokenizer behind the small interface the data module uses."""

    def __init__(self, path: str) -> None:
        transformers = _transformers()
        try:
            self.inner = transformers.AutoTokenizer.from_pretrained(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(
                f"model.path={path!r} has no usable tokenizer ({exc}); save one beside the model."
            ) from exc
        eos = self.inner.eos_token_id
        if eos is None:
            raise ConfigError(f"the tokenizer in model.path={path!r} has no eos token; set one.")
        self.eos_id = int(eos)
        self.vocab_size = len(self.inner)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` without special tokens."""
        return np.asarray(self.inner.encode(text, add_special_tokens=False), dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens included."""
        return self.inner.decode(ids)


class CausalLM(nn.Module):
    """A Hugging Face causal LM that maps tokens to logits, like the built-in decoder."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def blocks(self) -> list[nn.Module]:
        """The decoder layers: the largest ModuleList in the model."""
        lists = [m for m in self.inner.modules() if isinstance(m, nn.ModuleList) and len(m)]
        return list(max(lists, key=len)) if lists else []

    def forward(self, tokens: torch.Tensor, docs: torch.Tensor | None = None) -> torch.Tensor:
        """Logits. ``docs`` (packed instruction rows) is not passed on: a Hugging Face model
        attends across the examples of a row; the loss does not cross them."""
        return self.inner(input_ids=tokens, use_cache=False).logits


def build_hf_model(cfg: ModelConfig, seed: int, device: str = "cpu") -> CausalLM:
    """Load the causal LM in ``cfg.path`` in ``cfg.dtype`` (meta device: shapes only)."""
    transformers = _transformers()
    hf_config = check_hf_path(cfg)
    dtype = getattr(torch, cfg.dtype)
    if device == "meta":
        with torch.device("meta"):
            inner = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        return CausalLM(inner)
    torch.manual_seed(seed)
    inner = transformers.AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype)
    return CausalLM(inner.to(device))


def save_hf_files(inner: nn.Module, out: Path, tok_path: str) -> None:
    """The files beside ``model.safetensors`` that ``from_pretrained`` needs: the model's
    ``config.json`` (and ``generation_config.json`` when it has one) and the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    inner.config.save_pretrained(out)
    generation = getattr(inner, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    _transformers().AutoTokenizer.from_pretrained(tok_path).save_pretrained(out)
