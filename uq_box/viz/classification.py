"""Plots for classification: decision surfaces with uncertainty maps, reliability diagrams and
uncertainty under rotation (out-of-distribution inputs).

The reliability diagram bins predictions by confidence here, with a small numpy helper, instead
of importing the metrics package, so that the viz package depends only on numpy and matplotlib;
its binning (``[lo, hi)`` bins, a confidence of 1 in the last one) is the usual one of
torchmetrics' ``CalibrationError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from uq_box.checks import positive_int
from uq_box.viz._utils import to_flat_1d, to_numpy

__all__ = [
    "plot_decision_surface",
    "plot_reliability_diagram",
    "plot_rotated_examples",
    "plot_uncertainty_vs_rotation",
]

Array = torch.Tensor | ArrayLike


def _labels(name: str, values: Array) -> np.ndarray:
    """1-D integer labels, or raise naming the argument."""
    array = to_flat_1d(name, values)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"`{name}` must hold integer class labels")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise ValueError(f"`{name}` must hold integer class labels, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"`{name}` must hold non-negative class labels, got {array.min()}")
    return array


def _probabilities(name: str, values: Array) -> np.ndarray:
    """``[N, C]`` class probabilities (a 1-D ``[N]`` is ``P(class 1)`` of a binary problem)."""
    probs = np.asarray(to_numpy(values), dtype=np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"`{name}` must have shape [N, C] with C >= 2, got {list(probs.shape)}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise ValueError(f"`{name}` must be probabilities in [0, 1]")
    if not np.allclose(probs.sum(1), 1.0, atol=1e-3):
        raise ValueError(f"`{name}` rows must sum to 1 (class probabilities, not logits)")
    return probs


def _reliability_bins(probs: np.ndarray, target: np.ndarray, num_bins: int) -> dict:
    """Accuracy and mean confidence per confidence bin, and the expected calibration error.

    Args:
        probs: ``[N, C]`` class probabilities.
        target: ``[N]`` integer labels.
        num_bins: equal-width bins on ``[0, 1]``; bin ``b`` holds ``lo <= confidence < hi``,
            with a confidence of exactly 1 in the last bin.

    Returns:
        Dict with ``edges [B + 1]``, ``counts [B]``, ``accuracy [B]`` and ``confidence [B]``
        (NaN for empty bins) and ``ece``: ``sum_b n_b / N * |accuracy_b - confidence_b|``.
    """
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == target).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, num_bins - 1)
    counts = np.bincount(index, minlength=num_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=num_bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, correct_sum / counts, np.nan)
        mean_confidence = np.where(counts > 0, confidence_sum / counts, np.nan)
    ece = float(np.abs(correct_sum - confidence_sum).sum() / len(target))
    return {
        "edges": edges,
        "counts": counts,
        "accuracy": accuracy,
        "confidence": mean_confidence,
        "ece": ece,
    }


def _regular_grid(grid: np.ndarray) -> int | None:
    """``R`` when ``grid`` is the ``R x R`` row-major layout of the data modules' ``grid()``
    (x running fastest, both axes increasing), else ``None``.
    """
    resolution = math.isqrt(len(grid))
    if resolution < 2 or resolution * resolution != len(grid):
        return None
    g = grid.reshape(resolution, resolution, 2)
    xs, ys = g[0, :, 0], g[:, 0, 1]
    if not (np.all(np.diff(xs) > 0) and np.all(np.diff(ys) > 0)):
        return None
    if not (np.allclose(g[..., 0], xs[None, :]) and np.allclose(g[..., 1], ys[:, None])):
        return None
    return resolution


def plot_decision_surface(
    X_train: Array,  # noqa: N803 -- the seed tutorials' names (dm.X_train, dm.Y_train)
    Y_train: Array,  # noqa: N803
    grid: Array,
    probs_or_pred: Array,
    uncertainty: Array,
    grid_extent: Sequence[float] | None = None,
    title: str | None = None,
    uncertainty_label: str = "predictive entropy",
) -> Figure:
    """Predicted classes and an uncertainty map over a 2-D input grid, with the training data.

    Args:
        X_train: training inputs ``[N, 2]``.
        Y_train: training labels ``[N]``.
        grid: ``[M, 2]`` inputs where the predictions were made; the ``R x R`` layout of
            ``TwoMoonsDatamodule.grid()``/``SpiralDatamodule.grid()`` is drawn as an image,
            any other set of points as a triangulation.
        probs_or_pred: class probabilities ``[M, C]`` (the first panel shades each predicted
            class by its probability, white at chance level) or predicted labels ``[M]``.
        uncertainty: ``[M]`` uncertainty at the grid points (e.g. predictive entropy).
        grid_extent: ``(x_min, x_max, y_min, y_max)`` axis limits; default the grid's extent.
        title: figure title.
        uncertainty_label: colorbar label and title of the second panel.

    Returns:
        Figure with two panels and the colorbar of the uncertainty map (three axes).
    """
    x_train = to_numpy(X_train)
    if x_train.ndim != 2 or x_train.shape[1] != 2:
        raise ValueError(f"`X_train` must have shape [N, 2], got {list(x_train.shape)}")
    y = _labels("Y_train", Y_train)
    if len(y) != len(x_train):
        raise ValueError(f"`Y_train` has {len(y)} labels, expected {len(x_train)}")
    points = np.asarray(to_numpy(grid), dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"`grid` must have shape [M, 2], got {list(points.shape)}")
    values = to_flat_1d("uncertainty", uncertainty).astype(np.float64)
    if len(values) != len(points):
        raise ValueError(f"`uncertainty` has {len(values)} values, expected {len(points)}")
    if grid_extent is not None and len(grid_extent) != 4:
        raise ValueError(f"`grid_extent` must be (x_min, x_max, y_min, y_max), got {grid_extent!r}")
    raw = to_numpy(probs_or_pred)
    pred, shade, n_classes = _predicted_classes(raw, len(points))
    n_classes = max(n_classes, int(y.max()) + 1 if len(y) else 1)
    palette = np.array([to_rgb(f"C{k % 10}") for k in range(n_classes)])
    rgb = 1.0 - shade[:, None] * (1.0 - palette[pred])  # blend the class colour with white

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    mappable = _draw_grid_values(axes, points, rgb, values)
    fig.colorbar(mappable, ax=axes[1], label=uncertainty_label)
    if grid_extent is None:
        grid_extent = (*_span(points[:, 0]), *_span(points[:, 1]))
    for ax in axes:
        _draw_training_classes(ax, x_train, y, palette)
        ax.set_xlim(grid_extent[0], grid_extent[1])
        ax.set_ylim(grid_extent[2], grid_extent[3])
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    axes[0].set_title(
        "Predicted class (shade: max probability)" if raw.ndim == 2 else "Predicted class"
    )
    axes[0].legend(loc="upper right", fontsize="small", markerscale=1.5)
    axes[1].set_title(uncertainty_label.capitalize())
    if title is not None:
        fig.suptitle(title)
    return fig


def _span(values: np.ndarray) -> tuple[float, float]:
    return float(values.min()), float(values.max())


def _predicted_classes(raw: np.ndarray, num_points: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(predicted class [M], shade [M] in [0, 1], number of classes)`` of ``probs_or_pred``.

    Probabilities shade each class from white at chance level to its full colour at certainty;
    plain labels get one shade.
    """
    if raw.ndim == 2:
        probs = _probabilities("probs_or_pred", raw)
        pred, confidence = probs.argmax(1), probs.max(1)
        n_classes = probs.shape[1]
        chance = 1.0 / n_classes
        shade = np.clip((confidence - chance) / (1.0 - chance), 0.0, 1.0)
    else:
        pred = _labels("probs_or_pred", raw)
        n_classes = int(pred.max()) + 1 if len(pred) else 1
        shade = np.full(len(pred), 0.7)
    if len(pred) != num_points:
        raise ValueError(f"`probs_or_pred` has {len(pred)} rows, expected {num_points}")
    return pred, shade, n_classes


