"""Conformal prediction for dense tasks: risk-controlling sets per image.

Pixels of one image are not exchangeable (neighbours share the image's content, its noise and the
network's errors), so split conformal prediction that pools the calibration *pixels* as if they
were independent points has no guarantee. The images are the exchangeable units: both wrappers
here use **conformal risk control** (Angelopoulos, Bates, Fisch, Lei & Schuster 2022, "Conformal
Risk Control") with one loss per image, the fraction of its labeled pixels that the prediction
misses.

A threshold ``lambda`` turns each pixel's score into a prediction: a pixel is *missed* when its
score ``s > lambda``. The loss of image ``i`` is the fraction of its ``m_i`` labeled pixels
missed, ``L_i(lambda) = (1 / m_i) sum_j [s_ij > lambda]`` (0 for an image without labeled
pixels): in ``[0, B]`` with ``B = 1``, non-increasing in ``lambda``, and 0 for a large enough
``lambda``. On ``n`` calibration images, with ``R(lambda) = (1 / n) sum_i L_i(lambda)``, the
threshold

    lambda_hat = inf { lambda : n / (n + 1) R(lambda) + B / (n + 1) <= alpha }

(:func:`risk_control_threshold`, computed exactly over the observed scores) gives, for a new
image exchangeable with the calibration images,

    E[ L_{n+1}(lambda_hat) ] <= alpha,

the expectation over the calibration set and the test image: the *expected fraction of missed
pixels per image* is at most ``alpha``. It is a marginal guarantee over images, not one per
image (a given image may miss more) and not one per pixel position. It needs
``n >= B / alpha - 1`` calibration images (fewer is an error). With continuous scores the risk
is also at least ``alpha - 2B / (n + 1)`` (Angelopoulos et al. 2022, theorem 2).

- :class:`ConformalSegmentation`: the score of a labeled pixel is ``1 - p_y`` (one minus the
  mean predictive probability of its true class), the prediction set of a pixel is
  ``{c : p_c >= 1 - lambda_hat}`` and the loss is the per-image **false-negative rate** (the
  share of labeled pixels whose label is not in its set): ``E[FNR] <= alpha``.
- :class:`ConformalPixelRegression`: the score is the normalized residual ``|y - pred| /
  pred_uct``, the interval ``pred ± lambda_hat pred_uct`` and the loss the per-image
  **miscoverage** (the share of pixels outside their interval): the expected pixel coverage of
  an image is at least ``1 - alpha``, one ``lambda_hat`` per target channel.

Written here for the reasons of :mod:`uq_box.methods.posthoc`: the threshold is a sort and a
cumulative sum, and the wrappers need the dense prediction contract and Lightning's loops.
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from uq_box.methods.base import UQMethod
from uq_box.methods.dense import PixelRegressionTask, SegmentationTask
from uq_box.methods.posthoc import MIN_STD, PostHocCalibration, _check_alpha, check_wrapped_model
from uq_box.metrics.dense import IGNORE_INDEX

__all__ = [
    "ConformalPixelRegression",
    "ConformalSegmentation",
    "minimum_calibration_images",
    "pixel_miscoverage",
    "pixel_false_negative_rate",
    "pixel_normalized_scores",
    "risk_control_index",
    "risk_control_threshold",
    "segmentation_prediction_sets",
    "segmentation_scores",
]


# -- the math (pure functions) ---------------------------------------------------------------------
def minimum_calibration_images(alpha: float, bound: float = 1.0) -> int:
    """Fewest calibration images for which conformal risk control has a finite threshold.

    The rule needs ``B / (n + 1) <= alpha``, i.e. ``n >= B / alpha - 1`` (in exact arithmetic on
    the floats): 9 images for ``alpha = 0.1`` and ``B = 1``, 19 for ``alpha = 0.05``.
    """
    alpha = _check_alpha(alpha)
    return max(1, math.ceil(Fraction(bound) / Fraction(alpha) - 1))


def _check_scores(scores: Tensor, name: str = "scores") -> None:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point torch.Tensor [n, P]")
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(
            f"`{name}` must be per-pixel scores [n, P] of n >= 1 calibration images, got "
            f"shape {list(scores.shape)}"
        )


def risk_control_threshold(scores: Tensor, alpha: float, bound: float = 1.0) -> Tensor:
    """Conformal risk control of the per-image fraction of pixels with ``score > lambda``.

    The loss of image ``i`` is ``L_i(lambda) = (1 / m_i) sum_j [s_ij > lambda]`` over its ``m_i``
    scored pixels (NaN scores are unlabeled pixels and skipped; an image without any has loss 0).
    Returns the smallest ``lambda`` among the scores with ``n / (n + 1) R(lambda) + B / (n + 1)
    <= alpha``, ``R`` the mean loss over the ``n`` images -- exactly, by sorting every score and
    summing the pixel weights ``1 / (n m_i)`` from the top. ``-inf`` when no pixel needs covering
    (``R(-inf)`` already small enough).

    Args:
        scores: ``[n, P]`` pixel scores of ``n`` calibration images (``P`` pixels each, NaN for
            unlabeled ones).
        alpha: the risk level in ``(0, 1)``.
        bound: ``B``, the largest value of the loss (1 for a fraction of pixels).

    Returns:
        Scalar float64 tensor ``lambda_hat``.

    Raises:
        ValueError: fewer than :func:`minimum_calibration_images` images (``B / (n + 1) >
            alpha``: no threshold controls the risk).
    """
    alpha = _check_alpha(alpha)
    _check_scores(scores)
    num_images = scores.shape[0]
    needed = minimum_calibration_images(alpha, bound)
    if num_images < needed:
        raise ValueError(
            f"{num_images} calibration images are too few for `alpha`={alpha}: conformal risk "
            f"control needs B / (n + 1) <= alpha, i.e. at least {needed} images (B = {bound:g}); "
            f"calibrate on more images or use a larger `alpha`"
        )
    scores = scores.detach().double()
    labeled = ~scores.isnan()
    counts = labeled.sum(1)
    weights = (1.0 / (num_images * counts.clamp_min(1).double())).unsqueeze(1).expand_as(scores)
    flat, flat_weights = scores[labeled], weights[labeled]
    # R(lambda) <= target, target = ((n + 1) alpha - B) / n (exact in Fractions, then float)
    target = float((Fraction(alpha) * (num_images + 1) - Fraction(bound)) / num_images)
    if flat.numel() == 0 or float(flat_weights.sum()) <= target:
        return torch.tensor(-math.inf, dtype=torch.float64, device=scores.device)
    values, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    mass = torch.zeros_like(values).scatter_add_(0, inverse, flat_weights)
    # tail[k] = R(values[k]) = sum of the weights of the scores > values[k]
    tail = mass.flip(0).cumsum(0).flip(0) - mass
    index = int(torch.nonzero(tail <= target + 1e-12)[0])
    return values[index]


def risk_control_index(losses: Tensor, alpha: float, bound: float = 1.0) -> int:
    """Conformal risk control over a grid of thresholds: the first admissible grid point.

    Args:
        losses: ``[n, L]`` losses of ``n`` calibration images at ``L`` increasing thresholds
            ``lambda_1 < ... < lambda_L``, each in ``[0, bound]`` and non-increasing along the
            grid, with ``losses[:, -1]`` at most ``alpha`` (e.g. 0).
        alpha: the risk level in ``(0, 1)``.
        bound: ``B``.

    Returns:
        The smallest ``l`` with ``n / (n + 1) mean_i losses[i, l] + B / (n + 1) <= alpha``.
    """
    alpha = _check_alpha(alpha)
    _check_scores(losses, "losses")
    num_images = losses.shape[0]
    needed = minimum_calibration_images(alpha, bound)
    if num_images < needed:
        raise ValueError(
            f"{num_images} calibration images are too few for `alpha`={alpha}: at least "
            f"{needed} needed (B = {bound:g})"
        )
    risk = losses.double().mean(0)
    adjusted = num_images / (num_images + 1) * risk + bound / (num_images + 1)
    admissible = torch.nonzero(adjusted <= alpha + 1e-12)
    if admissible.numel() == 0:
        raise ValueError("no grid point controls the risk: extend the grid to a loss of 0")
    return int(admissible[0])


def segmentation_scores(probs: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-pixel scores ``1 - p_y`` of the true class, NaN on unlabeled pixels.

    Args:
        probs: ``[N, C, H, W]`` class probabilities (a method's ``pred``).
        target: ``[N, H, W]`` labels, ``ignore_index`` for unlabeled pixels.
        ignore_index: the label of unlabeled pixels.

    Returns:
        ``[N, H * W]`` in the dtype of ``probs``.
    """
    if probs.ndim != 4 or target.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"`probs` must be [N, C, H, W] and `target` [N, H, W], got {list(probs.shape)} "
            f"and {list(target.shape)}"
        )
    labeled = target != ignore_index
    index = torch.where(labeled, target, torch.zeros_like(target)).long().unsqueeze(1)
    scores = 1.0 - probs.gather(1, index).squeeze(1)
    scores = torch.where(labeled, scores, torch.full_like(scores, math.nan))
    return scores.flatten(1)


