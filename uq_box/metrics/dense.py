"""Metrics of dense prediction (segmentation, pixel-wise regression) as torchmetrics.

Segmentation metrics take mean class probabilities ``probs`` ``[N, C, H, W]`` and labels
``target`` ``[N, H, W]``; pixels whose label is ``ignore_index`` (unlabeled) are left out of
every metric. Pixel regression metrics take ``[N, T, H, W]`` means, stds and targets. Each pixel
is a point: the pixel metrics are the point-wise metrics of :mod:`uq_box.metrics` on the flattened
labeled pixels (:class:`PixelECE` is :class:`~uq_box.metrics.ExpectedCalibrationError` of the
pixels, and so on).

Whether uncertainty finds the wrong pixels: :class:`UncertaintyErrorAUROC` (the AUROC of a
pixel's uncertainty as a detector of a wrong pixel) and :class:`Sparsification` (the
sparsification curve, Ilg et al. 2018: the mean error of the pixels left after removing the
fraction ``f`` most uncertain ones, against the oracle that removes the largest errors first;
its area between the two, AUSE, is 0 for an uncertainty that orders the pixels as their errors
do).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc

from uq_box.metrics.classification import ExpectedCalibrationError, MulticlassNLL
from uq_box.metrics.regression import CRPS, GaussianNLL

__all__ = [
    "MeanIoU",
    "PixelAccuracy",
    "PixelCRPS",
    "PixelECE",
    "PixelGaussianNLL",
    "PixelNLL",
    "Sparsification",
    "UncertaintyErrorAUROC",
    "dense_confusion_matrix",
    "dense_sparsification_curves",
    "flatten_pixels",
    "iou_per_class",
    "pixel_errors",
    "sparsification_curve",
]

#: torch's ``CrossEntropyLoss`` default: the label of unlabeled pixels.
IGNORE_INDEX = -100


def _check_dense_probs(probs: Tensor, target: Tensor) -> None:
    for name, value in (("probs", probs), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if probs.ndim < 2 or target.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(
            f"`probs` [N, C, H, W] and `target` [N, H, W] do not match: got "
            f"{list(probs.shape)} and {list(target.shape)}"
        )


def flatten_pixels(
    probs: Tensor, target: Tensor, ignore_index: int | None = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """The labeled pixels as points: ``probs`` ``[P, C]`` and ``target`` ``[P]``.

    Args:
        probs: ``[N, C, H, W]`` (or ``[N, C, ...]``).
        target: ``[N, H, W]`` integer labels.
        ignore_index: the label of unlabeled pixels (left out); ``None``: every pixel.
    """
    _check_dense_probs(probs, target)
    flat_probs = probs.movedim(1, -1).reshape(-1, probs.shape[1])
    flat_target = target.reshape(-1)
    if ignore_index is not None:
        keep = flat_target != ignore_index
        flat_probs, flat_target = flat_probs[keep], flat_target[keep]
    return flat_probs, flat_target


def dense_confusion_matrix(
    pred_labels: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> Tensor:
    """Confusion matrix ``[C, C]`` (rows: true class, columns: predicted) of labeled pixels."""
    pred_labels, target = pred_labels.reshape(-1), target.reshape(-1)
    if ignore_index is not None:
        keep = target != ignore_index
        pred_labels, target = pred_labels[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"`target` holds labels outside [0, {num_classes}) other than `ignore_index`="
            f"{ignore_index}"
        )
    index = target.long() * num_classes + pred_labels.long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> Tensor:
    """IoU ``tp / (tp + fp + fn)`` per class (NaN for a class in neither prediction nor target)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


class MeanIoU(Metric):
    """Mean intersection over union of the argmax prediction over the classes present.

    Accumulates the pixels' confusion matrix; a class that is in neither the prediction nor the
    target is left out of the mean (as torchmetrics' ``JaccardIndex(average="macro")`` leaves
    out classes absent from both).

    Args:
        num_classes: ``C``; ``None``: read from ``probs`` (``[N, C, H, W]``) at the first update.
        ignore_index: label of unlabeled pixels (left out).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, num_classes: int | None = None, ignore_index: int | None = IGNORE_INDEX, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.ignore_index = ignore_index
        # one [C, C] matrix per update, summed in compute (C may be known only at the update)
        self.add_state("confusion", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add ``probs`` ``[N, C, H, W]`` (or predicted labels ``[N, H, W]`` with
        ``num_classes`` given) and ``target`` ``[N, H, W]``.
        """
        labels_given = probs.shape == target.shape
        if labels_given and self.num_classes is None:
            raise ValueError("`MeanIoU` needs `num_classes` to take predicted labels")
        num_classes = self.num_classes or probs.shape[1]
        labels = probs if labels_given else probs.argmax(1)
        self.confusion.append(
            dense_confusion_matrix(labels, target, num_classes, self.ignore_index)
        )

    def confusion_matrix(self) -> Tensor:
        """The summed confusion matrix ``[C, C]`` (rows: true class, columns: predicted)."""
        confusion = self.confusion
        if isinstance(confusion, list):
            if not confusion:
                raise ValueError("`MeanIoU.compute` called before any `update`")
            confusion = torch.cat(confusion)
        num_classes = confusion.shape[-1]
        return confusion.reshape(-1, num_classes, num_classes).sum(0)

    def compute(self) -> Tensor:
        """The mean IoU over the classes present."""
        return iou_per_class(self.confusion_matrix()).nanmean().float()