def _draw_grid_values(axes: np.ndarray, points: np.ndarray, rgb: np.ndarray, values: np.ndarray):
    """The class colours on ``axes[0]`` and the uncertainty map on ``axes[1]``: images on a
    regular grid, else scattered squares and a triangulation. Returns the map's mappable.
    """
    resolution = _regular_grid(points)
    if resolution is None:
        axes[0].scatter(points[:, 0], points[:, 1], c=rgb, s=6, marker="s", linewidths=0)
        return axes[1].tripcolor(points[:, 0], points[:, 1], values, cmap="viridis")
    xs, ys = points[:resolution, 0], points[::resolution, 1]
    dx, dy = (xs[-1] - xs[0]) / (resolution - 1), (ys[-1] - ys[0]) / (resolution - 1)
    extent = (xs[0] - dx / 2, xs[-1] + dx / 2, ys[0] - dy / 2, ys[-1] + dy / 2)
    image = dict(origin="lower", extent=extent, aspect="auto", interpolation="nearest")
    axes[0].imshow(rgb.reshape(resolution, resolution, 3), **image)
    return axes[1].imshow(values.reshape(resolution, resolution), cmap="viridis", **image)


def _draw_training_classes(ax, x_train: np.ndarray, y: np.ndarray, palette: np.ndarray) -> None:
    """The training points, one colour and legend entry per class."""
    for k in range(len(palette)):
        mask = y == k
        if mask.any():
            ax.scatter(
                x_train[mask, 0], x_train[mask, 1], s=12, color=palette[k],
                edgecolors="black", linewidths=0.4, label=f"class {k}",
            )  # fmt: skip


