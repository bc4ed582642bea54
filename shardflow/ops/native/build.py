"""The one builder of the native CPU kernels: compile a C file on first use, check it, load it.

**What lives where.** The C sources are real files in ``csrc/`` (``csrc/quant8.c``,
``csrc/factored.c``, ``csrc/norm.c``, ``csrc/rounding.c``, ``csrc/dolphinflow.c``), shipped as
package data, with the headers they share (``csrc/dolphinflow_rule.h``: DolphinFlow's
element-wise rule, included by ``dolphinflow.c`` and ``quant8.c``; the builder writes a header
into the source it compiles, :func:`inline_headers`). Each kernel
module beside this one (:mod:`~shardflow.ops.native.quant8`, :mod:`~shardflow.ops.native.factored`,
:mod:`~shardflow.ops.native.norm`, :mod:`~shardflow.ops.native.rounding`) holds only a
:class:`NativeLibrary` naming its C file, the ctypes signatures and structures of the functions
it calls, and its Python entry points. A constant both sides need lives in Python and reaches the
C file as a macro on the command line (``defines``: norm's ``PIECE``, quant8's ``HEAD`` and
``TAIL``; every build gets :data:`PARALLEL_ELEMENTS`); the C file refuses to build without it.

**Building.** On first use a library is compiled with the system C compiler (``$CC``, else
``cc``) with :data:`FLAGS` (AVX2; a kernel may add flags, as quant8's AVX-512 builds do, and
list ``alternatives`` for a compiler that refuses them) into the cache directory, once per
source text, defines, flags and compiler (the file name's key is their sha256). The compiler
writes into a fresh private temporary directory inside the cache, and the library is renamed
into place (atomic), so processes building the same library at once (pytest-xdist workers, gloo
ranks) never see a partial file: each loads a whole one, its own or another's.

**The cache and its safety rules.** The cache is ``$SHARDFLOW_CACHE_DIR``, else
``$XDG_CACHE_HOME/shardflow``, else ``~/.cache/shardflow`` (:func:`cache_dir`). A library found
there is loaded into the process, so no other local user may be able to put one there:

- the directory is created with mode 0700, and before each use it must be a directory owned by
  this user and not writable by group or others (:func:`unsafe_reason`). Otherwise a warning
  names the directory and the fix (``chmod go-w``, or a ``SHARDFLOW_CACHE_DIR`` of one's own),
  and this process builds into a fresh private directory from :func:`tempfile.mkdtemp` instead,
  removed at exit (:func:`private_cache_dir`). Symbolic links are resolved once, before the
  check, and the resolved path is used; the directories above it are trusted (as ``~`` is).
- each build records the sha256 of the library it wrote: in this process (``_BUILT``) and in a
  sidecar ``<library>.sha256`` beside it, written under a temporary name and renamed. Before every
  ``dlopen`` the library must be a file of this user's, not writable by group or others, whose
  sha256 is the one this process recorded when it built it, else the one in its sidecar (another
  process built it; :func:`verified`). A library that fails (bytes changed after its build, a
  file of someone else's, no sidecar: a cache from before these rules) is rebuilt, never
  loaded. (The compilers build the same bytes from the same source and flags, so two processes
  that build one library at once agree on its sha256.)

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

import atexit
import ctypes
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

CSRC = Path(__file__).parent / "csrc"
"""The kernels' C files (package data)."""

