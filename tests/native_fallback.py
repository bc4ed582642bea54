"""A shared check for the native CPU kernels (:mod:`shardflow.ops.native.build`): the off switch and
a failed build both leave the kernel unavailable, and the torch path then does the work."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shardflow.ops.native import dolphinflow as dolphinflow_native
from shardflow.ops.native import factored as factored_native
from shardflow.ops.native import kahan as kahan_native
from shardflow.ops.native import norm as norm_native
from shardflow.ops.native import quant8 as quant8_native
from shardflow.ops.native import rounding as rounding_native
from shardflow.ops.native import whiteflow as whiteflow_native
from shardflow.ops.native.build import NativeLibrary


def check_off_switch_and_failed_build(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path,
    library: NativeLibrary,
    torch_path: Callable[[], None],
) -> None:
    """``SHARDFLOW_NATIVE=0`` makes ``library`` unavailable; with a compiler that fails it warns
    once (naming the torch path), leaves no partial file in the cache, and ``torch_path()`` (which
    asserts its own result) runs; afterwards the kernel is available again. The other kernels
    are loaded first, so that only ``library`` meets the failing compiler."""
    kernels = (
        dolphinflow_native,
        factored_native,
        kahan_native,
        norm_native,
        quant8_native,
        rounding_native,
        whiteflow_native,
    )
    for other in kernels:
        other._library()
    try:
        library.cache_clear()
        monkeypatch.setenv("SHARDFLOW_NATIVE", "0")
        assert library() is None
        library.cache_clear()
        monkeypatch.setenv("SHARDFLOW_NATIVE", "1")
        monkeypatch.setenv("SHARDFLOW_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("CC", "false")
        with pytest.warns(RuntimeWarning, match="did not build.*torch"):
            assert library() is None
        torch_path()
        assert not list(tmp_path.iterdir())  # no partial library left behind
    finally:
        monkeypatch.undo()
        library.cache_clear()
    assert library() is not None
