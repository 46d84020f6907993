"""torchmetrics ``Metric`` classes for Gaussian predictive distributions in regression.

Each ``update(mean, std, target)`` takes tensors of shape ``[B]`` or ``[B, T]``. Averaging metrics
keep a running sum and count (summed across processes under DDP), so batches of any size give the
mean over all points; :class:`MiscalibrationArea` keeps every prediction (concatenated across
processes) because the calibration curve is not a sum over points.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from uq_box.checks import int_at_least, number_in
from uq_box.metrics import functional

__all__ = ["CRPS", "GaussianNLL", "IntervalCoverage", "MiscalibrationArea"]


class _MeanOverPoints(Metric):
    """Base class: mean over all points of a per-point score, stored as a sum and a count."""

    is_differentiable = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _scores(self, mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
        """Per-point scores ``[B]`` of flat, checked inputs."""
        raise NotImplementedError

    def update(self, mean: Tensor, std: Tensor, target: Tensor) -> None:
        """Add a batch of predictions.

        Args:
            mean: predictive means, ``[B]`` or ``[B, T]``.
            std: predictive standard deviations (positive), same shape as ``mean``.
            target: observed targets, same shape as ``mean``.
        """
        mean, std, target = functional._flatten_inputs(mean, std, target)
        self.total += self._scores(mean, std, target).sum().to(self.total.dtype)
        self.count += mean.numel()

    def compute(self) -> Tensor:
        """Return the mean score over every point seen since the last reset."""
        return self.total / self.count


class GaussianNLL(_MeanOverPoints):
    """Mean Gaussian negative log-likelihood, see :func:`uq_box.metrics.functional.gaussian_nll`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    higher_is_better = False

    def _scores(self, mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
        return functional._gaussian_nll_terms(mean, std, target)


class CRPS(_MeanOverPoints):
    """Mean Gaussian CRPS, see :func:`uq_box.metrics.functional.gaussian_crps`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    higher_is_better = False

    def _scores(self, mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
        return functional._gaussian_crps_terms(mean, std, target)


class IntervalCoverage(_MeanOverPoints):
    """Fraction of targets inside the central Gaussian interval of nominal coverage ``level``.

    See :func:`uq_box.metrics.functional.interval_coverage`; the best value is ``level``.

    Args:
        level: nominal coverage of the interval, in ``(0, 1)``.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None

    def __init__(self, level: float = 0.95, **kwargs) -> None:
        level = number_in(level, "level", 0.0, 1.0)
        super().__init__(**kwargs)
        self.level = level

    def _scores(self, mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
        return functional._interval_hits(mean, std, target, self.level)


class MiscalibrationArea(Metric):
    """Area between the interval calibration curve and the diagonal (uncertainty-toolbox's).

    See :func:`uq_box.metrics.functional.miscalibration_area`. Keeps all predictions in memory.

    Args:
        num_bins: number of expected proportions, at least 2.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_bins: int = 100, **kwargs) -> None:
        num_bins = int_at_least(num_bins, "num_bins", 2)
        super().__init__(**kwargs)
        self.num_bins = num_bins
        self.add_state("mean", default=[], dist_reduce_fx="cat")
        self.add_state("std", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, mean: Tensor, std: Tensor, target: Tensor) -> None:
        """Add a batch of predictions.

        Args:
            mean: predictive means, ``[B]`` or ``[B, T]``.
            std: predictive standard deviations (positive), same shape as ``mean``.
            target: observed targets, same shape as ``mean``.
        """
        mean, std, target = functional._flatten_inputs(mean, std, target)
        self.mean.append(mean)
        self.std.append(std)
        self.target.append(target)

    def compute(self) -> Tensor:
        """Return the miscalibration area of every prediction seen since the last reset."""
        return functional.miscalibration_area(
            dim_zero_cat(self.mean),
            dim_zero_cat(self.std),
            dim_zero_cat(self.target),
            num_bins=self.num_bins,
        )