FLAGS = ["-O3", "-mavx2", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
"""Compiler flags: no contraction into fused multiply-adds unless the source asks for one."""

I32, I64, PTR = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p

PARALLEL_ELEMENTS = 2**16
"""Below this many values a loop runs on the calling thread (waking the pool costs a few µs):
every build gets it as the macro ``PARALLEL_ELEMENTS``, for the ``omp parallel for if(...)``."""


def cache_dir() -> Path:
    """Where the libraries are cached, as configured (:func:`private_cache_dir`: where they are)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shardflow"
    return Path(os.environ.get("SHARDFLOW_CACHE_DIR", default))


def compiler() -> str:
    return os.environ.get("CC", "cc")


def _unsafe(st: os.stat_result) -> str | None:
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def unsafe_reason(path: Path) -> str | None:
    """Why the directory ``path`` must not hold libraries this process loads (not a directory,
    owned by another user, writable by group or others), or None where it may."""
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    return _unsafe(st)


_FALLBACK: dict[Path, Path] = {}
"""Per configured cache refused: the private directory this process builds into instead."""


def private_cache_dir() -> Path:
    """The cache directory, created with mode 0700 where missing, if :func:`unsafe_reason`
    finds nothing against it (symbolic links resolved); else, with one warning naming it and
    the fix, a fresh private directory of this process's (``tempfile.mkdtemp``, removed at exit)."""
    configured = cache_dir()
    if configured in _FALLBACK:
        return _FALLBACK[configured]
    try:
        configured.mkdir(mode=0o700, parents=True, exist_ok=True)
        resolved = configured.resolve(strict=True)
        problem = unsafe_reason(resolved)
    except OSError as exc:
        problem = f"cannot be created or read ({exc})"
    if problem is None:
        return resolved
    fallback = Path(tempfile.mkdtemp(prefix="shardflow-native-"))
    atexit.register(shutil.rmtree, fallback, ignore_errors=True)
    _FALLBACK[configured] = fallback
    warnings.warn(
        f"the native kernels' cache directory {configured} {problem}, so a library in it could "
        f"be someone else's: not used; this process builds its kernels in {fallback} (removed at "
        f"exit). Fix: `chmod go-w {configured}` if it is yours, or set SHARDFLOW_CACHE_DIR to a "
        "directory of your own (created with mode 0700 where missing).",
        RuntimeWarning,
        stacklevel=2,
    )
    return fallback


_BUILT: dict[Path, str] = {}
"""The sha256 of each library this process built, by path."""


def sidecar(library: Path) -> Path:
    """The file beside ``library`` that records its sha256 (hex, one line)."""
    return library.with_name(library.name + ".sha256")


def _own_file_sha256(path: Path) -> str | None:
    """The sha256 of ``path`` if it is a regular file of this user's that group and others
    cannot write, else None (also where it is missing)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or _unsafe(st) is not None:
                return None
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def recorded_sha256(library: Path) -> str | None:
    """The sha256 recorded for ``library`` at its build: this process's where it built it, else
    its sidecar's (where that is a file of this user's, not writable by group or others)."""
    if library in _BUILT:
        return _BUILT[library]
    side = sidecar(library)
    if _own_file_sha256(side) is None:
        return None
    try:
        return side.read_text().strip()
    except OSError:
        return None


def verified(library: Path) -> bool:
    """Whether ``library`` may be loaded: a file of this user's, not writable by group or
    others, whose sha256 is the one :func:`recorded_sha256` at its build."""
    digest = _own_file_sha256(library)
    return digest is not None and digest == recorded_sha256(library)


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
    """One C file of ``csrc/`` built and loaded on first call (``lib()``: the ``ctypes.CDLL``, or
    None where unavailable); ``cache_clear()`` forgets the result (tests switch the environment).

    ``name`` names the cached file; ``file``: the C file's name in ``csrc/`` (e.g.
    ``"quant8.c"``); ``signatures`` maps each exported function to its ctypes argument types
    (all return ``void``); ``fallback`` ends the warning a failed build gives; ``flags``: the
    compiler flags (default :data:`FLAGS`), ``alternatives``: flags to build with, in order,
    where ``flags`` do not build (a compiler that does not know an instruction set, say);
    ``defines``: macros passed as ``-DNAME=value`` (besides :data:`PARALLEL_ELEMENTS`), the
    Python constants the C file uses.
    """

    def __init__(
        self,
        name: str,
        file: str,
        signatures: dict[str, list[type]],
        *,
        fallback: str,
        flags: list[str] | None = None,
        alternatives: Sequence[list[str]] = (),
        defines: Mapping[str, int | str] | None = None,
    ) -> None:
        self.name, self.file, self.signatures = name, file, signatures
        self.fallback = fallback
        self.base_flags = FLAGS if flags is None else flags
        self.alternatives = list(alternatives)
        self.defines = dict(defines or {})
        self.built_flags: list[str] | None = None
        """The flags of the build loaded (after the first call)."""
        self.path: Path | None = None
        """The library loaded (after the first call)."""
        self.flags = [*self.base_flags, *openmp_flags()]
        self._text: str | None = None  # a variant's source (else the file's)
        self._loaded: list[ctypes.CDLL | None] = []

    @property
    def source_path(self) -> Path:
        """The C file."""
        return CSRC / self.file

    @property
    def source(self) -> str:
        """The C source text built (the file's, or a :meth:`variant`'s), with the headers of
        ``csrc/`` it includes written into it (:func:`inline_headers`)."""
        return inline_headers(self.source_path.read_text() if self._text is None else self._text)

    def variant(
        self, name: str, *, replace: tuple[str, str] | None = None, flags: list[str] | None = None
    ) -> NativeLibrary:
        """This library under another ``name`` (cached apart), its source with ``replace = (old,
        new)`` applied (``old`` must occur) and, given ``flags``, built with those alone: a
        bench's ablation, or a test's private copy. Signatures and defines stay."""
        lib = NativeLibrary(
            name,
            self.file,
            self.signatures,
            fallback=self.fallback,
            flags=self.base_flags if flags is None else flags,
            alternatives=self.alternatives if flags is None else (),
            defines=self.defines,
        )
        if replace is not None:
            old, new = replace
            text = self.source
            if old not in text:
                raise ValueError(f"{self.file} has no {old!r}: nothing to replace")
            lib._text = text.replace(old, new)
        return lib

    def __call__(self) -> ctypes.CDLL | None:
        if not self._loaded:
            self._loaded.append(self._load())
        return self._loaded[0]

    def cache_clear(self) -> None:
        self._loaded.clear()

    def available(self) -> bool:
        """Whether the kernel can run here (built on first call)."""
        return self() is not None

    def define_flags(self) -> list[str]:
        """The ``-D`` flags of every build."""
        defines = {"PARALLEL_ELEMENTS": PARALLEL_ELEMENTS, **self.defines}
        return [f"-D{key}={value}" for key, value in defines.items()]

    def build(self, flags: list[str] | None = None) -> Path:
        """The compiled library's path (in :func:`private_cache_dir`), built first if this
        source, these defines and these flags (default :attr:`flags`) never were, or if the file
        there is not :func:`verified`."""
        flags = self.flags if flags is None else flags
        text, defines = self.source, self.define_flags()
        key = hashlib.sha256("\0".join([text, *defines, *flags, compiler()]).encode())
        target = private_cache_dir() / f"{self.name}_{key.hexdigest()[:16]}.so"
        if verified(target):
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source, lib = Path(tmp) / self.file, Path(tmp) / f"{self.name}.so"
            source.write_text(text)
            subprocess.run(
                [compiler(), *flags, *defines, "-o", str(lib), str(source)],
                check=True,
                capture_output=True,
                text=True,
            )
            with open(lib, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            record = Path(tmp) / "sha256"
            record.write_text(digest + "\n")
            os.chmod(lib, 0o700)  # whatever the umask: verified() refuses group/other-writable
            os.chmod(record, 0o600)
            _BUILT[target] = digest
            # atomic: other processes see no file or the whole file; its record follows (a
            # process that looks between the two renames finds no record and builds it too)
            os.replace(lib, target)
            os.replace(record, sidecar(target))
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
            path = self._build_any()
            if not verified(path):  # checked again right before dlopen
                raise OSError(f"{path} changed after its build (sha256); not loaded")
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            warnings.warn(
                f"the native CPU kernel {self.name!r} did not build ({detail}); {self.fallback}",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        self.path = path
        for fn_name, argtypes in self.signatures.items():
            fn = getattr(lib, fn_name)
            fn.argtypes, fn.restype = argtypes, None
        return lib


_LOCAL_INCLUDE = re.compile(r'^#[ \t]*include "([A-Za-z0-9_]+\.h)"[ \t]*$', re.MULTILINE)


def inline_headers(text: str) -> str:
    """``text`` with each line that includes a header of ``csrc/`` by its quoted name replaced
    by that file's text (once per header, recursively): the source built is one text, so the
    cache key covers the headers too, and a rule shared by two kernels
    (``dolphinflow_rule.h``) is written once."""
    seen: set[str] = set()

    def expand(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in seen:
            return f"/* {name}: already included */"
        seen.add(name)
        body = (CSRC / name).read_text()
        return (
            f"/* ---- {name} ---- */\n{_LOCAL_INCLUDE.sub(expand, body)}/* ---- end {name} ---- */"
        )

    return _LOCAL_INCLUDE.sub(expand, text)


def ptr(t: Tensor | None) -> int | None:
    """A tensor's data pointer (None stays None: a NULL pointer)."""
    return None if t is None else t.data_ptr()
