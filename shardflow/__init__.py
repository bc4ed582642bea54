"""ShardFlow: sharded, orthogonalizing, memory-frugal optimizers and the runtime that carries them.

``import shardflow`` stays light: optional pieces (the 8-bit optimizer, which needs
bitsandbytes) are imported only when first used.
"""

from shardflow.optim import (
    DolphinFlow,
    LossAwareSchedule,
    ShardFlowOptimizer,
    build_optimizer,
    param_groups,
)

__version__ = "0.1.0"

__all__ = [
    "DolphinFlow",
    "LossAwareSchedule",
    "ShardFlowOptimizer",
    "build_optimizer",
    "param_groups",
]
