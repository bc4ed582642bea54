"""The bytes on disk: a streaming safetensors writer, dtype names, tagged JSON, the error type.

**safetensors** (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian
``N``, then ``N`` bytes of JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}`` padded with spaces, then the tensors' raw little-endian bytes back to
back. We write it ourselves so that a file streams out one tensor (one chunk) at a time — no
whole-file byte buffer as ``safetensors.torch.save_file`` builds — hashing the bytes (SHA-256) as
they go, and ``fsync`` before returning. Reading uses the safetensors library (``safe_open``,
memory-mapped, ``get_slice`` reads only the rows asked for).

**Tagged JSON**: hyperparameters and non-tensor state go into the index as JSON. Values JSON
cannot hold are written as one-key objects and decoded by a fixed table — never ``eval``, never
pickle: ``{"__tuple__": [...]}``, ``{"__dtype__": "bfloat16"}``, ``{"__tensor__": {"dtype",
"shape", "data"}}`` (small tensors only, e.g. an ``lr`` given as a tensor).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT_NAME = "shardflow-checkpoint"
FORMAT_VERSION = 2
"""1: the first format; 2: the index records its own SHA-256 (:data:`INDEX_HASH_KEY`). Both are
read; a version-1 index has no hash to check."""
INDEX_NAME = "index.json"
INDEX_HASH_KEY = "index_sha256"
"""The index key holding :func:`index_digest` of the rest of the index (version 2 on)."""
CHUNK_BYTES = 2 << 20
"""Bytes hashed and written (or read and hashed) at a time. Small enough that the writer thread's
copy and the hash read the same bytes from the CPU cache: 2 MiB saves ~15% over 16 or 64 MiB
here (bench/checkpoint.py state, 2-core CPU, medians of 6 interleaved saves: 1.02 s vs 1.20 s)."""
STAGE_BYTES = 64 << 20
"""Bytes copied from an accelerator to the host at a time (the host staging memory a save needs)."""
SMALL_TENSOR_ELEMENTS = 4096
"""Largest tensor hyperparameter stored inline in JSON."""


class CheckpointError(ValueError):
    """A checkpoint cannot be written or loaded; the message names the file and what is wrong."""


_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (the name the index records)."""
    return str(dtype).removeprefix("torch.")


_BY_NAME = {dtype_name(d): d for d in _SAFETENSORS_DTYPES}


def dtype_from_name(name: str) -> torch.dtype:
    """The inverse of :func:`dtype_name`, limited to the dtypes safetensors stores."""
    if name not in _BY_NAME:
        raise CheckpointError(f"unknown dtype {name!r} in the index: known are {sorted(_BY_NAME)}.")
    return _BY_NAME[name]


def check_storable(name: str, tensor: Tensor) -> None:
    """Refuse a tensor safetensors cannot hold (complex, quantized, sparse...)."""
    if tensor.dtype not in _SAFETENSORS_DTYPES or tensor.layout != torch.strided:
        raise CheckpointError(
            f"{name} is a {tensor.layout} tensor of dtype {tensor.dtype}, which safetensors cannot "
            f"store: keep state in one of {sorted(_BY_NAME)} (strided)."
        )


# -- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What the index records about one written file."""

    bytes: int
    sha256: str