def segmentation_prediction_sets(probs: Tensor, threshold: Tensor | float) -> Tensor:
    """Per-pixel prediction sets ``{c : 1 - p_c <= lambda}`` (i.e. ``p_c >= 1 - lambda``).

    Args:
        probs: ``[N, C, H, W]`` class probabilities.
        threshold: ``lambda`` (scalar).

    Returns:
        Booleans ``[N, C, H, W]``. The scores are computed as in :func:`segmentation_scores`, so
        a pixel whose score equals ``lambda`` is covered.
    """
    threshold = torch.as_tensor(threshold, dtype=torch.float64, device=probs.device)
    return (1.0 - probs).double() <= threshold


def pixel_false_negative_rate(
    pred_set: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Per-image false-negative rate: the share of labeled pixels whose label is not in its set.

    Args:
        pred_set: ``[N, C, H, W]`` booleans.
        target: ``[N, H, W]`` labels.
        ignore_index: the label of unlabeled pixels (skipped).

    Returns:
        ``[N]`` float64, 0 for an image without labeled pixels.
    """
    labeled = target != ignore_index
    index = torch.where(labeled, target, torch.zeros_like(target)).long().unsqueeze(1)
    hit = pred_set.gather(1, index).squeeze(1)
    missed = (labeled & ~hit).flatten(1).sum(1).double()
    return missed / labeled.flatten(1).sum(1).clamp_min(1).double()


def pixel_normalized_scores(pred: Tensor, pred_uct: Tensor, target: Tensor) -> Tensor:
    """Normalized residuals ``|y - pred| / pred_uct`` per target channel.

    Args:
        pred: ``[N, T, H, W]`` predictive means.
        pred_uct: ``[N, T, H, W]`` predictive stds (positive).
        target: ``[N, T, H, W]``.

    Returns:
        ``[N, T, H * W]``; NaN where the target is NaN (unlabeled).
    """
    if not (pred.shape == pred_uct.shape == target.shape) or pred.ndim != 4:
        raise ValueError(
            f"`pred`, `pred_uct` and `target` must all be [N, T, H, W], got {list(pred.shape)}, "
            f"{list(pred_uct.shape)} and {list(target.shape)}"
        )
    if not bool((pred_uct > 0).all()):
        raise ValueError(
            "the normalized score |y - pred| / pred_uct needs pred_uct > 0 at every pixel"
        )
    return ((target.to(pred.dtype) - pred).abs() / pred_uct).flatten(2)


def pixel_miscoverage(lower: Tensor, upper: Tensor, target: Tensor) -> Tensor:
    """Per-image share of pixels outside ``[lower, upper]``, per target channel.

    Args:
        lower: ``[N, T, H, W]``.
        upper: ``[N, T, H, W]``.
        target: ``[N, T, H, W]``.

    Returns:
        ``[N, T]`` float64.
    """
    target = target.to(lower.dtype)
    outside = (target < lower) | (target > upper)
    return outside.flatten(2).double().mean(2)


# -- the wrappers ----------------------------------------------------------------------------------
def _get_chunk(self: PostHocCalibration) -> int | None:
    return self.model.sample_chunk_size


def _set_chunk(self: PostHocCalibration, value: int | None) -> None:
    self.model.sample_chunk_size = value


#: a wrapper's ``sample_chunk_size`` is its wrapped method's (set in each class: ``DenseTask``'s
#: class attribute comes first in the method resolution order)
_CHUNK = property(_get_chunk, _set_chunk, doc="The wrapped method's ``sample_chunk_size``.")


class _DenseConformal(PostHocCalibration):
    """What the two wrappers share: calibration on the ``"val"`` split, the threshold buffer."""

    default_split = "val"
    concat_dims = {"scores": 0}
    # one threshold per target for pixel regression
    fitted_buffers = ("threshold",)
    # the threshold is the mean over targets
    summary_buffers = {
        "risk_threshold": "threshold",
        "calibration_images": "num_calibration_images",
    }
    _task: type = object

    def __init__(self, model: UQMethod, alpha: float = 0.1) -> None:
        segmentation = self._task is SegmentationTask
        check_wrapped_model(
            model,
            self._task,
            "segmentation" if segmentation else "pixel regression",
            "MCDropoutSegmentation" if segmentation else "DeepEnsemblePixelRegression",
        )
        alpha = _check_alpha(alpha)
        super().__init__(model)
        self.alpha = alpha
        self.register_buffer("threshold", torch.full((1,), math.nan, dtype=torch.float64))
        self.register_buffer("num_calibration_images", torch.zeros((), dtype=torch.long))
        self.save_hyperparameters(ignore=["model"])

    @property
    def is_calibrated(self) -> bool:
        """Whether a threshold has been computed."""
        return not bool(self.threshold.isnan().any())

    def _set_threshold(self, threshold: Tensor, num_images: int) -> None:
        self.threshold = threshold.to(self.threshold.device)
        self.num_calibration_images = torch.tensor(num_images, device=self.threshold.device)


class ConformalSegmentation(SegmentationTask, _DenseConformal):
    """Conformal risk control of the per-image false-negative rate of pixel prediction sets.

    Around any fitted segmentation method: on ``n`` calibration images (the ``"val"`` split by
    default, as :class:`~uq_box.methods.conformal_classification.ConformalClassification`; an
    ``(images, labels)`` pair or ``calibrate(dm, split=...)`` works too) the per-pixel scores
    ``1 - p_y`` of the true classes give ``lambda_hat`` (:func:`risk_control_threshold`), and
    the prediction set of a pixel is ``{c : p_c >= 1 - lambda_hat}``. For a new image
    exchangeable with the calibration images the expected false-negative rate (share of its
    labeled pixels whose label is not in the set) is at most ``alpha``; see
    :mod:`uq_box.methods.conformal_dense`. Unlabeled pixels (the wrapped method's
    ``ignore_index``) are skipped. The guarantee needs images that neither training nor model
    selection saw: if the validation split chose the epoch, calibrate on a split of its own.
    Fewer than ``1 / alpha - 1`` calibration images is an error.

    ``predict_step`` returns the wrapped method's prediction plus ``pred_set`` ``[N, C, H, W]``
    (booleans); it goes through the wrapped method's ``predict_step``, so its
    ``sample_chunk_size`` applies (setting it on the wrapper sets it there). Test metrics: the
    segmentation ones of ``pred`` plus ``fnr`` (mean per-image false-negative rate, at most
    ``alpha`` in expectation) and ``set_size`` (mean classes per labeled pixel).

    Args:
        model: a fitted segmentation method (a ``SegmentationTask`` ``UQMethod``).
        alpha: the risk level in ``(0, 1)``: the bound on the expected per-image FNR.
    """

    _task = SegmentationTask
    sample_chunk_size = _CHUNK

    @property
    def ignore_index(self) -> int:
        """The wrapped method's label of unlabeled pixels."""
        return self.model.ignore_index

    def build_metrics(self) -> nn.ModuleDict:
        """The segmentation metrics plus ``fnr`` and ``set_size``."""
        metrics = super().build_metrics()
        metrics["fnr"] = MeanMetric()
        metrics["set_size"] = MeanMetric()
        return metrics

    def collect(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The scores ``1 - p_y`` ``[B, H * W]`` of one batch (NaN on unlabeled pixels)."""
        probs = self.model.predict_step(x)["pred"]
        target = target.to(probs.device)
        self._check_target(probs.shape[1], (probs.shape[0], *probs.shape[2:]), target)
        return {"scores": segmentation_scores(probs, target, self.ignore_index)}

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """``lambda_hat`` of the calibration images' scores."""
        scores = collected["scores"]
        threshold = risk_control_threshold(scores, self.alpha)
        self._set_threshold(threshold.reshape(1), scores.shape[0])

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The wrapped method's prediction plus ``pred_set`` ``[N, C, H, W]``."""
        preds = self.wrapped_predictions(batch)
        with torch.no_grad():
            preds["pred_set"] = segmentation_prediction_sets(preds["pred"], self.threshold[0])
        return preds

    def update_metrics(
        self, metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        """Segmentation metrics on ``pred``; FNR and set size of ``pred_set``."""
        pred, pred_set = preds["pred"], preds["pred_set"]
        self._check_target(pred.shape[1], (pred.shape[0], *pred.shape[2:]), target)
        labeled = target != self.ignore_index
        for name, metric in metrics.items():
            if name == "fnr":
                metric.update(pixel_false_negative_rate(pred_set, target, self.ignore_index))
            elif name == "set_size":
                sizes = pred_set.sum(1)[labeled].double()
                if sizes.numel():
                    metric.update(sizes)
            else:
                metric.update(pred, target)


class ConformalPixelRegression(PixelRegressionTask, _DenseConformal):
    """Per-pixel conformal intervals with conformal risk control of the per-image miscoverage.

    Around any fitted pixel regression method: on ``n`` calibration images (the ``"val"`` split
    by default) the normalized residuals ``|y - pred| / pred_uct`` give one ``lambda_hat`` per
    target channel (:func:`risk_control_threshold`), and the interval of a pixel is ``pred ±
    lambda_hat pred_uct``. For a new image exchangeable with the calibration images the expected
    share of its pixels outside their intervals is at most ``alpha`` -- the expected pixel
    coverage of an image is at least ``1 - alpha``, per target. This is *not* the per-pixel
    split-conformal guarantee of :class:`~uq_box.methods.posthoc.ConformalRegression`: pixels of
    one image are not exchangeable, so the images are the units (see
    :mod:`uq_box.methods.conformal_dense`); the price is the ``1 / (n + 1)`` correction counted
    in images, not pixels. Fewer than ``1 / alpha - 1`` calibration images is an error.

    ``predict_step`` returns the wrapped method's prediction with ``lower`` / ``upper``
    ``[N, T, H, W]``, ``pred`` unchanged and, as ``ConformalRegression`` does, ``pred_uct`` the
    Gaussian-equivalent std ``half-width / z_{1 - alpha/2}``, the aleatoric and epistemic parts
    scaled by the same factor (so ``total^2 = aleatoric^2 + epistemic^2`` still holds). It goes
    through the wrapped method's ``predict_step``, so its ``sample_chunk_size`` applies. Test
    metrics: the pixel regression ones plus ``coverage`` (mean per-image share of pixels inside
    their interval, nominally at least ``1 - alpha``) and ``interval_width``.

    Args:
        model: a fitted pixel regression method (a ``PixelRegressionTask`` ``UQMethod``).
        alpha: the risk level in ``(0, 1)``: the bound on the expected per-image miscoverage.
    """

    _task = PixelRegressionTask
    sample_chunk_size = _CHUNK

    def __init__(self, model: UQMethod, alpha: float = 0.1) -> None:
        super().__init__(model, alpha)
        #: ``z_{1 - alpha/2}``: half-width of the central 1 - alpha Gaussian interval in stds.
        self.z = NormalDist().inv_cdf(1.0 - self.alpha / 2.0)

    def build_metrics(self) -> nn.ModuleDict:
        """The pixel regression metrics plus ``coverage`` and ``interval_width``."""
        metrics = super().build_metrics()
        metrics["coverage"] = MeanMetric()
        metrics["interval_width"] = MeanMetric()
        return metrics

    def collect(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The normalized residuals ``[B, T, H * W]`` of one batch."""
        preds = self.model.predict_step(x)
        target = target.to(device=preds["pred"].device)
        return {"scores": pixel_normalized_scores(preds["pred"], preds["pred_uct"], target)}

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """One ``lambda_hat`` per target channel."""
        scores = collected["scores"]
        thresholds = [
            risk_control_threshold(scores[:, t], self.alpha) for t in range(scores.shape[1])
        ]
        self._set_threshold(torch.stack(thresholds).clamp_min(0.0), scores.shape[0])

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The wrapped method's prediction with ``lower`` / ``upper`` ``[N, T, H, W]``."""
        preds = self.wrapped_predictions(batch)
        with torch.no_grad():
            pred, old_std = preds["pred"], preds["pred_uct"]
            if self.threshold.numel() != pred.shape[1]:
                raise ValueError(
                    f"the wrapper is calibrated for {self.threshold.numel()} target(s) but "
                    f"{type(self.model).__name__} predicts {pred.shape[1]}"
                )
            threshold = self.threshold.to(pred.dtype).reshape(1, -1, 1, 1)
            half_width = threshold * old_std
            new_std = (half_width / self.z).clamp_min(MIN_STD)
            factor = new_std / old_std.clamp_min(MIN_STD)
            for key in ("aleatoric_uct", "epistemic_uct"):
                preds[key] = preds[key] * factor
            preds.update(pred_uct=new_std, lower=pred - half_width, upper=pred + half_width)
        return preds

    def update_metrics(
        self, metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        """Pixel regression metrics; per-image coverage and the mean interval width."""
        target = target.to(preds["pred"].dtype)
        lower, upper = preds["lower"], preds["upper"]
        for name, metric in metrics.items():
            if name == "coverage":
                metric.update(1.0 - pixel_miscoverage(lower, upper, target).mean(1))
            elif name == "interval_width":
                metric.update((upper - lower).double().flatten(1).mean(1))
            elif name == "rmse":
                metric.update(preds["pred"], target)
            else:
                metric.update(preds["pred"], preds["pred_uct"], target)
