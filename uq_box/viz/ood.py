"""Plots of out-of-distribution (OOD) detection: score histograms and ROC curves.

Scores follow the convention of :mod:`uq_box.methods.ood`: **higher = more OOD**, OOD inputs
the positive class. The ROC curve is computed here with a few lines of numpy (every distinct
threshold, ties crossing together, as ``sklearn.metrics.roc_curve(drop_intermediate=False)``),
so that the viz package depends only on numpy and matplotlib; its area is the AUROC of
:func:`uq_box.metrics.functional_classification.ood_auroc`.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from uq_box.viz._utils import to_numpy

__all__ = ["ood_roc_curve", "plot_ood_detection"]

Array = torch.Tensor | ArrayLike


def _scores(name: str, values: Array) -> np.ndarray:
    """Non-empty finite 1-D scores (any shape is flattened), or raise naming the argument."""
    array = np.asarray(to_numpy(values), dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"`{name}` is empty; expected at least one score")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` holds NaN or inf; expected finite scores")
    return array


def ood_roc_curve(scores_in: Array, scores_out: Array) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from ``(0, 0)`` to ``(1, 1)``.

    OOD inputs (``scores_out``) are the positive class, flagged when the score is at least the
    threshold; tied scores cross a threshold together.

    Args:
        scores_in: scores of in-distribution inputs.
        scores_out: scores of OOD inputs.

    Returns:
        ``(fpr, tpr)``, two float64 arrays of the same length.
    """
    s_in, s_out = _scores("scores_in", scores_in), _scores("scores_out", scores_out)
    scores = np.concatenate([s_in, s_out])
    labels = np.concatenate([np.zeros(s_in.size), np.ones(s_out.size)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last = np.r_[scores[1:] != scores[:-1], True]
    tps, fps = np.cumsum(labels)[last], np.cumsum(1.0 - labels)[last]
    return np.r_[0.0, fps / s_in.size], np.r_[0.0, tps / s_out.size]


def _as_mapping(name: str, values: Array | Mapping[str, Array]) -> dict[str, Array]:
    if isinstance(values, Mapping):
        if not values:
            raise ValueError(f"`{name}` is an empty mapping; expected at least one score")
        return dict(values)
    return {"score": values}


def plot_ood_detection(
    scores_in: Array | Mapping[str, Array],
    scores_out: Array | Mapping[str, Array],
    bins: int = 30,
    in_label: str = "in-distribution",
    out_label: str = "OOD",
) -> Figure:
    """Histograms of each score on in-distribution and OOD inputs, and their ROC curves.

    One histogram panel per score (densities, so that data sets of different sizes compare)
    and a last panel with the ROC curve of every score, its AUROC in the legend, and the chance
    diagonal. Higher scores should sit on the OOD side: a ROC curve below the diagonal means the
    score's direction is inverted.

    Args:
        scores_in: scores of in-distribution inputs, one array or ``{name: array}`` (e.g. the
            ``scores_in`` of :func:`uq_box.methods.ood.evaluate_ood` with ``return_scores``).
        scores_out: scores of OOD inputs, the same kind and names as ``scores_in``.
        bins: histogram bins per score.
        in_label: legend label of the in-distribution inputs.
        out_label: legend label of the OOD inputs.

    Returns:
        The figure.
    """
    named_in, named_out = _as_mapping("scores_in", scores_in), _as_mapping("scores_out", scores_out)
    if set(named_in) != set(named_out):
        raise ValueError(
            f"`scores_in` and `scores_out` must name the same scores, got {sorted(named_in)} "
            f"and {sorted(named_out)}"
        )
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"`bins` must be a positive integer, got {bins!r}")
    names = list(named_in)
    fig, axes = plt.subplots(
        1, len(names) + 1, figsize=(3.6 * (len(names) + 1), 3.4), constrained_layout=True
    )
    for ax, name in zip(axes[:-1], names, strict=True):
        s_in = _scores(f"scores_in[{name!r}]", named_in[name])
        s_out = _scores(f"scores_out[{name!r}]", named_out[name])
        low, high = min(s_in.min(), s_out.min()), max(s_in.max(), s_out.max())
        edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
        ax.hist(s_in, bins=edges, density=True, alpha=0.6, color="C0", label=in_label)
        ax.hist(s_out, bins=edges, density=True, alpha=0.6, color="C3", label=out_label)
        ax.set_xlabel(f"{name} (higher = more OOD)")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    roc = axes[-1]
    for index, name in enumerate(names):
        fpr, tpr = ood_roc_curve(named_in[name], named_out[name])
        area = (
            float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
        )
        roc.plot(fpr, tpr, color=f"C{index}", label=f"{name} (AUROC {area:.3f})")
    roc.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    roc.set_xlabel("false positive rate (in-distribution flagged)")
    roc.set_ylabel("true positive rate (OOD flagged)")
    roc.set_xlim(0, 1)
    roc.set_ylim(0, 1.01)
    roc.legend(fontsize="small", loc="lower right")
    roc.set_title("ROC")
    return fig
