"""Training text: local files, folders and JSONL, or the embedded corpus; tokens and batches.

The embedded corpus is the running Python's own standard-library sources (no download). Every
document has a key (its relative path, plus ``#line`` for JSONL records); a hash of the key puts
it in the training or the validation split, so the split never depends on reading order. Batches
are windows drawn with a generator seeded by (seed, step, micro-batch, rank): a resumed run draws
exactly the batches the interrupted one would have.

Files are read as UTF-8, at most ``data.max_bytes`` bytes of one file (a plain text file: at most
the bytes its first ``max_doc_bytes`` characters can take). Bytes that are not UTF-8 become
U+FFFD with a warning naming the file and the share replaced; a file with more than
:data:`BINARY_FRACTION` of its characters replaced or NUL is binary and skipped, with a warning.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shardflow.train.config import ConfigError, DataConfig

BINARY_FRACTION = 0.3
"""Share of replacement characters and NUL bytes above which a file is binary (skipped)."""

WARNED_FILES = 5
"""Files named in the decoding warnings; more are counted."""

BYTE_EOS = 256
"""End-of-document token of the byte tokenizer (bytes are 0..255)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus one end-of-document token."""

    vocab_size = 257
    eos_id = BYTE_EOS

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text``."""
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        """Text from byte tokens (the end-of-document token is dropped)."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass(slots=True)
class Corpus:
    """Token streams for training and validation, documents joined by the eos token."""

    train: Any
    """A token stream (data.format "text"), or packed examples (``instruct.Packed``)."""
    val: Any
    train_docs: int
    val_docs: int
    source: str
    summary: str = ""
    """What the run's header says of the data ("" : token and document counts)."""


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of ``parts`` that is the same in every process and Python version."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def stdlib_root() -> Path:
    """Folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[str, Path]]:
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        files.append((rel, path))
    return files


def _files_under(index: int, raw: str, suffixes: list[str]) -> list[tuple[str, Path]]:
    path = Path(raw).expanduser()
    if not path.exists():
        raise ConfigError(
            f"data.paths[{index}]={raw!r} does not exist; give an existing file or folder, "
            "or leave data.paths empty for the embedded corpus."
        )
    if path.is_file():
        return [(path.name, path)]
    found = [p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes]
    return [(p.relative_to(path).as_posix(), p) for p in found]


def read_text(path: Path, limit: int) -> tuple[str, bool]:
    """At most ``limit`` bytes of ``path`` as UTF-8 text, and whether the file is longer.

    A byte that is not UTF-8 becomes U+FFFD; a character cut by the limit is dropped; line ends
    are translated to "\\n" as ``open()`` in text mode does."""
    with open(path, "rb") as fh:
        raw = fh.read(limit + 1)
    cut = len(raw) > limit
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(raw[:limit], final=not cut)
    return text.replace("\r\n", "\n").replace("\r", "\n"), cut


def _not_text(text: str) -> float:
    """Share of ``text`` that is U+FFFD (bytes that were not UTF-8) or NUL."""
    return (text.count("\ufffd") + text.count("\x00")) / max(1, len(text))


def _documents(
    key: str, path: Path, cfg: DataConfig, notes: list[str]
) -> Iterator[tuple[str, str]]:
    jsonl = path.suffix == ".jsonl"
    limit = cfg.max_bytes if jsonl else min(cfg.max_bytes, 4 * cfg.max_doc_bytes + 4)
    text, cut = read_text(path, limit)
    bad = _not_text(text)
    if bad > BINARY_FRACTION:
        notes.append(f"{path}: {bad:.0%} of its text is not UTF-8 or NUL; skipped as binary")
        return
    if bad:
        notes.append(f"{path}: {bad:.2%} of its characters were not UTF-8 and became U+FFFD")
    if not jsonl:
        yield key, text
        return
    lines = text.splitlines()
    if cut and lines:
        lines.pop()  # the record the byte limit cut
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{line_no} is not valid JSON ({exc.msg}).") from exc
        if not isinstance(record, dict) or not isinstance(record.get(cfg.text_field), str):
            raise ConfigError(
                f"{path}:{line_no} has no string field data.text_field={cfg.text_field!r}; "
                "set data.text_field to the field holding the text."
            )
        yield f"{key}#{line_no}", record[cfg.text_field]


def _warn_decoding(notes: list[str]) -> None:
    shown = "; ".join(notes[:WARNED_FILES])
    more = f"; and {len(notes) - WARNED_FILES} more files" if len(notes) > WARNED_FILES else ""
    warnings.warn(f"data: {shown}{more}.", UserWarning, stacklevel=3)


def read_documents(cfg: DataConfig, *, warn: bool = True) -> tuple[list[tuple[str, str]], str]:
    """(key, text) pairs, at most ``cfg.max_bytes`` of text, and a description of the source.

    Binary files are skipped; with ``warn``, one warning names the files skipped or decoded
    with replacement characters."""
    if cfg.paths:
        files = [f for i, raw in enumerate(cfg.paths) for f in _files_under(i, raw, cfg.extensions)]
        source = ", ".join(cfg.paths)
    else:
        files = _stdlib_files()
        source = f"embedded corpus (Python standard library at {stdlib_root()})"
    files.sort(key=lambda item: stable_hash(item[0]))
    docs, total, notes = [], 0, []
    for key, path in files:
        for doc_key, text in _documents(key, path, cfg, notes):
            if not text.strip():
                continue
            text = text[: cfg.max_doc_bytes]
            docs.append((doc_key, text))
            total += len(text)
            if total >= cfg.max_bytes:
                break
        if total >= cfg.max_bytes:
            break
    if warn and notes:
        _warn_decoding(notes)
    return docs, source


def _is_val(key: str, fraction: float) -> bool:
    return stable_hash("split", key) % 10_000 < fraction * 10_000


def _join(docs: list[str], encode: Callable[[str], np.ndarray], eos: int) -> torch.Tensor:
    parts = []
    for text in docs:
        parts.append(np.asarray(encode(text), dtype=np.int64))
        parts.append(np.array([eos], dtype=np.int64))
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)


def load_corpus(cfg: DataConfig, tokenizer, *, warn: bool = True) -> Corpus:
    """Read, split and tokenize the corpus; raise :class:`ConfigError` if it cannot train.

    ``warn``: warn about files skipped as binary or decoded with replacements (rank 0).
    ``data.format = "instruct"``: :func:`shardflow.train.instruct.load_instruct`."""
    if cfg.format == "instruct":
        from shardflow.train.instruct import load_instruct

        return load_instruct(cfg, tokenizer, warn=warn)
    docs, source = read_documents(cfg, warn=warn)
    if not docs:
        raise ConfigError(
            f"the corpus ({source}) is empty: no non-blank text in files with suffixes "
            f"{cfg.extensions}; add text or point data.paths elsewhere."
        )
    train = [text for key, text in docs if not _is_val(key, cfg.val_fraction)]
    val = [text for key, text in docs if _is_val(key, cfg.val_fraction)]
    train_tokens = _join(train, tokenizer.encode, tokenizer.eos_id)
    val_tokens = _join(val, tokenizer.encode, tokenizer.eos_id)
    if len(val) == 0 or len(val_tokens) <= cfg.seq_len + 1:
        # Too few documents to split by document: hold out the tail of the token stream.
        everything = torch.cat([train_tokens, val_tokens])
        cut = int(len(everything) * (1 - max(cfg.val_fraction, 0.05)))
        train_tokens, val_tokens = everything[:cut], everything[cut:]
    for name, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) <= cfg.seq_len + 1:
            raise ConfigError(
                f"the {name} split of the corpus ({source}) has {len(tokens)} tokens, fewer than "
                f"data.seq_len+2={cfg.seq_len + 2}; add text or lower data.seq_len."
            )
    return Corpus(train_tokens, val_tokens, len(train), len(val), source)


def sample_batch(
    tokens: torch.Tensor, seq_len: int, batch: int, *key: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (batch, seq_len): windows drawn by a generator seeded by key."""
    gen = torch.Generator().manual_seed(stable_hash(*key) % (2**63))
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen)
    rows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


@dataclass(slots=True)
class Batch:
    """One micro-batch: inputs and targets (batch, seq_len); ``docs`` (packed instruction
    rows): each input token's example, so attention can stay inside it (None for text)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    docs: torch.Tensor | None = None

    def to(self, device: Any) -> Batch:
        docs = None if self.docs is None else self.docs.to(device)
        return Batch(self.inputs.to(device), self.targets.to(device), docs)


def draw_batch(split: Any, seq_len: int, batch: int, *key: object) -> Batch:
    """A micro-batch of ``split``: windows of a token stream (:func:`sample_batch`), or rows of
    packed examples, drawn by a generator seeded by ``key``."""
    if isinstance(split, torch.Tensor):
        return Batch(*sample_batch(split, seq_len, batch, *key))
    gen = torch.Generator().manual_seed(stable_hash(*key) % (2**63))
    rows = torch.randint(0, len(split.inputs), (batch,), generator=gen)
    return Batch(split.inputs[rows], split.targets[rows], split.docs[rows])
