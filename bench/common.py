"""Pieces several benchmarks share."""

from __future__ import annotations

import datetime
import json
import platform
import sysconfig
from pathlib import Path
from typing import Any

import torch


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The first ``limit`` bytes of the running Python's standard-library ``.py`` sources (in
    sorted path order), as a long tensor of byte values: a corpus with no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def command_text(script: str) -> str:
    """``python script`` with this process's arguments, quoted: the command a results file
    names."""
    import shlex  # noqa: PLC0415
    import sys  # noqa: PLC0415

    return " ".join(["python", script, *(shlex.quote(a) for a in sys.argv[1:])])


def results_head(title: str, script: str, note: str) -> list[str]:
    """The first lines of a results file: title, the command that wrote it
    (:func:`command_text`) and the machine, with ``note`` (placement, load...)."""
    import os  # noqa: PLC0415
    import platform  # noqa: PLC0415

    return [
        f"# {title}",
        "",
        f"Command: `{command_text(script)}` (from the repository root)",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or 'cpu'}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}; {note}",
        "",
    ]


def run_meta(module: str, args: Any, **extra: Any) -> dict[str, Any]:
    """The command (``python -m MODULE`` and every option of ``args`` but ``--out``), the date and
    the machine, for a results file."""
    options = " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k != "out"
    )
    return dict(
        command=f"python -m {module} {options}",
        date=datetime.date.today().isoformat(),
        machine=f"{platform.machine()}, 2-core CPU, shared, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}",
        **extra,
    )


def write_results(out: Path | None, table: str, data: dict[str, Any]) -> None:
    """``table`` to ``out`` (Markdown) and ``data`` beside it as JSON; nothing when ``out`` is None."""
    if out is not None:
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
