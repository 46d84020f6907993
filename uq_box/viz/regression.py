"""Plots for regression: toy data, predictions with uncertainty bands, calibration.

Calibration panels and their metrics come from uncertainty-toolbox (Chung et al. 2021,
arXiv:2109.10254), drawn on axes we own so no global matplotlib state is touched.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
import uncertainty_toolbox as uct
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from uq_box.viz._utils import (
    check_length,
    draw_predictions,
    sorted_by_input,
    to_flat_1d,
    to_numpy,
    training_points,
)

__all__ = ["plot_calibration", "plot_predictions_regression", "plot_toy_regression_data"]

Array = torch.Tensor | ArrayLike


def plot_toy_regression_data(
    X_train: Array,  # noqa: N803 -- the seed tutorials' names (dm.X_train, dm.Y_train, ...)
    Y_train: Array,  # noqa: N803
    X_test: Array,  # noqa: N803
    Y_test: Array,  # noqa: N803
) -> Figure:
    """Scatter plot of 1-D training and test data.

    Args:
        X_train: training inputs, ``[N]`` or ``[N, 1]``.
        Y_train: training targets, ``[N]`` or ``[N, 1]``.
        X_test: test inputs, ``[M]`` or ``[M, 1]``.
        Y_test: test targets, ``[M]`` or ``[M, 1]``.

    Returns:
        Figure with one axes.
    """
    x_train, y_train = training_points(X_train, Y_train)
    x_test, y_test = to_flat_1d("X_test", X_test), to_flat_1d("Y_test", Y_test)
    check_length(len(x_test), Y_test=y_test)

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.scatter(x_test, y_test, s=10, color="tab:orange", alpha=0.5, label="test")
    ax.scatter(x_train, y_train, s=10, color="tab:blue", alpha=0.7, label="train")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("Toy regression data")
    ax.legend()
    return fig


def plot_predictions_regression(
    X_train: Array,  # noqa: N803 -- the seed tutorials' names (dm.X_train, dm.Y_train, ...)
    Y_train: Array,  # noqa: N803
    X_test: Array,  # noqa: N803
    Y_test: Array | None,  # noqa: N803
    pred: Array,
    pred_uct: Array,
    epistemic: Array | None = None,
    aleatoric: Array | None = None,
    title: str | None = None,
    show_bands: bool = True,
) -> Figure:
    """Predictive mean with ±2 std bands over 1-D inputs, and the uncertainties against x.

    Args:
        X_train: training inputs, ``[N]`` or ``[N, 1]``.
        Y_train: training targets, ``[N]`` or ``[N, 1]``.
        X_test: test inputs, ``[M]`` or ``[M, 1]``; predictions are at these points (e.g. the
            toy data modules' dense grid ``X_gtext``).
        Y_test: test targets (ground truth, e.g. ``Y_gtext``), ``[M]`` or ``[M, 1]``, or
            ``None`` to draw none.
        pred: predictive mean, ``[M]`` or ``[M, 1]``.
        pred_uct: total predictive std, ``[M]`` or ``[M, 1]``.
        epistemic: epistemic std, ``[M]`` or ``[M, 1]``.
        aleatoric: aleatoric std, ``[M]`` or ``[M, 1]``.
        title: figure title.
        show_bands: draw ±2 std bands of the epistemic and aleatoric parts as well.

    Returns:
        Figure with one axes, or two when ``epistemic`` or ``aleatoric`` is given (the second
        shows the stds against x).
    """
    train = training_points(X_train, Y_train)
    columns = {"Y_test": Y_test, "pred": pred, "pred_uct": pred_uct}
    x, test = sorted_by_input(X_test, columns | {"epistemic": epistemic, "aleatoric": aleatoric})
    parts = [
        (name, test[name], color)
        for name, color in (("aleatoric", "tab:orange"), ("epistemic", "tab:green"))
        if test[name] is not None
    ]

    ncols = 2 if parts else 1
    fig, axes = plt.subplots(
        1, ncols, figsize=(7 * ncols, 4.5), squeeze=False, constrained_layout=True
    )
    ax = axes[0, 0]
    bands = parts if show_bands else []
    draw_predictions(ax, train, x, test["Y_test"], test["pred"], test["pred_uct"], bands)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("Predictions")
    ax.legend(loc="best", fontsize="small")
    if parts:
        _draw_stds(axes[0, 1], x, test["pred_uct"], parts)
    if title is not None:
        fig.suptitle(title)
    return fig


def _draw_stds(ax: Axes, x: np.ndarray, total: np.ndarray, parts: list) -> None:
    """The total std and each ``(name, std, colour)`` part against the inputs."""
    ax.plot(x, total, color="tab:blue", lw=2, label="total")
    for name, std, color in parts:
        ax.plot(x, std, color=color, lw=1.5, ls="--", label=name)
    ax.set_xlabel("x")
    ax.set_ylabel("predictive std")
    ax.set_title("Uncertainty")
    ax.legend(loc="best", fontsize="small")


def plot_calibration(pred: Array, pred_uct: Array, y: Array, x: Array | None = None) -> Figure:
    """Interval calibration curve with miscalibration area, MACE and RMSCE (uncertainty-toolbox).

    Args:
        pred: predictive mean, ``[N]`` or ``[N, 1]``.
        pred_uct: total predictive std (positive), ``[N]`` or ``[N, 1]``.
        y: targets, ``[N]`` or ``[N, 1]``.
        x: inputs; when given and 1-D (``[N]`` or ``[N, 1]``), a second panel shows the
            prediction intervals ordered by observed value (``uct.plot_intervals_ordered``).

    Returns:
        Figure with one axes, or two when ``x`` is 1-D.
    """
    mean = to_flat_1d("pred", pred).astype(np.float64)
    std = to_flat_1d("pred_uct", pred_uct).astype(np.float64)
    target = to_flat_1d("y", y).astype(np.float64)
    check_length(len(mean), pred_uct=std, y=target)
    if not np.all(std > 0):
        raise ValueError("`pred_uct` must be strictly positive everywhere")
    area = uct.miscalibration_area(mean, std, target)
    mace = uct.mean_absolute_calibration_error(mean, std, target)
    rmsce = uct.root_mean_squared_calibration_error(mean, std, target)

    show_intervals = x is not None and to_numpy(x).ndim == 1
    ncols = 2 if show_intervals else 1
    fig, axes = plt.subplots(
        1, ncols, figsize=(5.5 * ncols, 5.5), squeeze=False, constrained_layout=True
    )
    ax = uct.plot_calibration(mean, std, target, ax=axes[0, 0])
    ax.set_title(
        f"Average calibration\nmiscal. area {area:.3f}  MACE {mace:.3f}  RMSCE {rmsce:.3f}"
    )
    if show_intervals:
        uct.plot_intervals_ordered(mean, std, target, ax=axes[0, 1])
    return fig
