"""The builder of the native kernels (:mod:`shardflow.ops.native.build`): the C files come from
the package, the cache directory is private or not used, and a library whose bytes are not the
ones its build recorded is rebuilt, never loaded."""

from __future__ import annotations

import hashlib
import importlib
import os
import pkgutil
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import torch

import shardflow.ops.native as native_pkg
from shardflow.ops.native import build
from shardflow.ops.native import norm as norm_native
from shardflow.ops.native import rounding as rounding_native

REPO = Path(__file__).resolve().parents[1]

needs_kernels = pytest.mark.skipif(
    not norm_native.available(), reason="no native kernel here (needs x86-64 AVX2 and cc)"
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _libraries() -> dict[str, build.NativeLibrary]:
    """Every NativeLibrary the kernel modules of shardflow.ops.native define, by module."""
    found = {}
    for info in pkgutil.iter_modules(native_pkg.__path__):
        module = importlib.import_module(f"{native_pkg.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, build.NativeLibrary):
                found[info.name] = value
    return found


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """A fresh cache directory for this test, and no build or refused directory remembered."""
    monkeypatch.setattr(build, "_BUILT", {})
    monkeypatch.setattr(build, "_FALLBACK", {})
    monkeypatch.setenv("SHARDFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _check_norm(lib: build.NativeLibrary, monkeypatch) -> None:
    """``lib`` (a build of norm.c) loads and sums as fp64 does."""
    assert lib() is not None
    monkeypatch.setattr(norm_native, "_library", lib)
    x = torch.randn(70_001, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        norm_native.sq_norms([x])[0], x.double().square().sum(), rtol=1e-12, atol=0
    )


# --- the C files --------------------------------------------------------------------------------


def test_every_kernel_reads_its_c_file_from_the_package():
    """Each kernel module's library names a file of ``csrc/`` (found through the package's
    resources, as an installed wheel has it), and every ``csrc/*.c`` has a loader."""
    libraries = _libraries()
    assert {"quant8", "factored", "norm", "rounding"} <= set(libraries)
    packaged = resources.files(native_pkg) / "csrc"
    for lib in libraries.values():
        assert lib.source_path.parent == build.CSRC
        assert (packaged / lib.file).is_file(), lib.file
        assert "#include" in lib.source
    assert {p.name for p in build.CSRC.glob("*.c")} == {lib.file for lib in libraries.values()}


def test_the_c_files_are_package_data():
    """pyproject.toml ships ``csrc/*.c`` in the wheel (checked by hand with ``pip wheel``)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "csrc/*.c" in config["tool"]["setuptools"]["package-data"]["shardflow.ops.native"]


def test_python_constants_reach_c_as_defines():
    """One source of truth: the C files take these values from the builder's ``-D`` flags."""
    flags = norm_native._library.define_flags()
    assert f"-DPIECE={norm_native.PIECE}" in flags
    assert f"-DPARALLEL_ELEMENTS={build.PARALLEL_ELEMENTS}" in flags
    assert not re.search(r"#define\s+PIECE\b", norm_native._library.source)
    from shardflow.ops.native import quant8 as quant8_native  # noqa: PLC0415

    flags = quant8_native._library.define_flags()
    assert {f"-DHEAD={quant8_native.HEAD_BLOCK}", f"-DTAIL={quant8_native.TAIL_BLOCK}"} <= set(
        flags
    )


@needs_kernels
def test_the_cache_key_covers_source_defines_and_flags(cache):
    """A different source text, define or flag is a different file in the cache."""
    lib = rounding_native._library.variant("rounding_key")
    paths = {
        lib.build(),
        lib.variant("rounding_key", replace=("return 1;", "return 2;")).build(),
        lib.build([*lib.flags, "-O2"]),
    }
    lib.defines["UNUSED"] = 1
    paths.add(lib.build())
    assert len(paths) == 4


# --- the cache directory ------------------------------------------------------------------------


def test_a_new_cache_directory_is_private(cache):
    assert not cache.exists()
    assert build.private_cache_dir() == cache.resolve()
    st = cache.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o703])
def test_a_cache_writable_by_group_or_others_is_not_used(cache, monkeypatch, mode):
    """Another user could plant a library there: a warning names the directory and the fix,
    and the kernels build in a fresh private directory instead (and still work)."""
    cache.mkdir()
    cache.chmod(mode)
    with pytest.warns(
        RuntimeWarning, match=rf"{re.escape(str(cache))} is writable by group.*chmod go-w"
    ):
        used = build.private_cache_dir()
    try:
        assert used != cache and stat.S_IMODE(used.stat().st_mode) == 0o700
        assert build.private_cache_dir() == used  # one warning, one directory per process
        if norm_native.available():
            lib = norm_native._library.variant("norm_refused_dir")
            _check_norm(lib, monkeypatch)
            assert lib.path.parent == used
        assert not list(cache.iterdir())
    finally:
        shutil.rmtree(used)


def test_a_cache_owned_by_another_user_is_not_used(cache, monkeypatch):
    cache.mkdir(mode=0o700)
    real_stat, target = Path.stat, cache.resolve()

    def stat_as_if_foreign(self, **kwargs):
        st = real_stat(self, **kwargs)
        if self == target:
            fields = list(st)
            fields[stat.ST_UID] = os.geteuid() + 1
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(Path, "stat", stat_as_if_foreign)
    with pytest.warns(RuntimeWarning, match=rf"{re.escape(str(cache))} is owned by uid"):
        used = build.private_cache_dir()
    try:
        assert used != cache and used.stat().st_uid == os.geteuid()
    finally:
        shutil.rmtree(used)


def test_a_cache_that_is_not_a_directory_is_not_used(cache):
    cache.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match=re.escape(str(cache))):
        used = build.private_cache_dir()
    shutil.rmtree(used)


