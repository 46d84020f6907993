"""Per-pixel predictive distributions of dense prediction (pure functions).

Segmentation and pixel-wise regression read every pixel as a point: the sampled outputs
``[S, N, O, H, W]`` are the sampled outputs ``[S, N * H * W, O]`` of the point-wise predictives
(:func:`~uq_box.methods.predictive_classification.classification_predictive`, the entropy split
over the class axis; :func:`~uq_box.methods.predictive.regression_predictive`, the Gaussian
mixture moments), reshaped back to images. Nothing is copied from them.

**Bounded memory.** ``S`` samples of ``N`` images hold ``S x N x O x H x W`` values. The chunked
reductions (:class:`SegmentationMoments`, :class:`PixelRegressionMoments`) take the samples a
chunk at a time and keep only sufficient statistics (segmentation: the sum of the sampled
probabilities and the sum of the sampled entropies; regression: the count, mean and sum of
squared deviations of the sampled means, merged chunk by chunk as Chan et al. 1979 do, and the
sum of the sampled variances), so the result equals the unchunked one (to round-off) while at
most one chunk of samples is in memory. The chunked result has no ``logits`` / ``samples`` key.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from uq_box.methods.predictive import criterion_mean_and_std, regression_predictive
from uq_box.methods.predictive_classification import _neg_plogp, classification_predictive

__all__ = [
    "PixelRegressionMoments",
    "SegmentationMoments",
    "pixel_regression_predictive",
    "pixels_as_points",
    "points_as_pixels",
    "segmentation_predictive",
]


def _check_dense(outputs: Tensor, name: str) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(outputs).__name__}")
    if outputs.ndim != 5:
        raise ValueError(f"`{name}` must have shape [S, N, C, H, W], got {list(outputs.shape)}")


def pixels_as_points(outputs: Tensor) -> Tensor:
    """``[S, N, O, H, W]`` -> ``[S, N * H * W, O]``: every pixel a point, channels last."""
    _check_dense(outputs, "outputs")
    num_samples, _, channels = outputs.shape[:3]
    return outputs.movedim(2, -1).reshape(num_samples, -1, channels)


def _to_pixels(values: Tensor, shape: tuple[int, int, int], channels: bool) -> Tensor:
    n, h, w = shape
    if not channels:  # [..., N*H*W] -> [..., N, H, W]
        return values.reshape(*values.shape[:-1], n, h, w)
    lead = values.shape[:-2]
    out = values.reshape(*lead, n, h, w, values.shape[-1])
    return out.movedim(-1, len(lead) + 1)


def points_as_pixels(
    values: Tensor, num_images: int, height: int, width: int, channels: bool = True
) -> Tensor:
    """Reshape pixel-as-point values back to images.

    Args:
        values: ``[..., N * H * W, T]`` (``channels=True``) or ``[..., N * H * W]``.
        num_images: ``N``.
        height: ``H``.
        width: ``W``.
        channels: whether the last axis is a channel axis.

    Returns:
        ``[..., N, T, H, W]`` or ``[..., N, H, W]``.
    """
    return _to_pixels(values, (num_images, height, width), channels)


def segmentation_predictive(logits: Tensor) -> dict[str, Tensor]:
    """Per-pixel Bayesian model average of ``S`` softmax predictions, entropy split.

    :func:`~uq_box.methods.predictive_classification.classification_predictive` on every pixel
    (the class axis is ``dim=2`` of the samples, ``dim=1`` of the prediction).

    Args:
        logits: sampled logits ``[S, N, C, H, W]``.

    Returns:
        ``pred``: mean class probabilities ``[N, C, H, W]``; ``pred_uct`` (predictive entropy),
        ``aleatoric_uct`` (expected entropy), ``epistemic_uct`` (mutual information), each
        ``[N, H, W]`` in nats; ``logits``: the input.
    """
    _check_dense(logits, "logits")
    num_images, _, height, width = logits.shape[1:]
    shape = (num_images, height, width)
    preds = classification_predictive(pixels_as_points(logits))
    return {
        "pred": _to_pixels(preds["pred"], shape, channels=True),
        **{
            key: _to_pixels(preds[key], shape, channels=False)
            for key in ("pred_uct", "aleatoric_uct", "epistemic_uct")
        },
        "logits": logits,
    }


def pixel_regression_predictive(
    outputs: Tensor, criterion: nn.Module, noise_std: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-pixel Gaussian mixture moments over ``S`` samples (law of total variance).

    :func:`~uq_box.methods.predictive.regression_predictive` on every pixel: the output channels
    ``O`` are read by the criterion as the point-wise outputs (``NLL()``: ``2T`` channels, mean
    and scale of target 0, then of target 1, ...).

    Args:
        outputs: raw network outputs ``[S, N, O, H, W]``.
        criterion: reads ``O`` channels as ``(mean, std)`` through ``mean_and_std``.
        noise_std: homoscedastic noise std of a mean-only network.

    Returns:
        ``pred``, ``pred_uct``, ``epistemic_uct``, ``aleatoric_uct``, each ``[N, T, H, W]``, and
        ``samples`` ``[S, N, T, H, W]`` (the sampled means).
    """
    _check_dense(outputs, "outputs")
    num_images, _, height, width = outputs.shape[1:]
    shape = (num_images, height, width)
    preds = regression_predictive(pixels_as_points(outputs), criterion, noise_std)
    keys = ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct", "samples")
    return {key: _to_pixels(preds[key], shape, channels=True) for key in keys}


