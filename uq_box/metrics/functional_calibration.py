"""Calibration errors beside the top-label ECE: equal-mass (adaptive) bins and per-class bins.

Both take class probabilities ``probs`` ``[N, C]`` and integer labels ``target`` ``[N]``, as
:func:`~uq_box.metrics.functional_classification.expected_calibration_error` does, and are ``0``
for a perfectly calibrated model (in the limit of many points per bin).

- :func:`adaptive_calibration_error`: the top-label ECE with **equal-mass** bins, each holding the
  same number of predictions (AdaECE of Mukhoti et al. 2020, "Calibrating Deep Neural Networks
  using Focal Loss"; the adaptive binning of Nixon et al. 2019, "Measuring Calibration in Deep
  Learning"). Equal-width bins leave most of them nearly empty for a confident network, which
  puts almost all predictions in the top bin; equal-mass bins resolve the confident end.
- :func:`classwise_calibration_error`: the mean over classes of the ECE of each class's
  probability ``p_c`` against ``1[y = c]`` (classwise-ECE of Kull et al. 2019, "Beyond
  temperature scaling: Obtaining well-calibrated multiclass probabilities with Dirichlet
  calibration", eq. 4). It checks every probability, not only the top one.

Equal-width bins are those of the top-label ECE: bin ``b`` holds ``(b / B, (b + 1) / B]``, a value
of 0 in bin 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uq_box.metrics.functional_classification import (
    _check_num_bins,
    _check_probs_target,
    _equal_width_bin,
)

__all__ = ["adaptive_calibration_error", "classwise_calibration_error"]


def _top_label(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence ``[N]`` and correctness ``[N]`` (in the dtype of ``probs``)."""
    confidence, predicted = probs.max(dim=1)
    return confidence, predicted.eq(target).to(probs.dtype)


def _equal_mass_error(confidence: Tensor, correct: Tensor, num_bins: int) -> Tensor:
    """``sum_b |sum_{i in b} (conf_i - correct_i)| / N`` over equal-mass bins of the confidence.

    The points are sorted by confidence (a stable sort: ties keep their input order) and cut
    into ``num_bins`` consecutive groups as ``numpy.array_split`` cuts them: the first
    ``N mod num_bins`` groups hold one point more. With fewer points than bins the extra bins are
    empty.
    """
    num_points = confidence.numel()
    order = torch.argsort(confidence, stable=True)
    quotient, remainder = divmod(num_points, num_bins)
    sizes = torch.full((num_bins,), quotient, dtype=torch.long, device=confidence.device)
    sizes[:remainder] += 1
    bins = torch.repeat_interleave(torch.arange(num_bins, device=confidence.device), sizes)
    gap = (confidence - correct)[order]
    per_bin = gap.new_zeros(num_bins).scatter_add_(0, bins, gap)
    return per_bin.abs().sum() / num_points


def adaptive_calibration_error(probs: Tensor, target: Tensor, num_bins: int = 15) -> Tensor:
    """Top-label expected calibration error with equal-mass bins (adaptive ECE).

    ``AdaECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` where the bins ``B_b`` of the
    top-label confidence ``max_c p_c`` each hold ``N / num_bins`` predictions (to one point): the
    predictions sorted by confidence, cut as ``numpy.array_split(sorted, num_bins)`` cuts. Tied
    confidences that straddle a cut are split in their input order (a stable sort).

    Args:
        probs: class probabilities ``[N, C]``.
        target: integer labels ``[N]`` in ``[0, C)``.
        num_bins: number of bins.

    Returns:
        Scalar tensor in ``[0, 1]`` with the dtype of ``probs``.
    """
    _check_num_bins(num_bins)
    probs, target = _check_probs_target(probs, target)
    return _equal_mass_error(*_top_label(probs, target), num_bins)


def _classwise_bins(probs: Tensor, target: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per class and equal-width bin of ``p_c``: sums of ``p_c`` and of ``1[y = c]``, and counts.

    Each ``[C, num_bins]``; counts are int64.
    """
    num_classes = probs.shape[1]
    index = _equal_width_bin(probs, num_bins)  # [N, C]
    flat = (index + num_bins * torch.arange(num_classes, device=probs.device)).reshape(-1)
    onehot = torch.nn.functional.one_hot(target, num_classes).to(probs.dtype)
    size = num_classes * num_bins
    conf_sum = probs.new_zeros(size).scatter_add_(0, flat, probs.reshape(-1))
    acc_sum = probs.new_zeros(size).scatter_add_(0, flat, onehot.reshape(-1))
    count = torch.zeros(size, dtype=torch.long, device=probs.device)
    count.scatter_add_(0, flat, torch.ones_like(flat))
    shape = (num_classes, num_bins)
    return conf_sum.reshape(shape), acc_sum.reshape(shape), count.reshape(shape)


def classwise_calibration_error(probs: Tensor, target: Tensor, num_bins: int = 15) -> Tensor:
    """Classwise expected calibration error (Kull et al. 2019), equal-width bins.

    ``cwECE = 1 / C * sum_c sum_b |B_cb| / N * |freq_c(B_cb) - mean p_c(B_cb)|``, where the bins
    ``B_cb`` split the points by their probability of class ``c`` and ``freq_c`` is the fraction
    of points in the bin whose label is ``c``: the mean over classes of the one-vs-rest
    calibration errors. Memory of the metric class: ``O(C num_bins)``.

    Args:
        probs: class probabilities ``[N, C]``.
        target: integer labels ``[N]`` in ``[0, C)``.
        num_bins: number of equal-width bins over ``[0, 1]`` per class.

    Returns:
        Scalar tensor in ``[0, 1]`` with the dtype of ``probs``.
    """
    _check_num_bins(num_bins)
    probs, target = _check_probs_target(probs, target)
    conf_sum, acc_sum, _ = _classwise_bins(probs, target, num_bins)
    return (conf_sum - acc_sum).abs().sum() / (probs.shape[0] * probs.shape[1])
