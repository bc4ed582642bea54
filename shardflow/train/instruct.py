"""Instruction and chat fine-tuning data (``data.format = "instruct"``): loss on the answers only.

Records (JSONL, one per line) take one of two forms:

- ``{"prompt": "...", "completion": "..."}``: the prompt and the completion are joined as they
  are (put any separator in the prompt), then the end-of-text token;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: formatted
  by the Hugging Face tokenizer's own chat template (``model.kind = "hf"``), or for the built-in
  byte-level model by :data:`BYTE_TEMPLATE`: ``<|role|>\\n`` before each message, ``\\n`` after
  a system or user message, and the end-of-text token after each assistant message.

Only the completion and the assistant messages (with the end-of-text token or the template's
end-of-turn tokens that close them) carry loss; every other target is ``IGNORE``.

Examples are **packed**: whole examples, in the (hashed) corpus order, fill rows of
``data.seq_len + 1`` tokens; the rest of a row is padding, which carries no loss. A target never
crosses from one example to the next, and the built-in decoder's attention stays inside each
example (``docs`` below); a Hugging Face model attends across the examples packed in one row
(its loss does not cross them). An example longer than a row is cut; one left without answer
tokens is dropped (with a warning).

With ``data.paths`` empty the examples come from the running Python's standard library
(:func:`stdlib_signatures`): a public function's module and the first line of its docstring
→ its ``def`` line. Offline, deterministic for a given Python.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shardflow.train.config import ConfigError, DataConfig

IGNORE = -100
"""Target of a token that carries no loss (``F.cross_entropy``'s ``ignore_index``)."""

BYTE_TEMPLATE = "<|{role}|>\n"
"""The built-in byte-level model's chat template: this header before each message's content."""

ROLES = ("system", "user", "assistant")

MAX_SIGNATURE = 120
"""Longest ``def`` line kept in the standard-library set (characters)."""


@dataclass(slots=True)
class Packed:
    """Packed examples: (rows, seq_len) inputs, targets (``IGNORE`` where no loss) and, per
    input token, the index of its example in the row (-1: padding)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    docs: torch.Tensor
    examples: int
    tokens: int
    """Tokens of the examples (padding excluded)."""
    loss_tokens: int
    """Targets that carry loss."""

    def __len__(self) -> int:
        return self.tokens


# ------------------------------------------------------------------------------- records


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is one of the two forms; else :class:`ConfigError` naming ``where``."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise ConfigError(
                f"{where}: messages must be a list of {{'role': one of {', '.join(ROLES)}, "
                "'content': str}."
            )
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise ConfigError(f"{where}: no assistant message with content; nothing to learn.")
        return record
    if (
        isinstance(record, dict)
        and isinstance(record.get("prompt"), str)
        and isinstance(record.get("completion"), str)
    ):
        if not record["completion"]:
            raise ConfigError(f"{where}: the completion is empty; nothing to learn.")
        return record
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ConfigError(
        f"{where}: an instruction record needs string fields 'prompt' and 'completion', or "
        f"'messages' (a list of {{'role', 'content'}}); found {keys}. (Plain text: set "
        "data.format = 'text'.)"
    )


def read_records(cfg: DataConfig) -> tuple[list[tuple[str, dict]], str]:
    """(key, record) pairs from ``cfg.paths`` (JSONL files, or folders of them), or the
    standard-library set when it is empty; and a description of the source."""
    if not cfg.paths:
        return stdlib_signatures(cfg.max_bytes), "standard-library docstring -> signature set"
    found = []
    for i, raw in enumerate(cfg.paths):
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(
                f"data.paths[{i}]={raw!r} does not exist; give a JSONL file or a folder of them "
                "(or leave data.paths empty for the standard-library set)."
            )
        files = [path] if path.is_file() else sorted(path.rglob("*.jsonl"))
        for file in files:
            with open(file, encoding="utf-8", errors="replace") as fh:
                for line_no, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    where = f"{file}:{line_no}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{where} is not valid JSON ({exc.msg}).") from exc
                    found.append((where, check_record(record, where)))
    return found, ", ".join(cfg.paths)


DEF_WITH_DOCSTRING = re.compile(
    r"^[ \t]*(?:async[ \t]+)?def[ \t]+([A-Za-z]\w*)[ \t]*"  # def name
    r"\(([^()]*(?:\([^()]*\)[^()]*)*)\)"  # (arguments), one level of nested brackets
    r"[ \t]*(?:->[^:\n]+)?:[ \t]*\n"  # -> annotation:
    r"[ \t]*[rRuU]?(?:\"\"\"|''')[ \t]*([^\n]*)",  # the docstring's first line
    re.MULTILINE,
)
"""A public function's ``def`` and the first line of its docstring. (A regular expression:
``ast.parse`` of the standard library takes tens of seconds, this a fraction of one.)"""


def _is_test_path(rel: str) -> bool:
    return any("test" in part for part in rel.split("/"))


def stdlib_signatures(max_bytes: int) -> list[tuple[str, dict]]:
    """Public functions of the standard library with a one-line docstring summary, as
    ``{"prompt": "MODULE: SUMMARY\\n", "completion": "def NAME(ARGS):"}`` records (test
    modules, arguments with comments and ``def`` lines over :data:`MAX_SIGNATURE` characters
    left out; duplicates dropped), in hashed file order, until ``max_bytes`` of text."""
    from shardflow.train.data import _stdlib_files, stable_hash

    files = sorted(_stdlib_files(), key=lambda item: stable_hash(item[0]))
    records, seen, total = [], set(), 0
    for rel, path in files:
        if _is_test_path(rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for match in DEF_WITH_DOCSTRING.finditer(text):
            name, args, summary = match.groups()
            summary = summary.split('"""')[0].split("'''")[0].strip()
            args = " ".join(args.split()).replace("( ", "(").replace(" )", ")").rstrip(", ")
            signature = f"def {name}({args}):"
            if name.startswith("_") or not summary or "#" in args:
                continue
            if len(signature) > MAX_SIGNATURE or (summary, signature) in seen:
                continue
            seen.add((summary, signature))
            record = {"prompt": f"{module}: {summary}\n", "completion": signature}
            line = text.count("\n", 0, match.start()) + 1
            records.append((f"{rel}:{line}", record))
            total += len(record["prompt"]) + len(signature)
            if total >= max_bytes:
                return records
    return records