class SegmentationMoments:
    """Chunked :func:`segmentation_predictive`: add sample chunks, then :meth:`result`.

    Keeps the sum of the sampled probabilities ``[N, C, H, W]`` and of the sampled entropies
    ``[N, H, W]``; ``result()`` equals ``segmentation_predictive`` of all the chunks concatenated
    (without the ``logits`` key).
    """

    def __init__(self) -> None:
        self.count = 0
        self.prob_sum: Tensor | None = None
        self.entropy_sum: Tensor | None = None

    def add(self, logits: Tensor) -> None:
        """Add a chunk of sampled logits ``[s, N, C, H, W]``."""
        _check_dense(logits, "logits")
        log_p = torch.log_softmax(logits, dim=2)
        prob_sum = log_p.exp().sum(0)
        entropy_sum = _neg_plogp(log_p).sum(2).sum(0)
        if self.prob_sum is None:
            self.prob_sum, self.entropy_sum = prob_sum, entropy_sum
        else:
            self.prob_sum += prob_sum
            self.entropy_sum += entropy_sum
        self.count += logits.shape[0]

    def result(self) -> dict[str, Tensor]:
        """``pred``, ``pred_uct``, ``aleatoric_uct``, ``epistemic_uct`` of every chunk added."""
        if self.prob_sum is None:
            raise ValueError("no sample chunk was added")
        pred = self.prob_sum / self.count
        total = _neg_plogp(pred.clamp_min(torch.finfo(pred.dtype).tiny).log()).sum(1)
        aleatoric = self.entropy_sum / self.count
        return {
            "pred": pred,
            "pred_uct": total,
            "aleatoric_uct": aleatoric,
            "epistemic_uct": (total - aleatoric).clamp_min(0.0),
        }


class PixelRegressionMoments:
    """Chunked :func:`pixel_regression_predictive`: add sample chunks, then :meth:`result`.

    Keeps the count, the mean and the sum of squared deviations of the sampled means (merged
    chunk by chunk, Chan et al. 1979) and the sum of the sampled variances, each ``[N, T, H, W]``;
    ``result()`` equals ``pixel_regression_predictive`` of all the chunks (without ``samples``).

    Args:
        criterion: reads the output channels (``mean_and_std``).
        noise_std: homoscedastic noise std of a mean-only network.
    """

    def __init__(self, criterion: nn.Module, noise_std: Tensor | None = None) -> None:
        self.criterion = criterion
        self.noise_std = noise_std
        self.count = 0
        self.mean: Tensor | None = None
        self.sq_dev: Tensor | None = None
        self.var_sum: Tensor | None = None

    def add(self, outputs: Tensor) -> None:
        """Add a chunk of raw outputs ``[s, N, O, H, W]``."""
        _check_dense(outputs, "outputs")
        num_images, _, height, width = outputs.shape[1:]
        shape = (num_images, height, width)
        means, stds = criterion_mean_and_std(self.criterion, pixels_as_points(outputs))
        means = _to_pixels(means, shape, channels=True)  # [s, N, T, H, W]
        count = means.shape[0]
        mean = means.mean(0)
        sq_dev = ((means - mean) ** 2).sum(0)
        var_sum = None if stds is None else _to_pixels(stds**2, shape, channels=True).sum(0)
        if self.mean is None:
            self.mean, self.sq_dev, self.var_sum = mean, sq_dev, var_sum
        else:
            total = self.count + count
            delta = mean - self.mean
            self.sq_dev = self.sq_dev + sq_dev + delta**2 * (self.count * count / total)
            self.mean = self.mean + delta * (count / total)
            if var_sum is not None:
                self.var_sum = self.var_sum + var_sum
        self.count += count

    def result(self) -> dict[str, Tensor]:
        """``pred``, ``pred_uct``, ``epistemic_uct``, ``aleatoric_uct`` (stds ``[N, T, H, W]``)."""
        if self.mean is None:
            raise ValueError("no sample chunk was added")
        pred = self.mean
        epistemic_var = self.sq_dev / self.count
        if self.var_sum is not None:
            aleatoric_var = self.var_sum / self.count
        elif self.noise_std is not None:
            aleatoric_var = (self.noise_std.to(pred.dtype) ** 2).expand_as(pred)
        else:
            aleatoric_var = torch.zeros_like(pred)
        return {
            "pred": pred,
            "pred_uct": (epistemic_var + aleatoric_var).sqrt(),
            "epistemic_uct": epistemic_var.sqrt(),
            "aleatoric_uct": aleatoric_var.sqrt(),
        }