# --- the recorded sha256 ------------------------------------------------------------------------


def _flip_a_byte(path: Path, other: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # in place: the file was never loaded


def _plant_another_library(path: Path, other: Path) -> None:
    """Another valid library under this one's name, its sidecar forged to match."""
    os.replace(other, path)
    build.sidecar(path).write_text(_sha256(path) + "\n")


def _make_group_writable(path: Path, other: Path) -> None:
    path.chmod(0o777)


@needs_kernels
@pytest.mark.parametrize("tamper", [_flip_a_byte, _plant_another_library, _make_group_writable])
def test_a_tampered_library_is_rebuilt_not_loaded(cache, monkeypatch, tamper):
    lib = norm_native._library.variant("norm_tamper")
    path = lib.build()
    good = _sha256(path)
    assert build.sidecar(path).read_text().strip() == good == build.recorded_sha256(path)
    other = rounding_native._library.variant("rounding_plant").build()
    tamper(path, other)
    bad, inode = _sha256(path), path.stat().st_ino
    assert not build.verified(path)
    _check_norm(lib, monkeypatch)  # builds again, then loads
    assert lib.path == path and build.verified(path) and path.stat().st_ino != inode
    assert _sha256(path) == good  # the same bytes as the first build
    assert bad != good or tamper is _make_group_writable
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


@needs_kernels
def test_a_library_without_a_record_is_rebuilt(cache, monkeypatch):
    """No record in this process and no sidecar (a cache from before the sha256 records)."""
    lib = norm_native._library.variant("norm_unrecorded")
    path = lib.build()
    build.sidecar(path).unlink()
    monkeypatch.setattr(build, "_BUILT", {})
    inode = path.stat().st_ino
    assert not build.verified(path)
    _check_norm(lib, monkeypatch)
    assert path.stat().st_ino != inode and build.verified(path)


@needs_kernels
def test_another_process_build_is_loaded_through_its_sidecar(cache, monkeypatch):
    """A library built by another process (its sidecar, no record here) is loaded as it is."""
    lib = norm_native._library.variant("norm_sidecar")
    path = lib.build()
    monkeypatch.setattr(build, "_BUILT", {})
    inode = path.stat().st_ino
    _check_norm(lib, monkeypatch)
    assert path.stat().st_ino == inode


@needs_kernels
def test_a_library_changed_between_build_and_dlopen_is_not_loaded(cache, monkeypatch):
    """The check right before ``dlopen``: if the file changes after :meth:`build` returned, the
    kernel warns and reads as unavailable (the torch path runs)."""
    lib = norm_native._library.variant("norm_race_check")
    real_build_any = lib._build_any

    def build_then_tamper():
        path = real_build_any()
        _flip_a_byte(path, path)
        return path

    monkeypatch.setattr(lib, "_build_any", build_then_tamper)
    with pytest.warns(RuntimeWarning, match="changed after its build"):
        assert lib() is None


@needs_kernels
def test_processes_building_one_library_at_once_all_load_it(tmp_path):
    """Three processes build and load one library into an empty cache at the same moment:
    each gets a working kernel, and the cache holds one library and its record, nothing else."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        import torch
        from shardflow.ops.native import norm
        Path(sys.argv[1]).touch()
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
        lib = norm._library = norm._library.variant("norm_concurrent")
        x = torch.randn(100_000)
        torch.testing.assert_close(
            norm.sq_norms([x])[0], x.double().square().sum(), rtol=1e-12, atol=0
        )
        assert lib.path is not None
        """
    )
    env = {**os.environ, "SHARDFLOW_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"ready{i}")], env=env)
        for i in range(3)
    ]
    try:
        while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
            assert all(p.poll() is None for p in procs), "a process died before the start"
            time.sleep(0.05)
        go.touch()
        assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    finally:
        for p in procs:
            p.kill()
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 2 and names[0].endswith(".so") and names[1] == names[0] + ".sha256"