def _byte_chunks(tensor: Tensor) -> Iterator[memoryview]:
    """The tensor's bytes in order, :data:`CHUNK_BYTES` at a time, without a full copy.

    A contiguous CPU tensor is viewed, not copied; another device's tensor is copied to the CPU
    :data:`STAGE_BYTES` at a time (so saving needs one stage of host memory, not one tensor).
    """
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return
    step = max(1, STAGE_BYTES // flat.element_size())
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        if part.device.type != "cpu":
            part = part.cpu()
        stage = memoryview(part.contiguous().view(torch.uint8).numpy())
        for lo in range(0, len(stage), CHUNK_BYTES):
            yield stage[lo : lo + CHUNK_BYTES]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(
    path: Path,
    tensors: list[tuple[str, Tensor]],
    metadata: dict[str, str] | None = None,
) -> FileRecord:
    """Write ``tensors`` as one safetensors file, streaming and hashing; fsync before returning."""
    specs = [(name, t.shape, t.dtype) for name, t in tensors]
    for name, t in tensors:
        check_storable(name, t)
    return write_safetensors_stream(path, specs, (t for _, t in tensors), metadata)


def write_safetensors_stream(
    path: Path,
    specs: list[tuple[str, torch.Size, torch.dtype]],
    tensors: Iterator[Tensor],
    metadata: dict[str, str] | None = None,
    checksum: bool = True,
) -> FileRecord:
    """Write a safetensors file whose header is ``specs`` (name, shape, dtype) and whose tensors
    come one at a time from ``tensors`` (produced lazily: e.g. each gathered only when needed).
    ``checksum=False`` skips the SHA-256 (the record's ``sha256`` is then empty)."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; this machine is big-endian.")
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name} has dtype {dtype}, which safetensors cannot store.")
        size = math.prod(shape) * _element_size(dtype)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256() if checksum else _NoDigest()
    written = 0
    with open(path, "wb") as f, ThreadPoolExecutor(1) as pool:
        for piece in (struct.pack("<Q", len(raw)), raw):
            f.write(piece)
            digest.update(piece)
            written += len(piece)
        for name, shape, dtype in specs:
            # The tensor lives only inside _write_tensor: a lazily gathered one is freed before
            # the next is produced.
            written += _write_tensor(f, pool, digest, name, shape, dtype, next(tensors, None))
        if next(tensors, None) is not None:
            raise CheckpointError(f"{path}: more tensors were given than the header lists.")
        f.flush()
        os.fsync(f.fileno())
    if written != 8 + len(raw) + offset:
        raise CheckpointError(f"{path}: wrote {written} bytes, expected {8 + len(raw) + offset}.")
    return FileRecord(bytes=written, sha256=digest.hexdigest())


class _NoDigest:
    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _write_tensor(f, pool, digest, name: str, shape, dtype: torch.dtype, t: Tensor | None) -> int:
    """Write one tensor's bytes, hashing chunk k while the writer thread writes it."""
    if t is None or t.shape != shape or t.dtype != dtype:
        got = "nothing" if t is None else f"{tuple(t.shape)} {t.dtype}"
        raise CheckpointError(
            f"{name} changed while being written: {got}, header says {tuple(shape)} {dtype}."
        )
    written = 0
    for chunk in _byte_chunks(t):
        pending = pool.submit(f.write, chunk)
        digest.update(chunk)
        written += pending.result()
    return written


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def index_text(index: dict[str, Any]) -> str:
    """The index as JSON a person can read: one top-level key, file or tensor per line."""
    lines = []
    for key, value in index.items():
        if isinstance(value, dict) and key in ("files", "tensors") and value:
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def index_digest(index: dict[str, Any]) -> str:
    """SHA-256 of the index without its own hash, as canonical JSON (sorted keys, no spaces):
    the same for the dict written and the dict read back, whatever the file's layout."""
    body = {k: v for k, v in index.items() if k != INDEX_HASH_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_file_name(index_path: Path, name: Any) -> None:
    """A file the index lists is a plain name inside the checkpoint directory (no folder, no
    ``..``, not absolute): an edited index must not make a load read files elsewhere."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
    if not plain or "/" in name or "\\" in name:
        raise CheckpointError(
            f"{str(index_path)!r} lists the file {name!r}, which is not a plain file name inside "
            "the checkpoint directory: a checkpoint only reads its own files; the index was "
            "edited or damaged. Restore it, or save the checkpoint again."
        )


def write_text(path: Path, text: str) -> None:
    """Write a text file and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, reading chunk k+1 (in a thread) while hashing chunk k."""
    digest = hashlib.sha256()
    buffers = [bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)]
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1) as pool:
        current = 0
        pending = pool.submit(f.readinto, buffers[current])
        while n := pending.result():
            ready = memoryview(buffers[current])[:n]
            current ^= 1
            pending = pool.submit(f.readinto, buffers[current])
            digest.update(ready)
    return digest.hexdigest()


class SafetensorsReader:
    """Read rows of tensors from a safetensors file straight into existing tensors.

    The header is parsed and checked (JSON, dtypes, shapes, offsets inside the file, no overlap)
    on opening; :meth:`read_rows` then ``readinto``-s the bytes of rows ``[lo, hi)`` directly into
    the destination's memory — no memory map, no temporary tensor — for a contiguous CPU
    destination (others go through one temporary of the rows read).
    """

    MAX_HEADER = 100 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            self.entries = self._parse()
        except Exception:
            self.file.close()
            raise

    def _parse(self) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
        size = os.fstat(self.file.fileno()).st_size
        head = self.file.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{str(self.path)!r} is too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, self.MAX_HEADER):
            raise CheckpointError(f"{str(self.path)!r} has a header length ({n}) past its end.")
        try:
            header = json.loads(self.file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{str(self.path)!r} has a malformed header ({exc}).") from exc
        self.base = 8 + n
        codes = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = codes[info["dtype"]], [int(s) for s in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{str(self.path)!r}: bad header entry {name!r}.") from exc
            if end - begin != math.prod(shape) * _element_size(dtype) or end > size - self.base:
                raise CheckpointError(
                    f"{str(self.path)!r}: {name}'s bytes [{begin}, {end}) do not fit its shape "
                    f"{shape} or the file."
                )
            entries[name] = (dtype, shape, begin, end)
        return entries

    def info(self, name: str) -> tuple[torch.dtype, list[int]]:
        if name not in self.entries:
            raise CheckpointError(f"{str(self.path)!r} lacks {name}, which the index places there.")
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def read_rows(
        self, name: str, out: Tensor, lo: int | None = None, hi: int | None = None
    ) -> None:
        """Fill ``out`` with rows ``[lo, hi)`` of ``name`` (the whole tensor when ``lo`` is None)."""
        dtype, shape, begin, end = self.entries[name]
        if lo is None:
            offset, nbytes = begin, end - begin
        else:
            row = math.prod(shape[1:]) * _element_size(dtype)
            offset, nbytes = begin + lo * row, (hi - lo) * row
        target = out
        if out.device.type != "cpu" or not out.is_contiguous() or out.dtype != dtype:
            target = torch.empty(out.shape, dtype=dtype)
        view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        if len(view) != nbytes:
            raise CheckpointError(f"{str(self.path)!r}: {name} rows do not match the destination.")
        done = 0
        while done < nbytes:
            got = os.preadv(self.file.fileno(), [view[done:]], self.base + offset + done)
            if got <= 0:
                raise CheckpointError(f"{str(self.path)!r} ended while reading {name}.")
            done += got
        if target is not out:
            out.copy_(target)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- tagged JSON --------------------------------------------------------------------------------


def encode_value(value: Any, where: str) -> Any:
    """``value`` as JSON-able data (see the module docstring); CheckpointError naming ``where``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": dtype_name(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        if any(k.startswith("__") and k.endswith("__") for k in value):
            raise CheckpointError(f"{where}: dict keys of the form __name__ are reserved.")
        return {k: encode_value(v, where) for k, v in value.items()}
    if isinstance(value, Tensor) and value.numel() <= SMALL_TENSOR_ELEMENTS:
        check_storable(where, value)
        return {
            "__tensor__": {
                "dtype": dtype_name(value.dtype),
                "shape": list(value.shape),
                "data": value.detach().cpu().reshape(-1).tolist(),
            }
        }
    raise CheckpointError(
        f"{where} holds a {type(value).__name__}, which a checkpoint cannot store without pickle: "
        "use None, bool, int, float, str, a list/tuple/dict of them, a torch.dtype or a small tensor."
    )


def decode_value(data: Any) -> Any:
    """The inverse of :func:`encode_value`."""
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        ((key, inner),) = data.items()
        if key == "__tuple__":
            return tuple(decode_value(v) for v in inner)
        if key == "__dtype__":
            return dtype_from_name(inner)
        if key == "__tensor__":
            dtype = dtype_from_name(inner["dtype"])
            return torch.tensor(inner["data"], dtype=dtype).reshape(inner["shape"])
    return {k: decode_value(v) for k, v in data.items()}
