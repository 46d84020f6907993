"""torchmetrics ``Metric`` classes for prediction sets: coverage, size, size-stratified coverage.

``update(pred_set, target)`` takes boolean prediction sets ``[B, C]`` and integer labels ``[B]``
(:class:`SetSize` takes only the sets). Each keeps sums and counts (``O(1)``, or ``O(C)`` for the
stratified coverage), summed across processes under DDP. See
:mod:`uq_box.metrics.functional_sets` for the definitions.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from uq_box.checks import positive_int
from uq_box.metrics import functional_sets as fs

__all__ = ["SetCoverage", "SetSize", "SizeStratifiedCoverage"]


class _SetMean(Metric):
    """Base class: a mean over points, stored as a sum and a count."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def compute(self) -> Tensor:
        """Return the mean over every point seen since the last reset (float64)."""
        if int(self.count) == 0:
            raise ValueError(f"`{type(self).__name__}.compute` called before any `update`")
        return self.total.double() / self.count.double()


class SetCoverage(_SetMean):
    """Share of labels inside their prediction sets.

    See :func:`~uq_box.metrics.functional_sets.set_coverage`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    higher_is_better = None  # the target is 1 - alpha, not 1

    def update(self, pred_set: Tensor, target: Tensor) -> None:
        """Add a batch of prediction sets.

        Args:
            pred_set: ``[B, C]`` booleans.
            target: integer labels ``[B]`` in ``[0, C)``.
        """
        pred_set, target = fs._check_sets_target(pred_set, target)
        self.total += fs._covered(pred_set, target).sum()
        self.count += pred_set.shape[0]


class SetSize(_SetMean):
    """Mean number of classes per set, see :func:`~uq_box.metrics.functional_sets.mean_set_size`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    higher_is_better = False

    def update(self, pred_set: Tensor) -> None:
        """Add a batch of prediction sets.

        Args:
            pred_set: ``[B, C]`` booleans.
        """
        pred_set = fs._check_sets(pred_set)
        self.total += pred_set.sum()
        self.count += pred_set.shape[0]


class SizeStratifiedCoverage(Metric):
    """Coverage per set size ``0..C``.

    See :func:`~uq_box.metrics.functional_sets.size_stratified_coverage`.

    Keeps the number of points and of covered points per set size (``O(C)`` memory).

    Args:
        num_classes: ``C``, the number of classes.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        num_classes = positive_int(num_classes, "num_classes")
        super().__init__(**kwargs)
        self.num_classes = num_classes
        zeros = torch.zeros(num_classes + 1, dtype=torch.long)
        self.add_state("size_count", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("size_covered", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, pred_set: Tensor, target: Tensor) -> None:
        """Add a batch of prediction sets.

        Args:
            pred_set: ``[B, C]`` booleans, ``C = num_classes``.
            target: integer labels ``[B]`` in ``[0, C)``.
        """
        pred_set, target = fs._check_sets_target(pred_set, target)
        if pred_set.shape[1] != self.num_classes:
            raise ValueError(
                f"`pred_set` has {pred_set.shape[1]} classes but the metric was built with "
                f"`num_classes`={self.num_classes}"
            )
        count, covered = fs._size_counts(pred_set, target)
        self.size_count += count
        self.size_covered += covered

    def compute(self) -> dict[str, Tensor]:
        """``{"coverage": [C + 1] float64 (0 where no set has that size), "count": [C + 1]}``."""
        if int(self.size_count.sum()) == 0:
            raise ValueError("`SizeStratifiedCoverage.compute` called before any `update`")
        coverage = self.size_covered.double() / self.size_count.clamp_min(1).double()
        return {"coverage": coverage, "count": self.size_count.clone()}
