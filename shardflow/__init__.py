"""ShardFlow: sharded, orthogonalizing, memory-frugal optimizers and the runtime that carries them.

``import shardflow`` stays light: optional pieces (the 8-bit optimizer, which needs
bitsandbytes) are imported only when first used.
"""

from typing import Any

from shardflow.optim import (
    DolphinFlow,
    FactoredAdam,
    FactoredAdopt,
    FactoredProdigy,
    LossAwareSchedule,
    ShardFlowOptimizer,
    WhiteFlow,
    build_optimizer,
    optimizer_names,
    param_groups,
    prepare_for_gradient_release,
    remove_gradient_release,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Lazy exports (``DolphinFlow8bit``) come from :mod:`shardflow.optim`."""
    from shardflow import optim

    if name in optim.__all__:
        return getattr(optim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DolphinFlow",
    "DolphinFlow8bit",
    "FactoredAdam",
    "FactoredAdopt",
    "FactoredProdigy",
    "LossAwareSchedule",
    "ShardFlowOptimizer",
    "WhiteFlow",
    "build_optimizer",
    "optimizer_names",
    "param_groups",
    "prepare_for_gradient_release",
    "remove_gradient_release",
]
