"""torchmetrics ``Metric`` classes for classification and out-of-distribution (OOD) detection.

``update(probs, target)`` takes class probabilities ``[B, C]`` and integer labels ``[B]``.
Averaging metrics keep a running sum and count; :class:`ExpectedCalibrationError` keeps per-bin
sums (``O(num_bins)`` memory); all of these are summed across processes under DDP.
:class:`OODDetection` keeps every score (concatenated across processes), since ranking metrics are
not sums over points. For accuracy use ``torchmetrics.Accuracy``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from uq_box.metrics import functional_classification as fc
from uq_box.metrics.functional_ood import ood_detection_metrics

__all__ = ["BrierScore", "ExpectedCalibrationError", "MulticlassNLL", "OODDetection"]


class _MeanOverPoints(Metric):
    """Base class: mean over all points of a per-point score, stored as a sum and a count."""

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _scores(self, probs: Tensor, target: Tensor) -> Tensor:
        """Per-point scores ``[B]`` of checked inputs."""
        raise NotImplementedError

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch of predictions.

        Args:
            probs: class probabilities ``[B, C]``.
            target: integer labels ``[B]`` in ``[0, C)``.
        """
        probs, target = fc._check_probs_target(probs, target)
        self.total += self._scores(probs, target).sum().to(self.total.dtype)
        self.count += probs.shape[0]

    def compute(self) -> Tensor:
        """Return the mean score over every point seen since the last reset."""
        return self.total / self.count


class MulticlassNLL(_MeanOverPoints):
    """Mean negative log-likelihood of the labels.

    See :func:`uq_box.metrics.functional_classification.multiclass_nll`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def _scores(self, probs: Tensor, target: Tensor) -> Tensor:
        return fc._nll_terms(probs, target)


class BrierScore(_MeanOverPoints):
    """Multiclass Brier score, see :func:`uq_box.metrics.functional_classification.brier_score`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def _scores(self, probs: Tensor, target: Tensor) -> Tensor:
        return fc._brier_terms(probs, target)


class BinnedCalibrationMetric(Metric):
    """Base of the calibration errors over ``num_bins`` confidence bins (lower is better).

    Args:
        num_bins: number of confidence bins.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_bins: int = 15, **kwargs) -> None:
        fc._check_num_bins(num_bins)
        super().__init__(**kwargs)
        self.num_bins = num_bins


class ExpectedCalibrationError(BinnedCalibrationMetric):
    """Top-label expected calibration error with equal-width bins.

    See :func:`uq_box.metrics.functional_classification.expected_calibration_error`.

    Keeps per-bin sums of confidence and correctness and per-bin counts, so memory is
    ``O(num_bins)`` whatever the number of points.

    Args:
        num_bins: number of equal-width confidence bins over ``[0, 1]``.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, num_bins: int = 15, **kwargs) -> None:
        super().__init__(num_bins, **kwargs)
        self.add_state("conf_sum", default=torch.zeros(num_bins), dist_reduce_fx="sum")
        self.add_state("acc_sum", default=torch.zeros(num_bins), dist_reduce_fx="sum")
        self.add_state(
            "bin_count", default=torch.zeros(num_bins, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch of predictions.

        Args:
            probs: class probabilities ``[B, C]``.
            target: integer labels ``[B]`` in ``[0, C)``.
        """
        probs, target = fc._check_probs_target(probs, target)
        conf_sum, acc_sum, count = fc._calibration_bins(probs, target, self.num_bins)
        self.conf_sum += conf_sum.to(self.conf_sum.dtype)
        self.acc_sum += acc_sum.to(self.acc_sum.dtype)
        self.bin_count += count

    def compute(self) -> Tensor:
        """Return the ECE of every prediction seen since the last reset."""
        return (self.conf_sum - self.acc_sum).abs().sum() / self.bin_count.sum()


class OODDetection(Metric):
    """AUROC, AUPR-in, AUPR-out and FPR at 95% TPR for detecting OOD inputs by a higher score.

    See :func:`uq_box.metrics.functional_classification.ood_auroc`,
    :func:`uq_box.metrics.functional_ood.ood_aupr_in`, :func:`~uq_box.metrics.functional_ood.ood_aupr_out`
    and :func:`uq_box.metrics.functional_classification.fpr_at_95_tpr`. OOD inputs are the
    positive class. Any uncertainty works as the score (``pred_uct``, ``epistemic_uct``,
    ``1 - max_c p_c``, ...). Keeps all scores in memory.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("uncertainty", default=[], dist_reduce_fx="cat")
        self.add_state("is_ood", default=[], dist_reduce_fx="cat")

    def update(self, uncertainty: Tensor, is_ood: Tensor) -> None:
        """Add a batch of scores.

        Args:
            uncertainty: uncertainty scores ``[B]`` (higher means more likely OOD).
            is_ood: ``[B]`` booleans (or 0/1), true for OOD inputs.
        """
        for name, value in (("uncertainty", uncertainty), ("is_ood", is_ood)):
            if not isinstance(value, Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
            if value.ndim != 1:
                raise ValueError(f"`{name}` must have shape [B], got {list(value.shape)}")
        if uncertainty.shape != is_ood.shape:
            raise ValueError(
                f"`uncertainty` and `is_ood` must have the same shape, got "
                f"{list(uncertainty.shape)} and {list(is_ood.shape)}"
            )
        if is_ood.dtype != torch.bool:
            if not bool(((is_ood == 0) | (is_ood == 1)).all()):
                raise ValueError("`is_ood` must hold booleans or 0/1 values")
            is_ood = is_ood.bool()
        self.uncertainty.append(uncertainty)
        self.is_ood.append(is_ood)

    def compute(self) -> dict[str, Tensor]:
        """Return ``{"auroc", "aupr_in", "aupr_out", "fpr95"}`` over every score since the last
        reset (see :func:`uq_box.metrics.functional_ood.ood_detection_metrics`).
        """
        if isinstance(self.uncertainty, list) and not self.uncertainty:
            raise ValueError("`OODDetection.compute` called before any `update`")
        uncertainty = dim_zero_cat(self.uncertainty)
        is_ood = dim_zero_cat(self.is_ood).bool()
        if bool(is_ood.all()) or not bool(is_ood.any()):
            raise ValueError("`OODDetection` needs both in-distribution and OOD inputs")
        scores_in, scores_out = uncertainty[~is_ood], uncertainty[is_ood]
        return ood_detection_metrics(scores_in, scores_out)
