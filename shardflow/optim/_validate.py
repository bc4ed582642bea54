"""Checks on hyperparameters that raise ``ValueError`` naming the argument, the value and the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _fail(name: str, value: Any, fix: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {fix}")


def is_number(value: Any) -> bool:
    """An int or float, not a bool (``True`` is an int to Python, never a hyperparameter)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_nonnegative(name: str, value: Any) -> None:
    """A finite number >= 0 (``inf`` weight decay or eps is never meant)."""
    if not is_number(value) or not 0 <= value < math.inf:
        _fail(name, value, "pass a finite number >= 0.")


def check_lr(value: Any, example: str) -> None:
    """A learning rate: a finite number >= 0 (``example``: a typical value, e.g. ``"1e-4"``)."""
    if not is_number(value) or not 0 <= value < math.inf:
        _fail("lr", value, f"pass a learning rate >= 0 (a finite number), e.g. {example}.")


def check_positive(name: str, value: Any) -> None:
    if not is_number(value) or not value > 0:
        _fail(name, value, "pass a number > 0.")


def check_unit_interval(name: str, value: Any) -> None:
    """``0 <= value < 1``, the range of an EMA coefficient."""
    if not is_number(value) or not 0 <= value < 1:
        _fail(name, value, "pass a number in [0, 1), e.g. 0.9.")


def check_int_at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _fail(name, value, f"pass an integer >= {low}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        _fail(name, value, f"choose one of {choices}.")


def check_optional_positive(name: str, value: Any) -> None:
    if value is not None:
        check_positive(name, value)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "pass True or False.")


def check_real_params(optimizer: str, group: dict[str, Any]) -> None:
    """Every parameter of ``group`` is a real floating-point tensor (``optimizer``: the class
    name, for the message); names the first one that is not."""
    names = group.get("param_names") or []
    for i, p in enumerate(group["params"]):
        if p.is_floating_point():
            continue
        name = repr(names[i]) if i < len(names) else f"{i} of its param group"
        why = "complex" if p.is_complex() else "not floating-point"
        raise ValueError(
            f"parameter {name} has dtype {p.dtype} ({why}): {optimizer} updates real "
            "floating-point parameters only (its moments, orthogonalization and low-precision "
            "state are defined for real tensors). View a complex parameter as real with "
            "torch.view_as_real, or optimize it with torch.optim.AdamW."
        )