def plot_reliability_diagram(
    probs: Array, target: Array, num_bins: int = 15, title: str | None = None
) -> Figure:
    """Accuracy per confidence bin against the diagonal, with the ECE in the title.

    Args:
        probs: class probabilities ``[N, C]`` (or ``[N]``, ``P(class 1)`` of a binary problem).
        target: ``[N]`` integer labels.
        num_bins: equal-width confidence bins on ``[0, 1]``.
        title: figure title.

    Returns:
        Figure with two axes: the reliability diagram (title ``"... ECE = 0.0123"``) and, below,
        the number of predictions per bin.
    """
    num_bins = positive_int(num_bins, "num_bins")
    p = _probabilities("probs", probs)
    t = _labels("target", target)
    if len(t) != len(p):
        raise ValueError(f"`target` has {len(t)} labels, expected {len(p)}")
    if len(t) == 0:
        raise ValueError("`probs` and `target` are empty")
    if t.max() >= p.shape[1]:
        raise ValueError(f"`target` has label {t.max()} but `probs` has {p.shape[1]} classes")
    bins = _reliability_bins(p, t, num_bins)
    edges, width = bins["edges"], 1.0 / num_bins
    accuracy = np.nan_to_num(bins["accuracy"])
    confidence = np.where(bins["counts"] > 0, bins["confidence"], accuracy)

    fig, (ax, ax_count) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, height_ratios=(3, 1), constrained_layout=True
    )
    ax.bar(
        edges[:-1], accuracy, width=width, align="edge", color="tab:blue",
        edgecolor="black", linewidth=0.5, label="accuracy",
    )  # fmt: skip
    ax.bar(
        edges[:-1], confidence - accuracy, bottom=accuracy, width=width, align="edge",
        color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to confidence",
    )  # fmt: skip
    ax.plot([0, 1], [0, 1], color="black", ls="--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram, ECE = {bins['ece']:.4f}")
    ax.legend(loc="upper left", fontsize="small")
    ax_count.bar(edges[:-1], bins["counts"], width=width, align="edge", color="tab:gray")
    ax_count.set_xlabel("confidence (max probability)")
    ax_count.set_ylabel("count")
    if title is not None:
        fig.suptitle(title)
    return fig


def _curve(name: str, values: Array, n_angles: int) -> np.ndarray:
    """``[A]`` values of a curve; ``[A, N]`` per-input values are averaged over the inputs."""
    array = np.asarray(to_numpy(values), dtype=np.float64)
    if array.ndim == 2:
        array = array.mean(axis=1)
    if array.ndim != 1 or len(array) != n_angles:
        raise ValueError(
            f"`values[{name}]` must have shape [{n_angles}] or [{n_angles}, N] (one entry per "
            f"angle), got {list(np.shape(to_numpy(values)))}"
        )
    return array


