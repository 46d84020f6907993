"""The train/validation split sizes the synthetic data modules share."""

from __future__ import annotations

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
