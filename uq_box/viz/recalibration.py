"""The calibration of a regression model before and after recalibration, from PIT values."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from uq_box.viz._utils import to_numpy

Array = torch.Tensor | ArrayLike

__all__ = ["plot_recalibration"]


def _curve(pit: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray, float]:
    expected = np.linspace(0.0, 1.0, num_bins)
    observed = np.searchsorted(np.sort(pit), expected, side="right") / pit.size
    gap = np.abs(observed - expected)
    area = float(np.sum(0.5 * (gap[1:] + gap[:-1]) * np.diff(expected)))
    return expected, observed, area


def plot_recalibration(
    pit_before: Array,
    pit_after: Array,
    labels: tuple[str, str] = ("before", "after"),
    num_bins: int = 100,
) -> Figure:
    """Quantile calibration curves and PIT histograms of a model before and after recalibration.

    A PIT value is the predictive CDF at the observed target, ``F(y | x)``; a calibrated model's
    PIT values are uniform on ``[0, 1]``: its curve (the fraction of PIT values ``<= p`` against
    ``p``) is the diagonal and its histogram flat. The legend gives the area between each curve
    and the diagonal (trapezoidal, on ``num_bins`` levels). Get the values from a
    recalibration wrapper: ``wrapper.pit(x, y, calibrated=False)`` and ``wrapper.pit(x, y)``.

    Args:
        pit_before: PIT values of the uncalibrated model, any shape (flattened), in ``[0, 1]``.
        pit_after: PIT values of the recalibrated model.
        labels: legend labels of the two.
        num_bins: levels of the curves, at least 2.

    Returns:
        Figure with two axes: the curves, and the two PIT histograms.
    """
    if int(num_bins) < 2:
        raise ValueError(f"`num_bins` must be an integer >= 2, got {num_bins!r}")
    values = []
    for name, pit in (("pit_before", pit_before), ("pit_after", pit_after)):
        array = np.asarray(to_numpy(pit), dtype=np.float64).reshape(-1)
        if array.size == 0 or not np.all((array >= 0) & (array <= 1)):
            raise ValueError(f"`{name}` must be non-empty PIT values in [0, 1]")
        values.append(array)
    fig, (curves, hist) = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)
    curves.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="ideal")
    for array, label, color in zip(values, labels, ("tab:red", "tab:blue"), strict=True):
        expected, observed, area = _curve(array, int(num_bins))
        curves.plot(expected, observed, color=color, lw=2, label=f"{label} (area {area:.3f})")
        hist.hist(array, bins=20, range=(0, 1), density=True, alpha=0.5, color=color, label=label)
    curves.set_xlabel("predicted level p")
    curves.set_ylabel("observed fraction of targets with F(y | x) <= p")
    curves.set_title("Quantile calibration")
    curves.set_aspect("equal")
    curves.legend(loc="upper left", fontsize="small")
    hist.axhline(1.0, color="0.5", ls="--", lw=1)
    hist.set_xlabel("PIT value F(y | x)")
    hist.set_ylabel("density")
    hist.set_title("PIT histogram (flat when calibrated)")
    hist.legend(loc="best", fontsize="small")
    return fig
