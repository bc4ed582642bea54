"""Native CPU kernels: build a small C source on first use, load it, split rows over threads.

Shared by the hand-written kernels (:mod:`~shardflow.ops.native.quant8`,
:mod:`~shardflow.ops.native.factored`). A :class:`NativeLibrary` holds one C source (AVX2
intrinsics, built with :data:`FLAGS`; a kernel may add flags, as quant8_native's AVX-512 builds
do) and the ctypes signatures of its functions. On first use it is compiled with the
system C compiler (``$CC``, else ``cc``) into ``$SHARDFLOW_CACHE_DIR`` (default
``~/.cache/shardflow``), once per source and flags, under a temporary name then renamed, so
concurrent processes never load a partial file; then loaded through :mod:`ctypes`.

**Threads.** The kernels split their loops with OpenMP pragmas and are linked against the
OpenMP runtime torch itself loaded (``torch/lib/libgomp.so.1``; the loader finds it already in
the process by its soname): one thread pool for torch's ops and ours, sized by
``torch.set_num_threads``. A Python thread pool, as used before, competed with torch's OpenMP
threads, which spin for a while after each torch op, and gained nothing on two cores
(bench/results/factored-cpu-2026-11-23.md, Run 5). Where torch has no OpenMP runtime to share,
the pragmas are ignored and the kernels run on the calling thread.

Used only where :func:`supported`: an x86-64 CPU with AVX2 (``torch.backends.cpu``), a C
compiler, and ``SHARDFLOW_NATIVE`` not set to ``0``. A failed build warns once (naming the
torch path that runs instead) and the library reads as unavailable.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

FLAGS = ["-O3", "-mavx2", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
"""Compiler flags: no contraction into fused multiply-adds unless the source asks for one."""

I64, PTR = ctypes.c_int64, ctypes.c_void_p

PARALLEL_ELEMENTS = 2**16
"""Below this many values a loop runs on the calling thread (waking the pool costs a few µs):
the C sources get it as ``PARALLEL_ELEMENTS``, for their ``omp parallel for if(...)``."""


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shardflow"
    return Path(os.environ.get("SHARDFLOW_CACHE_DIR", default))


def compiler() -> str:
    return os.environ.get("CC", "cc")


SERIAL = ["-Wno-unknown-pragmas"]
"""Flags of a serial build: the OpenMP pragmas ignored."""


def openmp_flags() -> list[str]:
    """Flags that link a kernel against torch's own OpenMP runtime (GNU's, bundled in
    ``torch/lib``), or :data:`SERIAL` where torch has none to share."""
    lib = Path(torch.__file__).parent / "lib"
    if torch._C.has_openmp and (lib / "libgomp.so.1").exists():
        return ["-fopenmp", f"-L{lib}", f"-Wl,-rpath,{lib}"]
    return SERIAL


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
    argument types (all return ``void``); ``fallback`` ends the warning a failed build gives;
    ``alternatives``: flags to build with, in order, where ``flags`` do not build (a compiler
    that does not know an instruction set, say).
    """

    def __init__(
        self,
        name: str,
        source: str,
        signatures: dict[str, list[type]],
        *,
        fallback: str,
        flags: list[str] | None = None,
        alternatives: Sequence[list[str]] = (),
    ) -> None:
        self.name, self.source, self.signatures = name, source, signatures
        self.fallback = fallback
        self.base_flags = FLAGS if flags is None else flags
        self.alternatives = list(alternatives)
        self.built_flags: list[str] | None = None
        """The flags of the build loaded (after the first call)."""
        self.flags = [*self.base_flags, *openmp_flags()]
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

    def build(self, flags: list[str] | None = None) -> Path:
        """The compiled library's path, built first if this source and these flags (default
        :attr:`flags`) never were."""
        flags = self.flags if flags is None else flags
        text = f"#define PARALLEL_ELEMENTS {PARALLEL_ELEMENTS}\n{self.source}"
        key = hashlib.sha256((text + " ".join(flags)).encode()).hexdigest()[:16]
        target = cache_dir() / f"{self.name}_{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source, lib = Path(tmp) / f"{self.name}.c", Path(tmp) / f"{self.name}.so"
            source.write_text(text)
            subprocess.run(
                [compiler(), *flags, "-o", str(lib), str(source)],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(lib, target)  # atomic: other processes see no file or the whole file
        return target

    def _build_any(self) -> Path:
        """:meth:`build` with the first flags that build: the base flags, then each of
        :attr:`alternatives`, each linked to OpenMP first, then serial (no ``libgomp.so`` for
        the linker, say)."""
        tries = []
        for base in (self.base_flags, *self.alternatives):
            for flags in ([*base, *openmp_flags()], [*base, *SERIAL]):
                if flags not in tries:
                    tries.append(flags)
        for flags in tries:
            try:
                path = self.build(flags)
            except subprocess.CalledProcessError as exc:
                error = exc
                continue
            self.built_flags = flags
            return path
        raise error  # the last build's

    def _load(self) -> ctypes.CDLL | None:
        if not supported():
            return None
        try:
            lib = ctypes.CDLL(str(self._build_any()))
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