class PixelAccuracy(Metric):
    """Fraction of labeled pixels whose argmax prediction is right.

    Args:
        ignore_index: label of unlabeled pixels (left out).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ignore_index: int | None = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add ``probs`` ``[N, C, H, W]`` and ``target`` ``[N, H, W]``."""
        flat_probs, flat_target = flatten_pixels(probs, target, self.ignore_index)
        self.correct += (flat_probs.argmax(-1) == flat_target).sum()
        self.count += flat_target.numel()

    def compute(self) -> Tensor:
        """Correct labeled pixels over labeled pixels."""
        return self.correct.float() / self.count


class PixelECE(ExpectedCalibrationError):  # noqa: N818 -- a metric, not an exception
    """Top-label ECE of the labeled pixels (:class:`~uq_box.metrics.ExpectedCalibrationError` of
    the flattened pixels).

    Args:
        num_bins: equal-width confidence bins.
        ignore_index: label of unlabeled pixels (left out).
    """

    def __init__(
        self, num_bins: int = 15, ignore_index: int | None = IGNORE_INDEX, **kwargs
    ) -> None:
        super().__init__(num_bins=num_bins, **kwargs)
        self.ignore_index = ignore_index

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add ``probs`` ``[N, C, H, W]`` and ``target`` ``[N, H, W]``."""
        flat_probs, flat_target = flatten_pixels(probs, target, self.ignore_index)
        if flat_target.numel():
            super().update(flat_probs, flat_target)


class PixelNLL(MulticlassNLL):
    """Mean negative log-likelihood of the labeled pixels' labels.

    Args:
        ignore_index: label of unlabeled pixels (left out).
    """

    def __init__(self, ignore_index: int | None = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add ``probs`` ``[N, C, H, W]`` and ``target`` ``[N, H, W]``."""
        flat_probs, flat_target = flatten_pixels(probs, target, self.ignore_index)
        if flat_target.numel():
            super().update(flat_probs, flat_target)


def _flat_regression(*values: Tensor) -> list[Tensor]:
    shape = values[0].shape
    for value in values:
        if value.shape != shape:
            raise ValueError(
                f"pixel regression inputs must share one shape [N, T, H, W], got "
                f"{[list(v.shape) for v in values]}"
            )
    return [v.reshape(-1) for v in values]


class PixelGaussianNLL(GaussianNLL):
    """Mean Gaussian NLL over pixels and targets of ``[N, T, H, W]`` predictions."""

    def update(self, mean: Tensor, std: Tensor, target: Tensor) -> None:
        """Add means, stds and targets ``[N, T, H, W]``."""
        super().update(*_flat_regression(mean, std, target))


class PixelCRPS(CRPS):
    """Mean Gaussian CRPS over pixels and targets of ``[N, T, H, W]`` predictions."""

    def update(self, mean: Tensor, std: Tensor, target: Tensor) -> None:
        """Add means, stds and targets ``[N, T, H, W]``."""
        super().update(*_flat_regression(mean, std, target))


class _PixelScores(Metric):
    """Keeps a pixel's uncertainty and error for every labeled pixel (memory: one pair each)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("uncertainty", default=[], dist_reduce_fx="cat")
        self.add_state("error", default=[], dist_reduce_fx="cat")

    def update(self, uncertainty: Tensor, error: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            uncertainty: per-pixel uncertainty (any shape, e.g. ``[N, H, W]``).
            error: per-pixel error of the same shape (a wrong label as 1/0 or True/False, an
                absolute error).
            mask: optional booleans of the same shape, ``True`` for the pixels to keep (the
                labeled ones).
        """
        if uncertainty.shape != error.shape:
            raise ValueError(
                f"`uncertainty` and `error` must have the same shape, got "
                f"{list(uncertainty.shape)} and {list(error.shape)}"
            )
        uncertainty, error = uncertainty.reshape(-1), error.reshape(-1)
        if mask is not None:
            mask = mask.reshape(-1)
            uncertainty, error = uncertainty[mask], error[mask]
        self.uncertainty.append(uncertainty.detach().double())
        self.error.append(error.detach().double())

    def _values(self) -> tuple[Tensor, Tensor]:
        if isinstance(self.uncertainty, list):
            if not self.uncertainty:
                raise ValueError(f"`{type(self).__name__}.compute` called before any `update`")
            return torch.cat(self.uncertainty), torch.cat(self.error)
        return self.uncertainty, self.error


