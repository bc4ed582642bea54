"""The package's floors: each imports only the floors below it, and no Python file holds C.

Floors, bottom up: ``ops`` (torch only), ``distributed``, ``optim``, ``checkpoint``, ``train``,
``cli`` (the ``shardflow`` command).
Read from the source (every ``import`` and ``from … import`` statement, at any depth in the
module), so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shardflow"
FLOORS = ["ops", "distributed", "optim", "checkpoint", "train", "cli"]
"""Bottom up. Each is a folder (``shardflow/train``) or a module (``shardflow/cli.py``, the
``shardflow`` command, the top floor: nothing in the package imports it)."""


def _files(floor: str) -> list[Path]:
    """The Python files of ``floor``: a folder's, at any depth, or the one module."""
    folder = PACKAGE / floor
    if folder.is_dir():
        return sorted(folder.rglob("*.py"))
    module = PACKAGE / f"{floor}.py"
    assert module.is_file(), f"floor {floor!r} is neither {folder} nor {module}"
    return [module]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(parts[: len(parts) - node.level])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "shardflow" or parts[1] not in FLOORS:
        return None
    return FLOORS.index(parts[1])


@pytest.mark.parametrize("floor", FLOORS)
def test_a_floor_imports_only_floors_below(floor: str) -> None:
    level = FLOORS.index(floor)
    upward = []
    for path in _files(floor):
        for module in _imports(path):
            target = _floor(module)
            if target is not None and target > level:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not upward, "imports that point up a floor:\n" + "\n".join(upward)


def test_ops_imports_only_torch_and_the_standard_library() -> None:
    allowed_roots = {"torch", "shardflow", "__future__"}
    import sys  # noqa: PLC0415

    foreign = []
    for path in sorted((PACKAGE / "ops").rglob("*.py")):
        for module in _imports(path):
            root = module.split(".")[0]
            if root in allowed_roots or root in sys.stdlib_module_names:
                continue
            if root == "bitsandbytes" and path.name == "quant8.py":
                continue  # the 8-bit codes are bitsandbytes' table, imported where used
            foreign.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not foreign, "\n".join(foreign)


def test_no_python_file_holds_c_source() -> None:
    holders = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if "#include" in path.read_text()
    ]
    assert not holders, f"C source inside Python files (move it to a .c file): {holders}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk above finds imports in function bodies and relative ones (the test can fail)."""
    probe = PACKAGE / "ops" / "_probe_for_test.py"
    probe.write_text("def f():\n    from ..optim import base\n    import shardflow.train.loop\n")
    try:
        found = _imports(probe)
    finally:
        probe.unlink()
    assert "shardflow.optim.base" in found and "shardflow.train.loop" in found
    assert _floor("shardflow.optim.base") > FLOORS.index("ops")
    assert _floor("shardflow.cli") > _floor("shardflow.train.cli")  # the command is the top
