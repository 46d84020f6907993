"""Out-of-distribution (OOD) detection metrics beside AUROC and FPR95: the areas under the
precision-recall curves, and all four at once.

Every function takes an uncertainty score per input for in-distribution and OOD inputs, where
**a higher score means "more likely OOD"** (``pred_uct``, ``epistemic_uct``, or any score of
:mod:`uq_box.methods.ood`). The ROC curve and its AUROC and FPR95 are those of
:mod:`uq_box.metrics.functional_classification` (:func:`ood_auroc`, :func:`fpr_at_95_tpr`); the
precision-recall areas here rank the scores with the same helper, once, ``O(N log N)``, and treat
ties as ``sklearn.metrics.average_precision_score`` does.

- **AUPR-out** (OOD inputs are the positive class, ranked by the score): the average precision
  ``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds, as
  ``average_precision_score(is_ood, score)``.
- **AUPR-in** (in-distribution inputs are the positive class, ranked by the *negated* score), as
  ``average_precision_score(~is_ood, -score)`` (Hendrycks & Gimpel 2017, "A Baseline for
  Detecting Misclassified and Out-of-Distribution Examples in Neural Networks").

Both depend on the share of OOD inputs: a random score gives AUPR-out equal to the fraction of
OOD inputs, AUPR-in to the fraction of in-distribution ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uq_box.metrics.functional_classification import (
    _check_scores,
    _roc_points,
    fpr_at_95_tpr,
    ood_auroc,
)

__all__ = ["ood_aupr_in", "ood_aupr_out", "ood_detection_metrics"]


def _average_precision(negatives: Tensor, positives: Tensor) -> Tensor:
    """Average precision of ranking ``positives`` above ``negatives`` by a higher score."""
    fps, tps = _roc_points(negatives, positives)
    precision = tps / (tps + fps)
    recall = tps / positives.numel()
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return (steps * precision).sum()


def _negated(scores: Tensor) -> Tensor:
    """``-scores``, with integers and booleans widened to int64 first."""
    return -(scores if scores.is_floating_point() else scores.long())


def ood_aupr_out(uncertainty_in: Tensor, uncertainty_out: Tensor) -> Tensor:
    """Area under the precision-recall curve with OOD inputs as the positive class.

    Equals ``sklearn.metrics.average_precision_score(is_ood, uncertainty)``: the mean, over the
    distinct thresholds, of the precision weighted by the gain in recall. 1 is perfect; a random
    score gives about the fraction of OOD inputs.

    Args:
        uncertainty_in: scores of in-distribution inputs, any shape (flattened), non-empty.
        uncertainty_out: scores of OOD inputs, any shape (flattened), non-empty.

    Returns:
        Scalar float64 tensor in ``[0, 1]``.
    """
    uncertainty_in, uncertainty_out = _check_scores(uncertainty_in, uncertainty_out)
    return _average_precision(uncertainty_in, uncertainty_out)


def ood_aupr_in(uncertainty_in: Tensor, uncertainty_out: Tensor) -> Tensor:
    """Area under the precision-recall curve with in-distribution inputs as the positive class.

    The in-distribution inputs are ranked by the negated score (the lowest uncertainty first):
    equals ``sklearn.metrics.average_precision_score(~is_ood, -uncertainty)``. 1 is perfect; a
    random score gives about the fraction of in-distribution inputs.

    Args:
        uncertainty_in: scores of in-distribution inputs, any shape (flattened), non-empty.
        uncertainty_out: scores of OOD inputs, any shape (flattened), non-empty.

    Returns:
        Scalar float64 tensor in ``[0, 1]``.
    """
    uncertainty_in, uncertainty_out = _check_scores(uncertainty_in, uncertainty_out)
    return _average_precision(_negated(uncertainty_out), _negated(uncertainty_in))


def ood_detection_metrics(
    uncertainty_in: Tensor, uncertainty_out: Tensor, tpr_level: float = 0.95
) -> dict[str, Tensor]:
    """AUROC, AUPR-in, AUPR-out and the FPR at 95% TPR of one score, higher = more OOD.

    See :func:`~uq_box.metrics.functional_classification.ood_auroc`, :func:`ood_aupr_in`,
    :func:`ood_aupr_out` and :func:`~uq_box.metrics.functional_classification.fpr_at_95_tpr`.

    Args:
        uncertainty_in: scores of in-distribution inputs, any shape (flattened), non-empty.
        uncertainty_out: scores of OOD inputs, any shape (flattened), non-empty.
        tpr_level: true positive rate of the FPR (0.95: FPR95).

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95"}``, each a scalar float64 tensor.
    """
    return {
        "auroc": ood_auroc(uncertainty_in, uncertainty_out),
        "aupr_in": ood_aupr_in(uncertainty_in, uncertainty_out),
        "aupr_out": ood_aupr_out(uncertainty_in, uncertainty_out),
        "fpr95": fpr_at_95_tpr(uncertainty_in, uncertainty_out, tpr_level),
    }
