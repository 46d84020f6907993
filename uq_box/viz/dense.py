"""Plots of dense predictions: per-pixel uncertainty maps and sparsification curves."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["plot_dense_predictions", "plot_sparsification"]

COLUMNS = ("image", "target", "prediction", "aleatoric", "epistemic", "error")


def _np(value: Tensor) -> np.ndarray:
    return value.detach().cpu().double().numpy()


def plot_dense_predictions(
    images: Tensor,
    target: Tensor,
    preds: Mapping[str, Tensor],
    num_images: int = 4,
    ignore_index: int = -100,
    title: str | None = None,
) -> Figure:
    """One row per image: image | target | prediction | aleatoric map | epistemic map | error.

    Segmentation (``pred`` ``[N, C, H, W]``, labels ``[N, H, W]``): the argmax labels, the
    expected entropy and the mutual information, and the wrong pixels (unlabeled pixels grey).
    Pixel regression (``pred`` ``[N, T, H, W]``, targets ``[N, T, H, W]``): target 0's mean,
    aleatoric and epistemic stds and absolute error.

    Args:
        images: inputs ``[N, C_in, H, W]`` (the first channel is shown).
        target: labels ``[N, H, W]`` or targets ``[N, T, H, W]``.
        preds: the prediction dict (``pred``, ``aleatoric_uct``, ``epistemic_uct``).
        num_images: rows (the first images).
        ignore_index: label of unlabeled pixels.
        title: the figure's title.
    """
    count = min(num_images, len(images))
    segmentation = target.ndim == 3
    fig, axes = plt.subplots(count, 6, figsize=(13, 2.2 * count + 0.4), squeeze=False)
    for row in range(count):
        if segmentation:
            num_classes = preds["pred"].shape[1]
            labels = target[row]
            shown = torch.where(labels == ignore_index, torch.full_like(labels, -1), labels)
            predicted = preds["pred"][row].argmax(0)
            wrong = (predicted != labels).double()
            wrong[labels == ignore_index] = 0.5
            panels = [
                (_np(images[row, 0]), "gray", None),
                (_np(shown), "tab10", (-1, 9)),
                (_np(predicted), "tab10", (-1, 9)),
                (_np(preds["aleatoric_uct"][row]), "magma", (0, np.log(num_classes))),
                (_np(preds["epistemic_uct"][row]), "magma", None),
                (_np(wrong), "Reds", (0, 1)),
            ]
        else:
            truth = target[row, 0]
            mean = preds["pred"][row, 0]
            low, high = float(truth.min()), float(truth.max())
            panels = [
                (_np(images[row, 0]), "gray", None),
                (_np(truth), "viridis", (low, high)),
                (_np(mean), "viridis", (low, high)),
                (_np(preds["aleatoric_uct"][row, 0]), "magma", None),
                (_np(preds["epistemic_uct"][row, 0]), "magma", None),
                (_np((mean - truth).abs()), "Reds", None),
            ]
        for col, (values, cmap, limits) in enumerate(panels):
            ax = axes[row, col]
            vmin, vmax = limits if limits is not None else (None, None)
            image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(COLUMNS[col])
            if col >= 3:
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sparsification(
    curves: Mapping[str, Mapping[str, Tensor]], title: str | None = None
) -> Figure:
    """Sparsification curves (mean error of the pixels kept against the fraction removed).

    Args:
        curves: a name (e.g. ``"total"``, ``"aleatoric"``) to the dict of
            :func:`uq_box.metrics.dense.sparsification_curve` (``fractions``, ``curve``,
            ``oracle``, ``ause``); the oracle of the first is drawn dashed.
        title: the axes' title.
    """
    fig, ax = plt.subplots(figsize=(5, 4))
    first = None
    for name, curve in curves.items():
        first = first or curve
        label = f"{name} (AUSE {float(curve['ause']):.3g})"
        ax.plot(_np(curve["fractions"]), _np(curve["curve"]), marker=".", label=label)
    if first is not None:
        ax.plot(_np(first["fractions"]), _np(first["oracle"]), "k--", label="oracle")
    ax.set_xlabel("fraction of pixels removed (most uncertain first)")
    ax.set_ylabel("mean error of the pixels kept")
    ax.set_title(title or "sparsification")
    ax.legend()
    fig.tight_layout()
    return fig
