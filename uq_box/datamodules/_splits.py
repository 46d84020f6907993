"""The train/validation split sizes the synthetic data modules share."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from uq_box.checks import int_at_least, number_in


def split_counts(n_points: int, val_fraction: float, min_points: int = 2) -> tuple[int, int]:
    """``(n_train, n_val)`` of ``n_points`` with ``round(n_points * val_fraction)`` held out.

    Checks ``n_points >= min_points`` and ``val_fraction`` in ``[0, 1)``, and that the split
    leaves at least one training point, naming the arguments the user passed.
    """
    n_points = int_at_least(n_points, "n_points", min_points)
    val_fraction = number_in(val_fraction, "val_fraction", 0.0, 1.0, closed="low")
    n_val = round(n_points * val_fraction)
    if n_points - n_val < 1:
        raise ValueError(
            f"`val_fraction`={val_fraction} of `n_points`={n_points} leaves no training point"
        )
    return n_points - n_val, n_val


def check_input_range(x_min: float, x_max: float) -> None:
    """Raise a ``ValueError`` unless ``x_min < x_max``."""
    if not x_min < x_max:
        raise ValueError(f"`x_min` must be below `x_max`, got {x_min} and {x_max}")


def independent_splits(
    draw: Callable[[int], tuple[Tensor, Tensor]], n_train: int, n_val: int, n_test: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor, Tensor]:
    """``(x_train, y_train, x_val, y_val, x_test, y_test)``, each split drawn independently by
    ``draw(n)`` in that order (``ArrayDataModule``'s arguments); no validation split (``None``)
    when ``n_val`` is 0.
    """
    x_train, y_train = draw(n_train)
    x_val, y_val = draw(n_val) if n_val > 0 else (None, None)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_val, y_val, x_test, y_test
