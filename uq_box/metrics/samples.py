"""torchmetrics ``Metric`` classes for scores that need no Gaussian: samples, quantiles, intervals.

Each keeps a running sum and count of per-point scores (summed across processes under DDP), so
batches of any size give the mean over all points; the scores are the functions of
:mod:`uq_box.metrics.functional_samples`. Shapes per batch: samples ``[S, B]`` or ``[S, B, T]``,
quantiles ``[B, Q]`` or ``[B, T, Q]``, everything else ``[B]`` or ``[B, T]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from uq_box.checks import number_in
from uq_box.metrics import functional_samples
from uq_box.metrics.functional_quantiles import check_levels

__all__ = [
    "EnergyScore",
    "IntervalScore",
    "IntervalWidth",
    "QuantileCoverage",
    "QuantilePinball",
    "SampleCRPS",
]


class _MeanScore(Metric):
    """Mean of per-point scores, stored as a float64 sum and a count."""

    full_state_update = False
    is_differentiable = True
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, scores: Tensor) -> None:
        self.total += scores.sum().to(self.total.dtype)
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """The mean score over every point seen since the last reset."""
        return self.total / self.count


class SampleCRPS(_MeanScore):
    """Mean CRPS of samples, energy form, see :func:`~uq_box.metrics.functional_samples.sample_crps`.

    ``update(samples [S, B] or [S, B, T], target [B] or [B, T])``.

    Args:
        unbiased: the pair term over ``S (S - 1)`` pairs (needs ``S >= 2``), else ``S^2``.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, unbiased: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.unbiased = bool(unbiased)

    def update(self, samples: Tensor, target: Tensor) -> None:
        """Add a batch."""
        self._add(functional_samples.sample_crps(samples, target, self.unbiased, reduction="none"))


class EnergyScore(_MeanScore):
    """Mean energy score of samples of a multivariate predictive, see
    :func:`~uq_box.metrics.functional_samples.energy_score`.

    ``update(samples [S, B, T], target [B, T])``; one score per point.

    Args:
        beta: the exponent, in ``(0, 2]``.
        unbiased: the pair term over ``S (S - 1)`` pairs (needs ``S >= 2``), else ``S^2``.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, beta: float = 1.0, unbiased: bool = True, **kwargs) -> None:
        beta = number_in(beta, "beta", 0.0, 2.0, closed="high")
        super().__init__(**kwargs)
        self.beta = beta
        self.unbiased = bool(unbiased)

    def update(self, samples: Tensor, target: Tensor) -> None:
        """Add a batch."""
        self._add(
            functional_samples.energy_score(
                samples, target, self.beta, self.unbiased, reduction="none"
            )
        )


class IntervalWidth(_MeanScore):
    """Mean prediction interval width (MPIW), ``update(lower, upper)``.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = True

    def update(self, lower: Tensor, upper: Tensor) -> None:
        """Add a batch."""
        self._add(functional_samples.interval_width(lower, upper, reduction="none"))


class IntervalScore(_MeanScore):
    """Mean interval (Winkler) score of central ``1 - alpha`` intervals, see
    :func:`~uq_box.metrics.functional_samples.interval_score`; ``update(lower, upper, target)``.

    Args:
        alpha: the nominal miscoverage, in ``(0, 1)``.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, alpha: float = 0.1, **kwargs) -> None:
        alpha = number_in(alpha, "alpha", 0.0, 1.0)
        super().__init__(**kwargs)
        self.alpha = alpha

    def update(self, lower: Tensor, upper: Tensor, target: Tensor) -> None:
        """Add a batch."""
        self._add(
            functional_samples.interval_score(lower, upper, target, self.alpha, reduction="none")
        )


class QuantileCoverage(_MeanScore):
    """Fraction of targets inside ``[lower, upper]`` (PICP), ``update(lower, upper, target)``.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None

    def update(self, lower: Tensor, upper: Tensor, target: Tensor) -> None:
        """Add a batch."""
        self._add(functional_samples.quantile_coverage(lower, upper, target, reduction="none"))


class QuantilePinball(_MeanScore):
    """Mean pinball loss over a grid of quantile levels, see
    :func:`~uq_box.metrics.functional_samples.quantile_pinball`;
    ``update(quantiles [B, Q] or [B, T, Q], target [B] or [B, T])``.

    Args:
        levels: the ``Q`` levels of the quantiles, each in ``(0, 1)``.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, levels: Sequence[float], **kwargs) -> None:
        levels = check_levels(levels, "levels")
        super().__init__(**kwargs)
        self.levels = levels

    def update(self, quantiles: Tensor, target: Tensor) -> None:
        """Add a batch."""
        self._add(
            functional_samples.quantile_pinball(quantiles, target, self.levels, reduction="none")
        )
