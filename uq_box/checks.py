"""Argument checks shared by every package: one place for "a positive integer" and its message.

Each check returns the value converted to the plain Python type, or raises a ``ValueError`` that
names the argument, what was given and what is expected (:func:`number_in` raises a
:class:`NotANumberError`, both a ``TypeError`` and a ``ValueError``, for a value that is no
number at all).
"""

from __future__ import annotations

import math
import numbers

__all__ = [
    "NotANumberError",
    "int_at_least",
    "non_negative_finite",
    "non_negative_int",
    "number_in",
    "positive_finite",
    "positive_int",
]


class NotANumberError(TypeError, ValueError):
    """An argument that should be a number is of another type (``"0.1"``, ``True``, ``None``)."""


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


def int_at_least(value: int, name: str, minimum: int) -> int:
    """Check that argument ``name`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
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


def non_negative_finite(value: float, name: str) -> float:
    """Check that argument ``name`` is a finite number ``>= 0``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"`{name}` must be a non-negative finite number, got {value!r}")
    return float(value)


def number_in(
    value: float, name: str, low: float, high: float = math.inf, *, closed: str = ""
) -> float:
    """Check that argument ``name`` is a number in ``(low, high)``.

    ``closed`` names the ends that belong to the interval: ``"low"``, ``"high"`` or both
    (``"low high"``); ``number_in(p, "p", 0, 1, closed="low")`` is ``0 <= p < 1``. NaN is never
    inside. A value that is no real number (a bool included) raises :class:`NotANumberError`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NotANumberError(f"`{name}` must be a number, got {value!r}")
    above = value >= low if "low" in closed else value > low
    below = value <= high if "high" in closed else value < high
    if not (above and below):
        interval = (
            f"{'[' if 'low' in closed else '('}{low:g}, {high:g}{']' if 'high' in closed else ')'}"
        )
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}")
    return float(value)