# ----------------------------------------------------------------------------- rendering


def _byte_segments(record: dict, eos: int) -> list[tuple[list[int] | str, bool]]:
    """(text or token ids, carries loss) pieces of ``record`` for the byte-level model."""
    if "messages" not in record:
        return [(record["prompt"], False), (record["completion"], True), ([eos], True)]
    pieces: list[tuple[list[int] | str, bool]] = []
    for m in record["messages"]:
        pieces.append((BYTE_TEMPLATE.format(role=m["role"]), False))
        if m["role"] == "assistant":
            pieces += [(m["content"], True), ([eos], True)]
        else:
            pieces.append((m["content"] + "\n", False))
    return pieces


def _chat_segments(record: dict, tokenizer: Any, where: str) -> list[tuple[str, bool]]:
    """Pieces of a messages record by the Hugging Face tokenizer's chat template: each message's
    text is what it adds to the rendered conversation; an assistant message's text, past the
    generation prompt, carries loss."""
    inner = tokenizer.inner
    if not getattr(inner, "chat_template", None):
        raise ConfigError(
            f"{where}: messages need the tokenizer's chat template, and the tokenizer in "
            "model.path has none; use prompt/completion records or a tokenizer with a template."
        )

    def render(messages: list[dict], prompt: bool = False) -> str:
        try:
            return inner.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        except Exception as exc:  # the template's own error (jinja), e.g. roles out of order
            raise ConfigError(f"{where}: the chat template refused the messages: {exc}") from exc

    messages, pieces, done = record["messages"], [], ""
    for i, m in enumerate(messages):
        full = render(messages[: i + 1])
        head = render(messages[:i], prompt=True) if m["role"] == "assistant" else done
        if not (full.startswith(head) and head.startswith(done)):
            raise ConfigError(
                f"{where}: the chat template does not render a conversation as a prefix of its "
                "continuation, so the answer tokens cannot be found; use prompt/completion."
            )
        pieces.append((head[len(done) :], False))
        pieces.append((full[len(head) :], m["role"] == "assistant"))
        done = full
    return pieces


