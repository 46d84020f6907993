"""Functional metrics for classification and out-of-distribution (OOD) detection.

Scoring and calibration functions take predicted class probabilities ``probs`` ``[N, C]`` (rows
summing to 1, e.g. ``pred`` of a method's ``predict_step``) and integer labels ``target`` ``[N]``.
OOD functions take an uncertainty score per input (higher means "more likely OOD", e.g.
``pred_uct`` or ``epistemic_uct``) for in-distribution and OOD inputs.

Written in torch, rather than calling scikit-learn, so they run on any device inside a training
loop. The OOD metrics rank all scores once (``O(N log N)``) and treat ties exactly as
``sklearn.metrics.roc_auc_score`` and ``roc_curve`` do. Expected calibration error keeps only
per-bin sums, so the metric classes need ``O(num_bins)`` memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uq_box.checks import positive_int

__all__ = [
    "brier_score",
    "expected_calibration_error",
    "fpr_at_95_tpr",
    "multiclass_nll",
    "ood_auroc",
    "reliability_diagram",
]


def _check_probs_target(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Check ``probs`` ``[N, C]`` in ``[0, 1]`` and ``target`` ``[N]`` in ``[0, C)``."""
    for name, value in (("probs", probs), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"`probs` must have shape [N, C], got {list(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"`probs` must be floating point, got {probs.dtype}")
    if target.ndim != 1 or target.shape[0] != probs.shape[0]:
        raise ValueError(
            f"`target` must have shape [N] = [{probs.shape[0]}] to match `probs` "
            f"{list(probs.shape)}, got {list(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"`target` must hold integer class labels, got {target.dtype}")
    if probs.shape[0] == 0:
        raise ValueError("`probs` and `target` are empty")
    if not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError(
            "`probs` must be probabilities in [0, 1] (got values outside or NaN; pass "
            "`logits.softmax(-1)`, not logits)"
        )
    num_classes = probs.shape[1]
    if not bool(((target >= 0) & (target < num_classes)).all()):
        raise ValueError(f"`target` must hold class labels in [0, {num_classes}), got others")
    return probs, target.long()


def _nll_terms(probs: Tensor, target: Tensor) -> Tensor:
    """Per-point ``-log p_y`` ``[N]``, with ``p_y`` clamped at the dtype's smallest normal."""
    p_y = probs.gather(1, target[:, None]).squeeze(1)
    return -p_y.clamp_min(torch.finfo(probs.dtype).tiny).log()


def _brier_terms(probs: Tensor, target: Tensor) -> Tensor:
    """Per-point ``sum_c (p_c - onehot_c)^2`` ``[N]``."""
    onehot = torch.nn.functional.one_hot(target, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).square().sum(1)


def _check_num_bins(num_bins: int) -> None:
    positive_int(num_bins, "num_bins")


def _equal_width_bin(values: Tensor, num_bins: int) -> Tensor:
    """Bin index of values in ``[0, 1]``: bin ``b`` is ``(b / num_bins, (b + 1) / num_bins]``."""
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=values.dtype, device=values.device)
    return torch.bucketize(values, edges[1:-1].contiguous(), right=False)


def _calibration_bins(
    probs: Tensor, target: Tensor, num_bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin sums of top-label confidence and correctness, and counts, each ``[num_bins]``.

    Bin ``b`` holds confidences in ``(b / num_bins, (b + 1) / num_bins]`` (Guo et al. 2017); a
    confidence of 0 goes to bin 0.
    """
    confidence, predicted = probs.max(dim=1)
    correct = predicted.eq(target).to(probs.dtype)
    index = _equal_width_bin(confidence, num_bins)
    conf_sum = probs.new_zeros(num_bins).scatter_add_(0, index, confidence)
    acc_sum = probs.new_zeros(num_bins).scatter_add_(0, index, correct)
    count = torch.zeros(num_bins, dtype=torch.long, device=probs.device)
    count.scatter_add_(0, index, torch.ones_like(index))
    return conf_sum, acc_sum, count


def multiclass_nll(probs: Tensor, target: Tensor) -> Tensor:
    """Mean negative log-likelihood ``-log p_y`` of the labels (cross-entropy, in nats).

    Probabilities are clamped below at ``torch.finfo(probs.dtype).tiny`` so a zero probability on
    the true class gives a large finite value (about 87 in float32, 708 in float64), not ``inf``.
    Equals ``sklearn.metrics.log_loss`` wherever neither clamps.

    Args:
        probs: class probabilities ``[N, C]``.
        target: integer labels ``[N]`` in ``[0, C)``.

    Returns:
        Scalar tensor with the dtype of ``probs``.
    """
    probs, target = _check_probs_target(probs, target)
    return _nll_terms(probs, target).mean()


def brier_score(probs: Tensor, target: Tensor) -> Tensor:
    """Multiclass Brier score: mean over points of ``sum_c (p_c - onehot(y)_c)^2``.

    Brier (1950); ranges over ``[0, 2]``. This is the sum over classes, not the mean over classes.

    Args:
        probs: class probabilities ``[N, C]``.
        target: integer labels ``[N]`` in ``[0, C)``.

    Returns:
        Scalar tensor with the dtype of ``probs``.
    """
    probs, target = _check_probs_target(probs, target)
    return _brier_terms(probs, target).mean()


def expected_calibration_error(probs: Tensor, target: Tensor, num_bins: int = 15) -> Tensor:
    """Top-label expected calibration error with equal-width bins (Guo et al. 2017, eq. 3).

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over bins ``B_b`` of the top-label
    confidence ``max_c p_c``, where bin ``b`` is ``(b / num_bins, (b + 1) / num_bins]``.

    Equals ``torchmetrics.functional.classification.multiclass_calibration_error(probs, target,
    num_classes=C, n_bins=num_bins, norm="l1")`` except for confidences exactly on a bin edge:
    torchmetrics puts them in the upper bin, ``[lower, upper)``, and a confidence of exactly 1
    (common with saturated softmax in float32) in a bin of its own; here they join the bin below,
    as in Guo et al.

    Args:
        probs: class probabilities ``[N, C]``.
        target: integer labels ``[N]`` in ``[0, C)``.
        num_bins: number of equal-width confidence bins over ``[0, 1]``.

    Returns:
        Scalar tensor in ``[0, 1]`` with the dtype of ``probs``.
    """
    _check_num_bins(num_bins)
    probs, target = _check_probs_target(probs, target)
    conf_sum, acc_sum, _ = _calibration_bins(probs, target, num_bins)
    return (conf_sum - acc_sum).abs().sum() / probs.shape[0]


def reliability_diagram(
    probs: Tensor, target: Tensor, num_bins: int = 15
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean confidence, accuracy and size of each top-label confidence bin.

    Uses the bins of :func:`expected_calibration_error`; plotting ``bin_accuracy`` against
    ``bin_confidence`` (for bins with ``bin_count > 0``) gives the reliability diagram of
    Guo et al. (2017), and ``sum(bin_count * |bin_accuracy - bin_confidence|) / N`` is the ECE.

    Args:
        probs: class probabilities ``[N, C]``.
        target: integer labels ``[N]`` in ``[0, C)``.
        num_bins: number of equal-width confidence bins over ``[0, 1]``.

    Returns:
        ``(bin_confidence, bin_accuracy, bin_count)``, each ``[num_bins]``; confidence and
        accuracy have the dtype of ``probs`` and are 0 for empty bins, counts are int64.
    """
    _check_num_bins(num_bins)
    probs, target = _check_probs_target(probs, target)
    conf_sum, acc_sum, count = _calibration_bins(probs, target, num_bins)
    denominator = count.clamp_min(1).to(probs.dtype)
    return conf_sum / denominator, acc_sum / denominator, count


def _check_scores(uncertainty_in: Tensor, uncertainty_out: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten both score tensors; check they are non-empty, real and free of NaN."""
    flat = []
    for name, value in (("uncertainty_in", uncertainty_in), ("uncertainty_out", uncertainty_out)):
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if value.numel() == 0:
            raise ValueError(f"`{name}` is empty; OOD metrics need both in- and out-of-dist. data")
        if value.is_complex():
            raise ValueError(f"`{name}` must be real, got {value.dtype}")
        if value.is_floating_point() and bool(value.isnan().any()):
            raise ValueError(f"`{name}` holds NaN")
        flat.append(value.reshape(-1))
    return flat[0], flat[1]


def _roc_points(uncertainty_in: Tensor, uncertainty_out: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative (false, true) positives at each distinct threshold, highest first, float64.

    OOD is the positive class. Matches ``sklearn.metrics.roc_curve(drop_intermediate=False)``
    without its leading ``(0, 0)`` point.
    """
    dtype = torch.promote_types(uncertainty_in.dtype, uncertainty_out.dtype)
    scores = torch.cat([uncertainty_in.to(dtype), uncertainty_out.to(dtype)])
    labels = torch.cat(
        [
            torch.zeros(uncertainty_in.numel(), dtype=torch.float64, device=scores.device),
            torch.ones(uncertainty_out.numel(), dtype=torch.float64, device=scores.device),
        ]
    )
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    # Last index of each run of equal scores: all tied points cross the threshold together.
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    tps = labels.cumsum(0)[last]
    fps = (1.0 - labels).cumsum(0)[last]
    return fps, tps


def ood_auroc(uncertainty_in: Tensor, uncertainty_out: Tensor) -> Tensor:
    """Area under the ROC curve for detecting OOD inputs by a higher uncertainty score.

    OOD inputs are the positive class. Equals
    ``sklearn.metrics.roc_auc_score(is_ood, uncertainty)``: the probability that a random OOD input
    scores higher than a random in-distribution one, ties counting one half (Mann-Whitney U).
    0.5 is chance, 1 is perfect separation.

    Args:
        uncertainty_in: scores of in-distribution inputs, any shape (flattened), non-empty.
        uncertainty_out: scores of OOD inputs, any shape (flattened), non-empty.

    Returns:
        Scalar float64 tensor in ``[0, 1]``.
    """
    uncertainty_in, uncertainty_out = _check_scores(uncertainty_in, uncertainty_out)
    fps, tps = _roc_points(uncertainty_in, uncertainty_out)
    fpr = torch.cat([fps.new_zeros(1), fps]) / uncertainty_in.numel()
    tpr = torch.cat([tps.new_zeros(1), tps]) / uncertainty_out.numel()
    return torch.trapezoid(tpr, fpr)


def fpr_at_95_tpr(
    uncertainty_in: Tensor, uncertainty_out: Tensor, tpr_level: float = 0.95
) -> Tensor:
    """False positive rate on in-distribution inputs when 95% of OOD inputs are detected.

    OOD inputs are the positive class, flagged when ``uncertainty >= t``. The threshold ``t`` is
    the highest one at which the true positive rate (fraction of OOD inputs flagged) reaches
    ``tpr_level``; the result is the fraction of in-distribution inputs flagged at ``t``. This is
    the FPR95 of Hendrycks & Gimpel (2017) and Liang et al. (2018), computed as
    ``fpr[searchsorted(tpr, 0.95)]`` on ``sklearn.metrics.roc_curve(is_ood, uncertainty,
    drop_intermediate=False)``. Ties are flagged together, so the TPR at ``t`` may exceed
    ``tpr_level``. Lower is better.

    Args:
        uncertainty_in: scores of in-distribution inputs, any shape (flattened), non-empty.
        uncertainty_out: scores of OOD inputs, any shape (flattened), non-empty.
        tpr_level: true positive rate to reach, in ``(0, 1]``.

    Returns:
        Scalar float64 tensor in ``[0, 1]``.
    """
    if not 0.0 < tpr_level <= 1.0:
        raise ValueError(f"`tpr_level` must be in (0, 1], got {tpr_level}")
    uncertainty_in, uncertainty_out = _check_scores(uncertainty_in, uncertainty_out)
    fps, tps = _roc_points(uncertainty_in, uncertainty_out)
    tpr = tps / uncertainty_out.numel()
    # tpr ends at 1, so some point reaches any level in (0, 1].
    first = torch.searchsorted(tpr, torch.tensor([tpr_level], dtype=tpr.dtype, device=tpr.device))
    return fps[first.clamp_max(tpr.numel() - 1)].squeeze(0) / uncertainty_in.numel()
