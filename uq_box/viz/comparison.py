"""Side-by-side plots of several UQ methods on the same data."""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from uq_box.checks import positive_int
from uq_box.viz._utils import draw_predictions, sorted_by_input, training_points

__all__ = ["plot_predictions_comparison"]

Array = torch.Tensor | ArrayLike

#: the prediction keys a panel reads (the first two required)
CURVES = ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct")


def plot_predictions_comparison(
    X_train: Array,  # noqa: N803 -- the seed tutorials' names (dm.X_train, dm.Y_train, ...)
    Y_train: Array,  # noqa: N803
    X_test: Array,  # noqa: N803
    Y_test: Array | None,  # noqa: N803
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
        X_test: test inputs, ``[M]`` or ``[M, 1]``; predictions are at these points (e.g. the
            toy data modules' dense grid ``X_gtext``).
        Y_test: test targets (e.g. ``Y_gtext``), ``[M]`` or ``[M, 1]``, or ``None``.
        predictions: ``{method: outputs}`` where ``outputs`` is a method's ``predict_step``
            dict: ``"pred"`` and ``"pred_uct"`` (``[M]`` or ``[M, 1]``), optionally
            ``"epistemic_uct"`` and ``"aleatoric_uct"``.
        ncols: panels per row.
        title: figure title.

    Returns:
        Figure with one axes per method.
    """
    ncols = positive_int(ncols, "ncols")
    if not predictions:
        raise ValueError("`predictions` is empty; expected {method: {'pred': ..., ...}}")
    train = training_points(X_train, Y_train)
    x, curves = _sorted_curves(X_test, Y_test, predictions)

    ncols = min(ncols, len(predictions))
    nrows = math.ceil(len(predictions) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), sharex=True, sharey=True,
        squeeze=False, constrained_layout=True,
    )  # fmt: skip
    flat = axes.ravel()
    for ax in flat[len(predictions) :]:
        fig.delaxes(ax)
    for i, (ax, method) in enumerate(zip(flat, predictions, strict=False)):
        c = curves[method]
        parts = (
            [("epistemic", c["epistemic_uct"], "tab:green")]
            if c["epistemic_uct"] is not None
            else []
        )
        draw_predictions(ax, train, x, curves["Y_test"], c["pred"], c["pred_uct"], parts, 6)
        ax.set_title(method)
        if i % ncols == 0:
            ax.set_ylabel("y")
        if i >= len(predictions) - ncols:
            ax.set_xlabel("x")
        ax.tick_params(labelbottom=True)
    flat[0].legend(loc="best", fontsize="x-small")
    if title is not None:
        fig.suptitle(title)
    return fig


def _sorted_curves(
    X_test: Array,  # noqa: N803
    Y_test: Array | None,  # noqa: N803
    predictions: Mapping[str, Mapping[str, Array]],
) -> tuple[np.ndarray, dict]:
    """The test inputs in increasing order, ``Y_test`` and each method's curves in that order.

    Returns ``(x, curves)`` with ``curves["Y_test"]`` and ``curves[method][key]`` for the keys
    ``pred``, ``pred_uct``, ``epistemic_uct`` and ``aleatoric_uct`` (``None`` when not given).
    """
    columns: dict[str, Array | None] = {"Y_test": Y_test}
    for method, outputs in predictions.items():
        if not isinstance(outputs, Mapping):
            raise TypeError(
                f"`predictions[{method!r}]` must be a dict of tensors, got {type(outputs).__name__}"
            )
        missing = [key for key in ("pred", "pred_uct") if key not in outputs]
        if missing:
            raise ValueError(f"`predictions[{method!r}]` lacks {missing}; it has {sorted(outputs)}")
        for key in CURVES:
            columns[f"predictions[{method!r}][{key!r}]"] = outputs.get(key)
    x, flat = sorted_by_input(X_test, columns)
    curves: dict = {"Y_test": flat["Y_test"]}
    for method in predictions:
        curves[method] = {key: flat[f"predictions[{method!r}][{key!r}]"] for key in CURVES}
    return x, curves