def plot_uncertainty_vs_rotation(
    angles: Array,
    values: Mapping[str, Array] | Mapping[str, Mapping[str, Array]],
    ylabel: str = "mean predictive entropy",
    title: str | None = None,
) -> Figure:
    """Uncertainty of several methods as the test inputs rotate away from the training data.

    Args:
        angles: ``[A]`` rotation angles in degrees.
        values: ``{method: curve}`` with one curve ``[A]`` per method (a ``[A, N]`` tensor of
            per-input values is averaged over the inputs), or ``{method: {uncertainty: curve}}``
            for several kinds of uncertainty (e.g. ``pred_uct``, ``aleatoric_uct``,
            ``epistemic_uct``): one panel per kind, sharing the y axis.
        ylabel: y-axis label (with nested dicts, the kind of uncertainty is each panel's title).
        title: figure title.

    Returns:
        Figure with one axes, or one per kind of uncertainty.
    """
    x = to_flat_1d("angles", angles).astype(np.float64)
    if not values:
        raise ValueError("`values` is empty; expected {method: values}")
    nested = [isinstance(v, Mapping) for v in values.values()]
    if any(nested) and not all(nested):
        raise ValueError("`values` must be all {method: curve} or all {method: {kind: curve}}")
    if all(nested):
        kinds: list[str] = []
        for per_kind in values.values():
            kinds += [k for k in per_kind if k not in kinds]
        panels = {kind: {m: v[kind] for m, v in values.items() if kind in v} for kind in kinds}
    else:
        panels = {None: dict(values)}

    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False,
        constrained_layout=True,
    )  # fmt: skip
    methods = list(values)
    for ax, (kind, curves) in zip(axes[0], panels.items(), strict=True):
        for method, curve in curves.items():
            label = method if kind is None else f"{method}/{kind}"
            ax.plot(
                x, _curve(label, curve, len(x)), marker="o", ms=3,
                color=f"C{methods.index(method) % 10}", label=method,
            )  # fmt: skip
        ax.set_xlabel("rotation angle (degrees)")
        if kind is not None:
            ax.set_title(kind)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(ylabel)
    axes[0, 0].legend(loc="best", fontsize="small")
    if title is not None:
        fig.suptitle(title)
    return fig


def plot_rotated_examples(
    images: Array | Sequence[Array],
    angles: Array,
    labels: Array | None = None,
    max_examples: int = 8,
) -> Figure:
    """A grid of images, one row per rotation angle and one column per example.

    Args:
        images: ``[A, K, H, W]`` or ``[A, K, 1, H, W]`` (or ``[A, K, H * W]`` with square
            images), or a sequence of ``A`` arrays ``[K, ...]``: the same ``K`` examples rotated
            by each of the ``A`` angles (see ``DigitsDatamodule.rotated_test``).
        angles: ``[A]`` rotation angles in degrees, the row labels.
        labels: optional ``[K]`` labels, shown above the first row.
        max_examples: at most this many columns.

    Returns:
        Figure with ``A x min(K, max_examples)`` axes.
    """
    if isinstance(images, Sequence) and not isinstance(images, np.ndarray):
        array = np.stack([np.asarray(to_numpy(im), dtype=np.float64) for im in images])
    else:
        array = np.asarray(to_numpy(images), dtype=np.float64)
    if array.ndim == 5 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3:
        side = math.isqrt(array.shape[2])
        if side * side != array.shape[2]:
            raise ValueError(f"`images` of shape {list(array.shape)} are not square images")
        array = array.reshape(*array.shape[:2], side, side)
    if array.ndim != 4:
        raise ValueError(
            f"`images` must have shape [A, K, H, W] or [A, K, 1, H, W], got {list(array.shape)}"
        )
    a = to_flat_1d("angles", angles)
    if len(a) != array.shape[0]:
        raise ValueError(f"`angles` has {len(a)} values, expected {array.shape[0]} (rows)")
    k = min(array.shape[1], max_examples)
    y = None if labels is None else to_flat_1d("labels", labels)
    fig, axes = plt.subplots(
        len(a), k, figsize=(1.2 * k, 1.2 * len(a)), squeeze=False, constrained_layout=True
    )
    for row in range(len(a)):
        for col in range(k):
            ax = axes[row, col]
            ax.imshow(array[row, col], cmap="gray_r", vmin=0.0, vmax=max(1.0, array.max()))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"{a[row]:g}°")
            if row == 0 and y is not None:
                ax.set_title(f"label {y[col]:g}", fontsize="small")
    return fig
