"""Update rules: functional cores and thin ``torch.optim.Optimizer`` classes.

:class:`DolphinFlow8bit` needs bitsandbytes and is imported on first use (``import shardflow``
never imports bitsandbytes).
"""

from typing import Any

from shardflow.optim.base import ShardFlowOptimizer
from shardflow.optim.dolphinflow import DolphinFlow
from shardflow.optim.factored import FactoredAdam, FactoredAdopt, FactoredProdigy
from shardflow.optim.memory import StateFootprint, estimate_state_footprint, state_footprint
from shardflow.optim.registry import build_optimizer, optimizer_names, register_optimizer
from shardflow.optim.release import (
    GradientRelease,
    prepare_for_gradient_release,
    remove_gradient_release,
)
from shardflow.optim.routing import param_groups
from shardflow.optim.schedule import LossAwareSchedule
from shardflow.optim.whiteflow import WhiteFlow


def _dolphinflow8bit(params: Any, **hyper: Any) -> ShardFlowOptimizer:
    from shardflow.optim.dolphinflow8bit import DolphinFlow8bit

    return DolphinFlow8bit(params, **hyper)


register_optimizer("dolphinflow", DolphinFlow)
register_optimizer("dolphinflow8bit", _dolphinflow8bit)
register_optimizer("whiteflow", WhiteFlow)
register_optimizer("factored_adam", FactoredAdam)
register_optimizer("factored_adopt", FactoredAdopt)
register_optimizer("factored_prodigy", FactoredProdigy)


def __getattr__(name: str) -> Any:
    if name == "DolphinFlow8bit":
        from shardflow.optim.dolphinflow8bit import DolphinFlow8bit

        return DolphinFlow8bit
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
    "GradientRelease",
    "register_optimizer",
    "StateFootprint",
    "estimate_state_footprint",
    "state_footprint",
]
