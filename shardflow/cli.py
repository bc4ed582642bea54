"""The ``shardflow`` command (the top floor: it imports the runtime, nothing imports it).

    shardflow train CONFIG [--section.field VALUE ...]     train (torchrun: see below)
    shardflow compare CONFIG --optimizers a,b [--lrs x,y]  several optimizers, one plot
    shardflow plan CONFIG [--section.field VALUE ...]      the dry run: nothing is allocated

Under torchrun, as a module: ``torchrun --standalone --nproc-per-node 2 -m shardflow.cli train
configs/quickstart.toml``. Exit codes: 0 done, 1 a failure during training, 2 bad input, 130
interrupted (see :mod:`shardflow.train.cli`).
"""

from __future__ import annotations

import sys

USAGE = __doc__.split("\n\n")[1]

COMMANDS = ("train", "compare", "plan")


def main(argv: list[str] | None = None) -> int:
    """Run ``shardflow COMMAND ...``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage:\n{USAGE}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    from shardflow.train.cli import main_compare, main_plan, main_train

    runners = {"train": main_train, "compare": main_compare, "plan": main_plan}
    if command not in runners:
        print(
            f"shardflow: error: unknown command {command!r}; use one of {', '.join(COMMANDS)}.\n"
            f"usage:\n{USAGE}",
            file=sys.stderr,
        )
        return 2
    return runners[command](rest)


if __name__ == "__main__":
    sys.exit(main())
