"""torchmetrics ``Metric`` classes for the adaptive (equal-mass) and the classwise ECE.

``update(probs, target)`` takes class probabilities ``[B, C]`` and integer labels ``[B]``, as
:class:`~uq_box.metrics.ExpectedCalibrationError` does. See
:mod:`uq_box.metrics.functional_calibration` for the definitions.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from uq_box.checks import positive_int
from uq_box.metrics import functional_calibration as fcal
from uq_box.metrics import functional_classification as fc
from uq_box.metrics.classification import BinnedCalibrationMetric

__all__ = ["AdaptiveCalibrationError", "ClasswiseCalibrationError"]


class AdaptiveCalibrationError(BinnedCalibrationMetric):
    """Top-label expected calibration error with equal-mass bins.

    See :func:`uq_box.metrics.functional_calibration.adaptive_calibration_error`. The bins depend
    on every confidence seen, so the metric keeps the top-label confidence and correctness of
    every point (two numbers per point, concatenated across processes under DDP).

    Args:
        num_bins: number of equal-mass bins.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, num_bins: int = 15, **kwargs) -> None:
        super().__init__(num_bins, **kwargs)
        self.add_state("confidence", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch of predictions.

        Args:
            probs: class probabilities ``[B, C]``.
            target: integer labels ``[B]`` in ``[0, C)``.
        """
        probs, target = fc._check_probs_target(probs, target)
        confidence, correct = fcal._top_label(probs, target)
        self.confidence.append(confidence)
        self.correct.append(correct)

    def compute(self) -> Tensor:
        """Return the adaptive ECE of every prediction seen since the last reset."""
        if isinstance(self.confidence, list) and not self.confidence:
            raise ValueError("`AdaptiveCalibrationError.compute` called before any `update`")
        confidence, correct = dim_zero_cat(self.confidence), dim_zero_cat(self.correct)
        return fcal._equal_mass_error(confidence, correct.to(confidence.dtype), self.num_bins)


class ClasswiseCalibrationError(Metric):
    """Classwise expected calibration error (Kull et al. 2019) with equal-width bins.

    See :func:`uq_box.metrics.functional_calibration.classwise_calibration_error`. Keeps per-class
    and per-bin sums, ``O(num_classes * num_bins)`` memory, summed across processes.

    Args:
        num_classes: number of classes ``C`` (the width of ``probs``).
        num_bins: number of equal-width bins over ``[0, 1]`` per class.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_classes: int, num_bins: int = 15, **kwargs) -> None:
        fc._check_num_bins(num_bins)
        num_classes = positive_int(num_classes, "num_classes")
        super().__init__(**kwargs)
        self.num_classes, self.num_bins = num_classes, num_bins
        shape = (num_classes, num_bins)
        self.add_state("conf_sum", default=torch.zeros(shape), dist_reduce_fx="sum")
        self.add_state("acc_sum", default=torch.zeros(shape), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch of predictions.

        Args:
            probs: class probabilities ``[B, C]`` with ``C = num_classes``.
            target: integer labels ``[B]`` in ``[0, C)``.
        """
        probs, target = fc._check_probs_target(probs, target)
        if probs.shape[1] != self.num_classes:
            raise ValueError(
                f"`probs` has {probs.shape[1]} classes but the metric was built with "
                f"`num_classes`={self.num_classes}"
            )
        conf_sum, acc_sum, _ = fcal._classwise_bins(probs, target, self.num_bins)
        self.conf_sum += conf_sum.to(self.conf_sum.dtype)
        self.acc_sum += acc_sum.to(self.acc_sum.dtype)
        self.total += probs.shape[0]

    def compute(self) -> Tensor:
        """Return the classwise ECE of every prediction seen since the last reset."""
        return (self.conf_sum - self.acc_sum).abs().sum() / (self.total * self.num_classes)
