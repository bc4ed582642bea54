"""Run configs: TOML files read into typed dataclasses, one schema, command-line overrides.

A run config has one table per section (``[run]``, ``[model]``, ``[data]``, ``[placement]``,
``[optim]``, ``[schedule]``, ``[train]``, ``[checkpoint]``, ``[log]``). Every field is typed
and documented by the string literal under it; :func:`config_reference` turns those strings into
the README's config reference. Unknown keys are rejected with the nearest valid name, wrong types
name the field, the value and the expected type, and ``--section.field value`` overrides any
scalar field from the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A run config (file or override) that cannot be used; the message says how to fix it."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = "run"
    """Run name, used in plot legends and as the default output folder name."""
    out_dir: str = ""
    """Folder for metrics, checkpoints, plots and the saved model ("" = runs/NAME; compare:
    runs/NAME-compare)."""
    timestamped: bool = False
    """Write to a fresh folder, OUT_DIR-YYYYMMDD-HHMMSS (UTC, rank 0's clock), instead of
    OUT_DIR itself: every launch is a new run."""
    overwrite: bool = False
    """Start afresh in OUT_DIR even when it holds another run: that run's checkpoints, metrics,
    summary and final weights are deleted first (other files are left alone)."""
    seed: int = 0
    """Seed for model initialisation and batch sampling; the same seed gives the same run."""
    nproc: int = 1
    """Process count the run expects; launching with another count is an error."""
    device: str = "auto"
    """"cpu", "cuda" or "auto" (cuda when available); cpu uses gloo, cuda uses nccl."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    kind: str = "builtin"
    """"builtin" (the Llama-style decoder below) or "hf" (a local Hugging Face causal LM)."""
    path: str = ""
    """For kind="hf": a local directory with config.json, weights and a tokenizer."""
    dim: int = 256
    """Built-in model: hidden size."""
    n_layers: int = 6
    """Built-in model: decoder blocks."""
    n_heads: int = 8
    """Built-in model: attention (query) heads; dim must be divisible by it."""
    n_kv_heads: int = 4
    """Built-in model: key/value heads for grouped-query attention; divides n_heads."""
    ffn_dim: int = 688
    """Built-in model: SwiGLU hidden size."""
    vocab_size: int = 257
    """Built-in model: vocabulary; at least 257 for byte tokens (256 bytes + end of document)."""
    max_seq_len: int = 1024
    """Built-in model: longest sequence the rotary tables cover."""
    rope_theta: float = 10000.0
    """Built-in model: rotary embedding base."""
    norm_eps: float = 1e-5
    """Built-in model: RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Built-in model: share the token embedding with the output head."""
    dtype: str = "float32"
    """Parameter dtype: "float32" or "bfloat16"."""
    compile: bool = False
    """torch.compile the model (nn.Module.compile, in place: parameter names and checkpoints
    are unchanged); the first steps are slower while it compiles (on the CPU: a C compiler)."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Text files, folders (read recursively) and .jsonl files; empty = the embedded corpus."""
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".py", ".jsonl"])
    """File suffixes read when a folder is given."""
    text_field: str = "text"
    """Field holding the text in each JSONL record."""
    val_fraction: float = 0.05
    """Share of files (chosen by a hash of their path) held out for validation."""
    max_bytes: int = 3_000_000
    """Cap on the text read (bytes), so a big folder or the embedded corpus loads quickly; no
    file is read further than this. Non-UTF-8 bytes are replaced (with a warning naming the
    file); a file more than 30% replaced or NUL is skipped as binary."""
    max_doc_bytes: int = 65_536
    """Documents are cut to this many characters, so one huge file cannot dominate a split."""
    seq_len: int = 128
    """Tokens per training sequence."""
    format: str = "text"
    """"text" (documents, causal-LM loss on every token) or "instruct" (JSONL records
    {"prompt", "completion"} or {"messages": [...]}, loss on the answers only, examples packed
    per row; empty paths = docstring -> signature pairs from the standard library)."""