def render(record: dict, tokenizer: Any, where: str = "record") -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``record`` and, per token, whether it carries loss."""
    if "messages" in record and hasattr(tokenizer, "inner"):
        pieces: list = _chat_segments(record, tokenizer, where)
    elif hasattr(tokenizer, "inner"):
        pieces = [(record["prompt"], False), (record["completion"], True)]
        pieces.append(([tokenizer.eos_id], True))
    else:
        pieces = _byte_segments(record, tokenizer.eos_id)
    ids, loss = [], []
    for piece, carries in pieces:
        tokens = np.asarray(tokenizer.encode(piece) if isinstance(piece, str) else piece)
        ids.append(tokens.astype(np.int64))
        loss.append(np.full(len(tokens), carries))
    return np.concatenate(ids), np.concatenate(loss)


# ------------------------------------------------------------------------------- packing


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad: int) -> Packed:
    """Whole examples, in order, into rows of ``seq_len + 1`` tokens (see the module doc)."""
    width = seq_len + 1
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    ids: list[np.ndarray] = []
    loss: list[np.ndarray] = []
    docs: list[np.ndarray] = []
    used = 0

    def flush() -> None:
        nonlocal used
        if not ids:
            return
        fill = width - used
        rows.append(
            (
                np.concatenate([*ids, np.full(fill, pad, dtype=np.int64)]),
                np.concatenate([*loss, np.zeros(fill, dtype=bool)]),
                np.concatenate([*docs, np.full(fill, -1, dtype=np.int64)]),
            )
        )
        ids.clear(), loss.clear(), docs.clear()
        used = 0

    for tokens, carries in examples:
        tokens, carries = tokens[:width], carries[:width]
        if used + len(tokens) > width:
            flush()
        ids.append(tokens)
        loss.append(carries)
        docs.append(np.full(len(tokens), len(docs), dtype=np.int64))
        used += len(tokens)
    flush()
    if not rows:
        empty = torch.zeros((0, seq_len), dtype=torch.long)
        return Packed(empty, empty.clone(), empty.clone(), 0, 0, 0)
    tok = torch.from_numpy(np.stack([r[0] for r in rows]))
    car = torch.from_numpy(np.stack([r[1] for r in rows]))
    doc = torch.from_numpy(np.stack([r[2] for r in rows]))
    # a target carries loss when it is an answer token of the same example as its input
    keep = car[:, 1:] & (doc[:, 1:] == doc[:, :-1])
    targets = torch.where(keep, tok[:, 1:], torch.full_like(tok[:, 1:], IGNORE))
    return Packed(
        tok[:, :-1].contiguous(),
        targets,
        doc[:, :-1].contiguous(),
        examples=len(examples),
        tokens=int((doc >= 0).sum()),
        loss_tokens=int(keep.sum()),
    )


def tokenize(
    records: list[tuple[str, dict]], tokenizer: Any, seq_len: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """Rendered examples, and how many were cut to a row and how many dropped (no answer token
    left within the row)."""
    out, cut, dropped = [], 0, 0
    for where, record in records:
        ids, loss = render(record, tokenizer, where)
        if len(ids) > seq_len + 1:
            cut += 1
            if not loss[1 : seq_len + 1].any():
                dropped += 1
                continue
        out.append((ids, loss))
    return out, cut, dropped


def share_text(split: Packed) -> str:
    """``1,234 examples, 56,789 tokens, 38.2% carry loss`` for the plan and the run's header."""
    share = split.loss_tokens / max(1, split.tokens)
    return (
        f"{split.examples:,} examples in {len(split.inputs):,} rows, {split.tokens:,} tokens, "
        f"{split.loss_tokens:,} ({share:.1%}) carry loss"
    )


def load_instruct(cfg: DataConfig, tokenizer: Any, *, warn: bool = True):
    """The training and validation splits (by a hash of each record's key, as documents are
    split) as a :class:`~shardflow.train.data.Corpus` of :class:`Packed` splits."""
    from shardflow.train.data import Corpus, _is_val

    records, source = read_records(cfg)
    if not records:
        raise ConfigError(f"no instruction records in {source}; add JSONL records.")
    splits = {}
    for name, want in (("training", False), ("validation", True)):
        chosen = [(k, r) for k, r in records if _is_val(k, cfg.val_fraction) == want]
        examples, cut, dropped = tokenize(chosen, tokenizer, cfg.seq_len)
        if warn and cut:
            warnings.warn(
                f"data: {cut} of the {name} examples are longer than data.seq_len+1="
                f"{cfg.seq_len + 1} tokens and were cut ({dropped} dropped: no answer token "
                "left); raise data.seq_len to keep them whole.",
                UserWarning,
                stacklevel=2,
            )
        packed = pack(examples, cfg.seq_len, tokenizer.eos_id)
        if packed.loss_tokens == 0:
            raise ConfigError(
                f"the {name} split of {source} has no answer tokens ({len(chosen)} records); "
                "add records or change data.val_fraction."
            )
        splits[name] = packed
    train, val = splits["training"], splits["validation"]
    return Corpus(
        train,
        val,
        train.examples,
        val.examples,
        source,
        summary=f"{source}: train {share_text(train)}; validation {share_text(val)}",
    )


def example_text(record: dict, tokenizer: Any) -> str:
    """``record`` as the model sees it, the loss-carrying text in ``[[...]]``."""
    ids, loss = render(record, tokenizer)
    text, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and loss[j] == loss[i]:
            j += 1
        decoded = tokenizer.decode(ids[i:j].tolist())
        if not hasattr(tokenizer, "inner") and ids[j - 1] == tokenizer.eos_id:
            decoded += "<eos>"  # the byte tokenizer's decode drops it
        text.append(f"[[{decoded}]]" if loss[i] else decoded)
        i = j
    return "".join(text)


def plan_lines(cfg: DataConfig, tokenizer: Any, shown: int = 2) -> list[str]:
    """What the dry run says of instruction data: examples, tokens, the share carrying loss,
    and the first ``shown`` training examples as the model sees them."""
    corpus = load_instruct(cfg, tokenizer, warn=True)
    records, _ = read_records(cfg)
    train = [r for k, r in records if not _is_val_key(k, cfg.val_fraction)][:shown]
    lines = [f"instruction data: {corpus.summary}", "  e.g. ([[...]]: the tokens that carry loss)"]
    for record in train:
        lines += ["  | " + line for line in example_text(record, tokenizer).splitlines()]
    return lines


def _is_val_key(key: str, fraction: float) -> bool:
    from shardflow.train.data import _is_val

    return _is_val(key, fraction)
