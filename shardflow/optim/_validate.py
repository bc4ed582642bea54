"""Checks on hyperparameters that raise ``ValueError`` naming the argument, the value and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _fail(name: str, value: Any, fix: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {fix}")


def check_nonnegative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        _fail(name, value, "pass a number >= 0.")


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        _fail(name, value, "pass a number > 0.")


def check_unit_interval(name: str, value: Any) -> None:
    """``0 <= value < 1``, the range of an EMA coefficient."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
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