@dataclass(kw_only=True, slots=True)
class PlacementConfig:
    kind: str = "none"
    """"none" (one process), "ddp" (replicated), "fsdp" (fully_shard per block), "hsdp"
    (fully_shard over a 2-D mesh: sharded within groups of shard_size ranks, replicated across
    them) or "offload" (one process; optimizer and a float32 master copy on the host)."""
    backend: str = "auto"
    """Collective backend: "auto" (gloo on cpu, nccl on cuda), "gloo" or "nccl"."""
    shard_size: int = 0
    """kind="hsdp": ranks per shard group (0 = ranks per node: torchrun's LOCAL_WORLD_SIZE,
    or run.nproc when not launched by torchrun, as in a dry run); divides run.nproc."""
    replica_check_every: int = 100
    """kind="hsdp" or "ddp": compare the replicas' weights (a checksum all-reduce) every this
    many steps and stop naming the first parameter that differs; 0 = never."""


@dataclass(kw_only=True, slots=True)
class GroupRule:
    pattern: str
    """Regular expression searched in each parameter name; the first rule that matches wins."""
    options: dict[str, Any] = field(default_factory=dict)
    """Param-group keys set for the matched parameters (lr, weight_decay, ortho_mode, ...);
    in TOML they are written beside ``pattern``; the string "none" means None."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: str = "adamw"
    """Optimizer name in shardflow.optim.registry (adamw, dolphinflow, whiteflow, ...)."""
    lr: float = 1e-3
    """Peak learning rate (each group may set its own lr, scaled by the same schedule)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping). ShardFlow optimizers get it
    as gradient_clipping (they clip, and report the norm, from their one reduction); torch's
    AdamW is clipped by the training loop (clip_grad_norm_)."""
    hyper: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the optimizer's constructor ([optim.hyper] table; on the
    command line --optim.hyper.KEY VALUE)."""
    groups: list[GroupRule] = field(default_factory=list)
    """Param-group routing, [[optim.groups]] tables; every parameter must match one rule
    (end with pattern = ".*" for the rest); empty = one group with every parameter."""


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    warmup_steps: int = 10
    """Linear warm-up from 0 to the peak lr over this many steps (a torch LambdaLR of the step,
    recomputed from the step on resume; a warning when it is not shorter than train.steps)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at peak lr times this ratio on the last step."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    micro_batch: int = 8
    """Sequences per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    gradient_release: bool = False
    """Update each decoder block inside backward as its gradients land and free them
    (shardflow.prepare_for_gradient_release; ShardFlow optimizers, placement none or ddp, grad_accum 1;
    optim.grad_clip clips each block by its own norm)."""
    eval_every: int = 50
    """Validation loss every N steps and at the end (0 = never)."""
    eval_batches: int = 4
    """Micro-batches per validation."""
    loss: str = "softmax"
    """Training and validation loss: "softmax" (cross-entropy) or "stablemax" (StableMax
    cross-entropy, shardflow.losses; no Softmax Collapse at large logits)."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every: int = 0
    """Checkpoint every N steps and at the end (0 = never): safetensors, one file per rank,
    in OUT_DIR/checkpoints/step_N (shardflow.checkpoint)."""
    keep: int = 2
    """Newest complete checkpoints kept; older ones are deleted."""
    resume: bool = True
    """Resume from the newest complete checkpoint in OUT_DIR/checkpoints, whatever world
    size or placement saved it (the config's hyperparameters win over the checkpoint's; each
    change is a warning). false with checkpoints in that folder is an error."""
    save_model: bool = True
    """Write the final weights to final/model.safetensors (Hugging Face models: their own
    names, with config.json and the tokenizer, so from_pretrained reads the folder)."""


@dataclass(kw_only=True, slots=True)
class LogConfig:
    every: int = 1
    """Metrics row every N steps."""
    progress: bool = True
    """Progress bar on rank 0 (needs tqdm; plain lines without it)."""
    plot: bool = True
    """Loss-curve PNG at the end (needs matplotlib, the plot extra)."""


@dataclass(kw_only=True, slots=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Name, output folder, seed, process count, device."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Built-in decoder or Hugging Face model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training text."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """How the model is spread over processes."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and param-group routing."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch and validation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    log: LogConfig = field(default_factory=LogConfig)
    """Progress, metrics and plots."""

    def output_dir(self) -> Path:
        """The run's output folder."""
        return Path(self.run.out_dir or f"runs/{self.run.name}")


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]