class UncertaintyErrorAUROC(_PixelScores):
    """AUROC of the pixel uncertainty as a detector of wrong pixels (``error > 0``).

    0.5 is an uncertainty unrelated to the errors, 1 one that ranks every wrong pixel above every
    right one. NaN when every pixel is right or every pixel wrong.
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        """The AUROC over every pixel added since the last reset."""
        uncertainty, error = self._values()
        wrong = error > 0
        if bool(wrong.all()) or not bool(wrong.any()):
            return torch.tensor(float("nan"))
        return binary_auroc(uncertainty, wrong.long())


def sparsification_curve(
    uncertainty: Tensor, error: Tensor, num_fractions: int = 20
) -> dict[str, Tensor]:
    """Sparsification curve, its oracle and the area between them (AUSE).

    For fractions ``f = 0, 1/K, ..., (K-1)/K`` the mean error of the pixels left after removing
    the ``f`` most uncertain ones (``curve``), and after removing the ``f`` largest errors
    (``oracle``, the best any ordering can do). ``ause`` is the trapezoidal area of
    ``curve - oracle`` over ``f`` in ``[0, (K-1)/K]``: 0 for an uncertainty that orders the
    pixels as their errors (ties broken by position).

    Args:
        uncertainty: per-pixel uncertainty, any shape.
        error: per-pixel error (e.g. 0/1 for a wrong label, an absolute error), same shape.
        num_fractions: ``K``.

    Returns:
        ``fractions``, ``curve``, ``oracle`` (each ``[K]``) and ``ause`` (a scalar).
    """
    if uncertainty.shape != error.shape:
        raise ValueError(
            f"`uncertainty` and `error` must have the same shape, got {list(uncertainty.shape)} "
            f"and {list(error.shape)}"
        )
    uncertainty, error = uncertainty.reshape(-1).double(), error.reshape(-1).double()
    total = error.numel()
    if total == 0:
        raise ValueError("`uncertainty` and `error` are empty")
    fractions = torch.arange(num_fractions, dtype=torch.float64) / num_fractions
    kept = (total - (fractions * total).floor().long()).clamp_min(1)

    def remaining_means(order: Tensor) -> Tensor:
        # errors from the most certain (kept longest) to the least: mean of the first `kept`
        sorted_error = error[order]
        cumulative = torch.cat([sorted_error.new_zeros(1), sorted_error.cumsum(0)])
        return cumulative[kept] / kept

    curve = remaining_means(torch.argsort(uncertainty, stable=True))
    oracle = remaining_means(torch.argsort(error, stable=True))
    ause = torch.trapezoid(curve - oracle, fractions)
    return {"fractions": fractions, "curve": curve, "oracle": oracle, "ause": ause}


class Sparsification(_PixelScores):
    """Sparsification curve and AUSE of pixel uncertainty against pixel error
    (:func:`sparsification_curve`); ``compute()`` returns the AUSE, :meth:`curve` the curves.

    Args:
        num_fractions: fractions of the curve.
    """

    higher_is_better = False

    def __init__(self, num_fractions: int = 20, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_fractions = int(num_fractions)

    def curve(self) -> dict[str, Tensor]:
        """``fractions``, ``curve``, ``oracle`` and ``ause`` over every pixel added."""
        return sparsification_curve(*self._values(), self.num_fractions)

    def compute(self) -> Tensor:
        """The AUSE (lower is better, 0 for an oracle ordering)."""
        return self.curve()["ause"].float()


def pixel_errors(preds: dict[str, Tensor], target: Tensor, ignore_index: int = IGNORE_INDEX):
    """Per-pixel errors and the mask of the pixels that count.

    Segmentation (labels ``[N, H, W]``): 1 for a wrong argmax label, else 0, on labeled pixels;
    pixel regression (targets ``[N, T, H, W]``): the absolute error of the mean, every pixel.

    Returns:
        ``(error, mask)``, shaped as ``preds["pred_uct"]``.
    """
    target = target.to(preds["pred"].device)
    if target.ndim == 3:
        error = (preds["pred"].argmax(1) != target).double()
        return error, target != ignore_index
    error = (preds["pred"] - target.to(preds["pred"].dtype)).abs().double()
    return error, torch.ones_like(error, dtype=torch.bool)


def dense_sparsification_curves(
    preds: dict[str, Tensor],
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    num_fractions: int = 20,
) -> dict[str, dict[str, Tensor]]:
    """:func:`sparsification_curve` of the total, aleatoric and epistemic pixel uncertainty
    against the pixel errors of :func:`pixel_errors` (labeled pixels only).
    """
    error, mask = pixel_errors(preds, target, ignore_index)
    return {
        name: sparsification_curve(preds[key][mask], error[mask], num_fractions)
        for name, key in (
            ("total", "pred_uct"),
            ("aleatoric", "aleatoric_uct"),
            ("epistemic", "epistemic_uct"),
        )
    }
