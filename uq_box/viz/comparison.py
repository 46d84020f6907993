"""Side-by-side plots of several UQ methods on the same data."""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from uq_box.viz._utils import to_flat_1d

__all__ = ["plot_predictions_comparison"]

Array = torch.Tensor | ArrayLike


def plot_predictions_comparison(
    X_train: Array,  # noqa: N803 -- the field's usual name for a design matrix
    Y_train: Array,  # noqa: N803
    X_test: Array,  # noqa: N803
    Y_test: Array,  # noqa: N803
    predictions: Mapping[str, Mapping[str, Array]],
    ncols: int = 3,
    title: str | None = None,
) -> Figure:
    """1-D regression predictions of several methods, one panel per method on shared axes.

    Each panel shows the training data, the test targets, the predictive mean and a ±2 std band
    of the total uncertainty, with the ±2 std band of the epistemic part on top when given.

    Args:
        X_train: training inputs, ``[N]`` or ``[N, 1]``.
        Y_train: training targets, ``[N]`` or ``[N, 1]``.
        X_test: test inputs, ``[M]`` or ``[M, 1]``; predictions are at these points.
        Y_test: test targets, ``[M]`` or ``[M, 1]``.
        predictions: ``{method: outputs}`` where ``outputs`` is a method's ``predict_step``
            dict: ``"pred"`` and ``"pred_uct"`` (``[M]`` or ``[M, 1]``), optionally
            ``"epistemic_uct"`` and ``"aleatoric_uct"``.
        ncols: panels per row.
        title: figure title.

    Returns:
        Figure with one axes per method.
    """
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"`ncols` must be a positive integer, got {ncols!r}")
    if not predictions:
        raise ValueError("`predictions` is empty; expected {method: {'pred': ..., ...}}")
    x_train, y_train = to_flat_1d("X_train", X_train), to_flat_1d("Y_train", Y_train)
    if len(y_train) != len(x_train):
        raise ValueError(f"`Y_train` has {len(y_train)} values, expected {len(x_train)}")
    x_test, y_test = to_flat_1d("X_test", X_test), to_flat_1d("Y_test", Y_test)
    if len(y_test) != len(x_test):
        raise ValueError(f"`Y_test` has {len(y_test)} values, expected {len(x_test)}")
    order = np.argsort(x_test, kind="stable")
    x = x_test[order]

    curves: dict[str, dict[str, np.ndarray]] = {}
    for method, outputs in predictions.items():
        if not isinstance(outputs, Mapping):
            raise TypeError(
                f"`predictions[{method!r}]` must be a dict of tensors, got {type(outputs).__name__}"
            )
        missing = [key for key in ("pred", "pred_uct") if key not in outputs]
        if missing:
            raise ValueError(f"`predictions[{method!r}]` lacks {missing}; it has {sorted(outputs)}")
        curves[method] = {}
        for key in ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct"):
            if outputs.get(key) is None:
                continue
            values = to_flat_1d(f"predictions[{method!r}][{key!r}]", outputs[key])
            if len(values) != len(x_test):
                raise ValueError(
                    f"`predictions[{method!r}][{key!r}]` has {len(values)} values, expected "
                    f"{len(x_test)} (one per test input)"
                )
            curves[method][key] = values[order]

    ncols = min(ncols, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), sharex=True, sharey=True,
        squeeze=False, constrained_layout=True,
    )  # fmt: skip
    flat = axes.ravel()
    for ax in flat[len(curves) :]:
        fig.delaxes(ax)
    for i, (ax, (method, c)) in enumerate(zip(flat, curves.items(), strict=False)):
        mean, total = c["pred"], c["pred_uct"]
        ax.scatter(
            x_train, y_train, s=6, color="tab:gray", alpha=0.7, zorder=3, label="training data"
        )
        ax.plot(x, y_test[order], color="black", lw=0.8, alpha=0.4, label="test targets")
        ax.fill_between(
            x, mean - 2 * total, mean + 2 * total, color="tab:blue", alpha=0.2,
            label="±2 std total",
        )  # fmt: skip
        if "epistemic_uct" in c:
            epistemic = c["epistemic_uct"]
            ax.fill_between(
                x, mean - 2 * epistemic, mean + 2 * epistemic, color="tab:green", alpha=0.3,
                label="±2 std epistemic",
            )  # fmt: skip
        ax.plot(x, mean, color="tab:blue", lw=1.8, label="predictive mean")
        ax.set_title(method)
        if i % ncols == 0:
            ax.set_ylabel("y")
        if i >= len(curves) - ncols:
            ax.set_xlabel("x")
        ax.tick_params(labelbottom=True)
    flat[0].legend(loc="best", fontsize="x-small")
    if title is not None:
        fig.suptitle(title)
    return fig
