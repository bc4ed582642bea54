"""Update rules: functional cores and thin ``torch.optim.Optimizer`` classes."""

from shardflow.optim.base import ShardFlowOptimizer
from shardflow.optim.dolphinflow import DolphinFlow
from shardflow.optim.registry import build_optimizer, optimizer_names, register_optimizer
from shardflow.optim.routing import param_groups
from shardflow.optim.schedule import LossAwareSchedule

register_optimizer("dolphinflow", DolphinFlow)

__all__ = [
    "DolphinFlow",
    "LossAwareSchedule",
    "ShardFlowOptimizer",
    "build_optimizer",
    "optimizer_names",
    "param_groups",
    "register_optimizer",
]