CHOICES: dict[str, tuple[str, ...]] = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.kind": ("builtin", "hf"),
    "data.format": ("text", "instruct"),
    "model.dtype": ("float32", "bfloat16"),
    "placement.kind": ("none", "ddp", "fsdp", "hsdp", "offload"),
    "placement.backend": ("auto", "gloo", "nccl"),
    "train.loss": ("softmax", "stablemax"),
}
"""Fields whose string value must be one of a few words."""


# ---------------------------------------------------------------------------------- reading


def _nearest(name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" Did you mean {near[0]!r}?" if near else f" Valid keys: {', '.join(valid)}."


def _unknown(where: str, key: str, valid: list[str]) -> ConfigError:
    return ConfigError(f"unknown key {where}{key!r}.{_nearest(key, valid)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise _wrong_type(path, value, tp)
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong_type(path, value, tp)
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _wrong_type(path, value, tp)
        return _build(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise _wrong_type(path, value, tp)
    if tp is int and isinstance(value, bool):
        raise _wrong_type(path, value, tp)
    if not isinstance(value, tp):
        raise _wrong_type(path, value, tp)
    choices = CHOICES.get(path)
    if choices and value not in choices:
        raise ConfigError(f"{path}={value!r} is not one of {', '.join(choices)}.")
    return value


def _wrong_type(path: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(
        f"{path}={value!r} has type {type(value).__name__}; expected {_type_name(tp)}."
    )


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is GroupRule:
        return _build_group(table, where)
    kwargs = {}
    for key, value in table.items():
        if key not in hints:
            raise _unknown(f"{where}." if where else "", key, names)
        kwargs[key] = _coerce(f"{where}.{key}" if where else key, value, hints[key])
    return cls(**kwargs)


def _build_group(table: dict[str, Any], where: str) -> GroupRule:
    """A [[optim.groups]] table: ``pattern`` plus any param-group keys."""
    if "pattern" not in table:
        raise ConfigError(f"{where} has no 'pattern'; add pattern = \"regex\" to the table.")
    pattern = table["pattern"]
    if not isinstance(pattern, str):
        raise _wrong_type(f"{where}.pattern", pattern, str)
    options = {k: (None if v == "none" else v) for k, v in table.items() if k != "pattern"}
    for key, value in options.items():
        if isinstance(value, dict | list):
            raise ConfigError(
                f"{where}.{key}={value!r}: param-group keys take numbers, strings or booleans."
            )
    return GroupRule(pattern=pattern, options=options)


def config_from_dict(table: dict[str, Any]) -> Config:
    """A :class:`Config` from a parsed TOML document."""
    return _build(Config, table, "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML run config and apply ``--section.field value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a configs/*.toml path.")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    apply_overrides(table, overrides or [])
    return config_from_dict(table)


# -------------------------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """A command-line value as TOML would read it; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _is_flag(key: str) -> bool:
    """Whether ``key`` ("section.field") names a bool field (which may be given without a value)."""
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section)
    return cls is not None and typing.get_type_hints(cls).get(name) is bool


def split_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``--a.b 1 --c.d=x --run.overwrite`` → [("a.b", "1"), ("c.d", "x"), ("run.overwrite",
    "true")]: a bool field given alone means true."""
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(
                f"override {arg!r} is not of the form --section.field VALUE (e.g. --optim.lr 3e-4)."
            )
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        elif _is_flag(arg[2:]) and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            key, text = arg[2:], "true"  # a bool field alone: --run.overwrite
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg!r} has no value; write {arg} VALUE.")
            key, text = arg[2:], argv[i + 1]
            i += 2
        pairs.append((key, text))
    return pairs


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> None:
    """Set ``--section.field value`` overrides in a parsed TOML document, in place.

    A table field takes one key, ``--optim.hyper.factored false`` (sets ``factored = false`` in
    ``[optim.hyper]``), or a whole TOML inline table, ``--optim.hyper '{factored = false}'``.
    """
    for key, text in split_overrides(overrides):
        section, _, rest = key.partition(".")
        name, _, sub = rest.partition(".")
        if section not in SECTIONS:
            raise _unknown("--", section, list(SECTIONS))
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        if name not in hints:
            raise _unknown(f"--{section}.", name, [f.name for f in dataclasses.fields(cls)])
        is_table = typing.get_origin(hints[name]) is dict
        if sub and not is_table:
            raise ConfigError(
                f"override --{key}: {section}.{name} is not a table; write --{section}.{name} VALUE."
            )
        value = text if hints[name] is str else _parse_value(text)
        if is_table and not sub and not isinstance(value, dict):
            raise ConfigError(
                f"override --{key} {text!r}: {section}.{name} is a table; set one key with "
                f"--{section}.{name}.KEY VALUE (e.g. --optim.hyper.factored false) or all of "
                f"it with --{section}.{name} '{{KEY = VALUE, ...}}'."
            )
        target = table.setdefault(section, {})
        if sub:
            target = target.setdefault(name, {})
            name = sub
        target[name] = value


# ------------------------------------------------------------------------------- reference


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of dataclass ``cls``."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, GroupRule | list) and value and isinstance(value[0], GroupRule):
        return "[]"
    return repr(value).replace("'", '"').replace("True", "true").replace("False", "false")


def config_reference() -> str:
    """Markdown tables of every config field: key, type, default, meaning."""
    lines = []
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        lines += [f"`[{section}]`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            tp = _type_name(hints[f.name]).replace("shardflow.train.config.", "")
            doc = docs.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | {tp} | `{_default_text(f)}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- values


def check_values(cfg: Config) -> None:
    """Raise :class:`ConfigError` for numbers out of range (types were checked on reading)."""
    floats = {
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "schedule.min_lr_ratio": cfg.schedule.min_lr_ratio,
        "data.val_fraction": cfg.data.val_fraction,
        "model.rope_theta": cfg.model.rope_theta,
        "model.norm_eps": cfg.model.norm_eps,
    }
    for name, value in floats.items():
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value} must be a finite number.")
    positive = {
        "run.nproc": cfg.run.nproc,
        "train.steps": cfg.train.steps,
        "train.micro_batch": cfg.train.micro_batch,
        "train.grad_accum": cfg.train.grad_accum,
        "train.eval_batches": cfg.train.eval_batches,
        "checkpoint.keep": cfg.checkpoint.keep,
        "log.every": cfg.log.every,
        "model.dim": cfg.model.dim,
        "model.n_layers": cfg.model.n_layers,
        "model.n_heads": cfg.model.n_heads,
        "model.n_kv_heads": cfg.model.n_kv_heads,
        "model.ffn_dim": cfg.model.ffn_dim,
        "data.max_bytes": cfg.data.max_bytes,
        "data.max_doc_bytes": cfg.data.max_doc_bytes,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1.")
    non_negative = {
        "train.eval_every": cfg.train.eval_every,
        "checkpoint.every": cfg.checkpoint.every,
        "schedule.warmup_steps": cfg.schedule.warmup_steps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "placement.shard_size": cfg.placement.shard_size,
        "placement.replica_check_every": cfg.placement.replica_check_every,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name}={value} must not be negative.")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be positive (e.g. 3e-4).")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1).")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio={cfg.schedule.min_lr_ratio} must be in [0, 1].")
    if cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be at least 2.")
    if cfg.model.kind == "hf" and not cfg.model.path:
        raise ConfigError("model.kind='hf' needs model.path, a local Hugging Face model folder.")
    if cfg.train.gradient_release:
        _check_release(cfg)


def _check_release(cfg: Config) -> None:
    """What ``train.gradient_release = true`` needs (it updates during backward)."""
    if cfg.placement.kind not in ("none", "ddp"):
        raise ConfigError(
            f"train.gradient_release=true with placement.kind={cfg.placement.kind!r}: gradient "
            "release runs with placement 'none' or 'ddp' (the owner plan) so far; set one of "
            "them or gradient_release=false."
        )
    if cfg.train.grad_accum != 1:
        raise ConfigError(
            f"train.gradient_release=true with train.grad_accum={cfg.train.grad_accum}: release "
            "applies each micro-batch's gradients as they land, so there is nothing to "
            "accumulate; set grad_accum=1 (raise micro_batch instead) or gradient_release=false."
        )
    if cfg.optim.name.lower() == "adamw":
        raise ConfigError(
            "train.gradient_release=true with optim.name='adamw': release needs a ShardFlow "
            "optimizer (dolphinflow, whiteflow, factored_adam, ...)."
        )


if __name__ == "__main__":  # python -m shardflow.train.config: the README's config reference
    print(config_reference())
