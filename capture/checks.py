"""Argument checks that name the argument, what it got and what it takes (used by the config dataclasses
of capture and the monitor, so `capture.attach(cadence="5")` and `watch(groups=0)` fail at the call)."""
from __future__ import annotations

import numbers


def _got(value) -> str:
    return f"{type(value).__name__} {value!r}"


def check_int(name: str, value, minimum: int | None = None, optional: bool = False) -> None:
    """An int (not a bool, not a float) >= minimum; None too when `optional`."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an int" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if optional else "")
        raise TypeError(f"{name} must be {what}, got {_got(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {_got(value)}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_got(value)}")


def check_names(name: str, value, optional: bool = True) -> None:
    """A list of strings (module names / patterns, layouts); None too when `optional`."""
    if value is None and optional:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a list of str{' or None' if optional else ''}, got {_got(value)}")
