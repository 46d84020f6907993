"""Argument checks shared by every package: one place for "a positive integer" and its message.

Each check returns the value converted to the plain Python type, or raises a ``ValueError`` that
names the argument, what was given and what is expected.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["non_negative_int", "positive_finite", "positive_int"]


def positive_int(value: int, name: str) -> int:
    """Check that argument ``name`` is an integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(value: int, name: str) -> int:
    """Check that argument ``name`` is an integer ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}")
    return int(value)


def positive_finite(value: float, name: str) -> float:
    """Check that argument ``name`` is a finite number ``> 0``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")
    return float(value)
