"""Native CPU kernels: build a small C source on first use, load it, split rows over threads.

Shared by the hand-written kernels (:mod:`~shardflow.optim.quant8_native`,
:mod:`~shardflow.optim.factored_native`). A :class:`NativeLibrary` holds one C source (AVX2
intrinsics) and the ctypes signatures of its functions. On first use it is compiled with the
system C compiler (``$CC``, else ``cc``) into ``$SHARDFLOW_CACHE_DIR`` (default
``~/.cache/shardflow``), once per source and flags, under a temporary name then renamed, so
concurrent processes never load a partial file; then loaded through :mod:`ctypes`, which
releases the GIL during a call, so :func:`over_rows` runs row ranges on a thread pool.

Used only where :func:`supported`: an x86-64 CPU with AVX2 (``torch.backends.cpu``), a C
compiler, and ``SHARDFLOW_NATIVE`` not set to ``0``. A failed build warns once (naming the
torch path that runs instead) and the library reads as unavailable.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

FLAGS = ["-O3", "-mavx2", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
"""Compiler flags: no contraction into fused multiply-adds unless the source asks for one."""

I64, PTR = ctypes.c_int64, ctypes.c_void_p

PARALLEL_ELEMENTS = 2**16
"""Below this many values a call runs on the calling thread (a pool hand-off costs ~50 µs)."""


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shardflow"
    return Path(os.environ.get("SHARDFLOW_CACHE_DIR", default))


def compiler() -> str:
    return os.environ.get("CC", "cc")


def supported() -> bool:
    """x86-64 with AVX2, a C compiler, and not switched off by ``SHARDFLOW_NATIVE=0``."""
    if os.environ.get("SHARDFLOW_NATIVE", "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    return shutil.which(compiler()) is not None


class NativeLibrary:
    """One C source built and loaded on first call (``lib()``: the ``ctypes.CDLL``, or None
    where unavailable); ``cache_clear()`` forgets the result (tests switch the environment).

    ``name`` names the cached file; ``signatures`` maps each exported function to its ctypes
    argument types (all return ``void``); ``fallback`` ends the warning a failed build gives.
    """

    def __init__(
        self,
        name: str,
        source: str,
        signatures: dict[str, list[type]],
        *,
        fallback: str,
        flags: list[str] | None = None,
    ) -> None:
        self.name, self.source, self.signatures = name, source, signatures
        self.fallback = fallback
        self.flags = FLAGS if flags is None else flags
        self._loaded: list[ctypes.CDLL | None] = []

    def __call__(self) -> ctypes.CDLL | None:
        if not self._loaded:
            self._loaded.append(self._load())
        return self._loaded[0]

    def cache_clear(self) -> None:
        self._loaded.clear()

    def available(self) -> bool:
        """Whether the kernel can run here (built on first call)."""
        return self() is not None

    def build(self) -> Path:
        """The compiled library's path, built first if this source and these flags never were."""
        key = hashlib.sha256((self.source + " ".join(self.flags)).encode()).hexdigest()[:16]
        target = cache_dir() / f"{self.name}_{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source, lib = Path(tmp) / f"{self.name}.c", Path(tmp) / f"{self.name}.so"
            source.write_text(self.source)
            subprocess.run(
                [compiler(), *self.flags, "-o", str(lib), str(source)],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(lib, target)  # atomic: other processes see no file or the whole file
        return target

    def _load(self) -> ctypes.CDLL | None:
        if not supported():
            return None
        try:
            lib = ctypes.CDLL(str(self.build()))
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            warnings.warn(
                f"the native CPU kernel {self.name!r} did not build ({detail}); {self.fallback}",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        for fn_name, argtypes in self.signatures.items():
            fn = getattr(lib, fn_name)
            fn.argtypes, fn.restype = argtypes, None
        return lib


def ptr(t: Tensor | None) -> int | None:
    """A tensor's data pointer (None stays None: a NULL pointer)."""
    return None if t is None else t.data_ptr()


def over_rows(rows: int, numel: int, fn: Callable[[int, int], None]) -> None:
    """``fn(r0, r1)`` over ``[0, rows)``, split into ``torch.get_num_threads()`` row ranges run
    on a thread pool (ctypes releases the GIL) when there is enough work."""
    threads = min(torch.get_num_threads(), rows)
    if threads <= 1 or numel < PARALLEL_ELEMENTS:
        fn(0, rows)
        return
    run_split([rows * i // threads for i in range(threads + 1)], fn)


def run_split(bounds: list[int], fn: Callable[[int, int], None]) -> None:
    """``fn(bounds[i], bounds[i + 1])`` for every range, the first on the calling thread and the
    others on the pool; returns when all are done (re-raising the first error)."""
    pool = _pool(len(bounds) - 2) if len(bounds) > 2 else None
    futures = [pool.submit(fn, a, b) for a, b in zip(bounds[1:-1], bounds[2:])] if pool else []
    fn(bounds[0], bounds[1])
    for f in futures:
        f.result()


_POOLS: dict[tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of ``workers`` threads for this process (a forked child gets its own: the
    parent's threads do not survive a fork)."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = concurrent.futures.ThreadPoolExecutor(workers, "shardflow-native")
    return _POOLS[key]
