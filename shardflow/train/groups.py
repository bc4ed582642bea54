"""Param-group routing: regex rules over parameter names, first match wins."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from shardflow.train.config import ConfigError, GroupRule


@dataclass(slots=True)
class RoutedGroup:
    """One param group: the rule that made it, its parameter names and its parameters."""

    index: int
    pattern: str
    options: dict[str, Any]
    names: list[str] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)

    def as_param_group(self) -> dict[str, Any]:
        """The dict a torch optimizer takes."""
        return {"params": self.params, **self.options}


def own_names(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Parameter]]:
    """``model``'s parameters under the names its own model gives them, which routing patterns
    are written against: a wrapper holding the real model as ``inner`` (a Hugging Face model,
    :class:`~shardflow.train.hf.CausalLM`) is looked through, so ``^model\\.embed_tokens``
    matches, not ``inner.model.embed_tokens``."""
    inner = getattr(model, "inner", None)
    return (inner if isinstance(inner, torch.nn.Module) else model).named_parameters()


def _compile(index: int, rule: GroupRule) -> re.Pattern:
    try:
        return re.compile(rule.pattern)
    except re.error as exc:
        raise ConfigError(
            f"optim.groups[{index}].pattern={rule.pattern!r} is not a valid regex ({exc})."
        ) from exc


def route_params(
    named: Iterable[tuple[str, torch.Tensor]], rules: list[GroupRule]
) -> list[RoutedGroup]:
    """Assign each trainable parameter to the first rule whose pattern it matches.

    No rules means one group holding every parameter. A rule that matches nothing, or a
    parameter that matches no rule, is a :class:`ConfigError`.
    """
    named = [(n, p) for n, p in named if p.requires_grad]
    if not rules:
        rules = [GroupRule(pattern=".*")]
    compiled = [_compile(i, rule) for i, rule in enumerate(rules)]
    groups = [RoutedGroup(i, r.pattern, dict(r.options)) for i, r in enumerate(rules)]
    unmatched = []
    for name, param in named:
        hit = next((i for i, regex in enumerate(compiled) if regex.search(name)), None)
        if hit is None:
            unmatched.append(name)
            continue
        groups[hit].names.append(name)
        groups[hit].params.append(param)
    if unmatched:
        raise ConfigError(
            f"parameters match no optim.groups pattern: {unmatched[:5]}"
            f'{" ..." if len(unmatched) > 5 else ""}; add a last group with pattern = ".*".'
        )
    for group in groups:
        if not group.names:
            raise ConfigError(
                f"optim.groups[{group.index}].pattern={group.pattern!r} matches no parameter "
                "(or only parameters an earlier group took); fix the pattern or remove the group. "
                f"Parameter names look like {[n for n, _ in named[:3]]}."
            )
    return groups
