"""Dense prediction: semantic segmentation and pixel-wise regression with per-pixel uncertainty.

Two task mixins beside :class:`~uq_box.methods.base.RegressionTask` and
:class:`~uq_box.methods.base.ClassificationTask`, and thin classes for the method families:

- :class:`SegmentationTask`: the network maps images ``[N, C_in, H, W]`` to class logits
  ``[N, C, H, W]``; targets are labels ``[N, H, W]``, with ``ignore_index`` (the criterion's,
  ``-100`` by default, as ``nn.CrossEntropyLoss``) for unlabeled pixels: the loss and every
  metric skip them. ``predict_step`` gives ``pred`` ``[N, C, H, W]`` (mean probabilities) and
  ``pred_uct`` / ``aleatoric_uct`` / ``epistemic_uct`` ``[N, H, W]`` (predictive entropy,
  expected entropy, mutual information, per pixel), and ``logits`` ``[S, N, C, H, W]``.
- :class:`PixelRegressionTask`: the network gives the criterion's outputs per target as channels,
  ``[N, O, H, W]`` (``NLL()``: ``O = 2T``, the mean and scale of target 0, then of target 1, ...);
  targets are ``[N, T, H, W]``. ``predict_step`` gives ``pred``, ``pred_uct``,
  ``epistemic_uct``, ``aleatoric_uct`` ``[N, T, H, W]`` (the Gaussian mixture moments per pixel)
  and ``samples`` ``[S, N, T, H, W]``.

**Bounded memory.** ``S`` samples of ``N`` images hold ``S x N x O x H x W`` outputs. Set
``method.sample_chunk_size = k`` (a prediction option, like ``quantile_levels``; ``None``, the
default, predicts all samples at once) and ``predict_step`` draws the samples ``k`` at a time
and reduces them into sufficient statistics (:mod:`uq_box.methods.predictive_dense`): the same
``pred`` and uncertainties as the unchunked prediction, without the ``logits`` / ``samples``
key. Validation and test metrics go through ``predict_step`` and so are chunked too. The
chunks: Monte Carlo methods (MC dropout, Bayes by Backprop) draw ``k`` fresh samples per chunk;
a deep ensemble runs ``k`` members at a time; SWAG and SG-MCMC draw (or take) their ``S``
parameter vectors once and run ``k`` at a time, so their chunked prediction equals the unchunked
one given the same seed.

**N counts pixels.** The likelihood of an image factorizes over its pixels, so the ``N`` of the
ELBO (Bayes by Backprop) and of the SG-MCMC potential is the number of training pixels, images x
``H x W`` (:attr:`DenseTask.num_training_points`); a ``num_training_points`` given at
construction counts images.

Laplace is not offered: laplace-torch's last-layer Laplace needs a last ``nn.Linear`` layer and
outputs ``[N, C]`` (its likelihoods and GLM predictive read the class axis last), while a dense
network ends in a convolution with outputs ``[N, C, H, W]``; a per-pixel head would have to be
rewritten as a network over pixels, which no other method here needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanSquaredError

from uq_box.checks import positive_int
from uq_box.losses import NLL
from uq_box.methods.base import UQMethod, eval_mode, unpack_batch
from uq_box.methods.bnn_vi import BNNVI
from uq_box.methods.deep_ensemble import DeepEnsemble
from uq_box.methods.deterministic import Deterministic
from uq_box.methods.mc_dropout import MCDropoutMethod
from uq_box.methods.predictive import criterion_mean_and_std, criterion_num_outputs
from uq_box.methods.predictive_dense import (
    PixelRegressionMoments,
    SegmentationMoments,
    pixel_regression_predictive,
    pixels_as_points,
    segmentation_predictive,
)
from uq_box.methods.sampled import ParameterSampling
from uq_box.methods.sgmcmc import SGMCMC
from uq_box.methods.swag import SWAG
from uq_box.metrics.dense import (
    IGNORE_INDEX,
    MeanIoU,
    PixelAccuracy,
    PixelCRPS,
    PixelECE,
    PixelGaussianNLL,
    PixelNLL,
)
from uq_box.nn.ensemble import map_stacked
from uq_box.nn.graph import in_functorch_transform

__all__ = [
    "BNNVIPixelRegression",
    "BNNVISegmentation",
    "DeepEnsemblePixelRegression",
    "DeepEnsembleSegmentation",
    "DenseTask",
    "DeterministicPixelRegression",
    "DeterministicSegmentation",
    "MCDropoutPixelRegression",
    "MCDropoutSegmentation",
    "PixelRegressionTask",
    "SGMCMCPixelRegression",
    "SGMCMCSegmentation",
    "SWAGPixelRegression",
    "SWAGSegmentation",
    "SegmentationTask",
    "sample_output_chunks",
]


# -- chunks of samples ------------------------------------------------------------------------------
@contextmanager
def _fixed_parameter_samples(method: ParameterSampling, flat: Tensor) -> Iterator[None]:
    """``method.sample_parameters`` returns ``flat`` inside the context."""
    method.sample_parameters = lambda num_samples=None: flat  # instance attribute, removed after
    try:
        yield
    finally:
        del method.sample_parameters


def _ensemble_member_chunk(ensemble: nn.Module, x: Tensor, start: int, stop: int) -> Tensor:
    """Members ``start:stop`` of a :class:`~uq_box.nn.StackedEnsemble` on ``x``."""
    tensors = tuple(t[start:stop] for t in ensemble._tensors())

    def call(part: tuple[Tensor, ...]) -> Tensor:
        with ensemble._swapped(part) as template:
            return template(x)

    if ensemble._template.training != ensemble.training:
        ensemble._template.train(ensemble.training)
    restore = tensors[len(ensemble._param_names) :]
    return map_stacked(ensemble, call, (tensors,), x.device, restore=restore)


def sample_output_chunks(
    method: UQMethod, x: Tensor, num_samples: int, chunk_size: int
) -> Iterator[Tensor]:
    """The raw outputs of ``num_samples`` samples (or members), ``chunk_size`` at a time.

    Monte Carlo methods draw fresh samples per chunk; a deep ensemble runs its members in
    chunks; SWAG and SG-MCMC draw their parameter vectors once and run them in chunks.
    """
    if isinstance(method, DeepEnsemble):
        for start in range(0, method.num_members, chunk_size):
            stop = min(start + chunk_size, method.num_members)
            yield _ensemble_member_chunk(method.model, x, start, stop)
        return
    if isinstance(method, ParameterSampling):
        flat = method.sample_parameters(num_samples)
        for start in range(0, len(flat), chunk_size):
            with _fixed_parameter_samples(method, flat[start : start + chunk_size]):
                yield method.sample_outputs(x, None)
        return
    done = 0
    while done < num_samples:
        count = min(chunk_size, num_samples - done)
        outputs = method.sample_outputs(x, count)
        done += outputs.shape[0]
        yield outputs
        if outputs.shape[0] != count:  # a method with a fixed number of samples
            return


class DenseTask:
    """What segmentation and pixel regression share: chunked prediction, ``N`` in pixels."""

    #: samples per chunk of ``predict_step`` (``None``: all at once); a prediction option, not a
    #: hyperparameter (not saved in checkpoints).
    sample_chunk_size: int | None = None
    #: pixels per image of the last training batch (``N`` of the ELBO counts pixels).
    _pixels_per_image: int = 1

    @property
    def num_training_points(self) -> int:
        """Training pixels: the training images (read or given) times ``H x W``."""
        return super().num_training_points * self._pixels_per_image

    def _remember_pixels(self, target: Tensor) -> None:
        self._pixels_per_image = int(target.shape[-2] * target.shape[-1])

    def new_moments(self) -> Any:
        """The chunked reduction of the task."""
        raise NotImplementedError

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The per-pixel predictive; in chunks of ``sample_chunk_size`` samples when set."""
        chunk = self.sample_chunk_size
        if chunk is None:
            return super().predict_step(batch, batch_idx, dataloader_idx)
        positive_int(chunk, "sample_chunk_size")
        x, _ = unpack_batch(batch)
        with torch.no_grad(), eval_mode(self.model):
            x = self._as_network_dtype(x.to(self.device))
            moments = self.new_moments()
            for outputs in sample_output_chunks(self, x, self.num_mc_samples_test, chunk):
                moments.add(outputs)
            return moments.result()


def _check_images(outputs: Tensor) -> None:
    if outputs.ndim != 5:
        raise ValueError(
            f"a dense task needs network outputs [N, C, H, W] (sampled: [S, N, C, H, W]), got "
            f"sampled outputs of shape {list(outputs.shape)}; use an image-to-image network "
            f"such as uq_box.models.UNet"
        )


class SegmentationTask(DenseTask):
    """Semantic segmentation: per-pixel softmax predictive with the entropy split.

    Mix in before the method family (``class XSegmentation(SegmentationTask, X)``). Targets are
    labels ``[N, H, W]``; ``ignore_index`` (the criterion's) marks unlabeled pixels.
    """

    criterion: nn.Module
    #: Labels are checked, not cast.
    cast_targets = False

    @property
    def ignore_index(self) -> int:
        """The label of unlabeled pixels: the criterion's ``ignore_index`` (-100 by default)."""
        return int(getattr(self.criterion, "ignore_index", IGNORE_INDEX))

    def default_criterion(self) -> nn.Module:
        """Cross-entropy per pixel, unlabeled pixels (``-100``) ignored."""
        return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must be a module taking ``(logits [B, C, H, W], target [B, H, W])``."""
        if not isinstance(criterion, nn.Module):
            raise TypeError(
                f"`criterion` must be an nn.Module such as nn.CrossEntropyLoss(), got "
                f"{type(criterion).__name__}"
            )

    def build_metrics(self) -> nn.ModuleDict:
        """Mean IoU, pixel accuracy, pixel NLL and pixel ECE (unlabeled pixels skipped)."""
        ignore = self.ignore_index
        return nn.ModuleDict(
            {
                "miou": MeanIoU(ignore_index=ignore),
                "pixel_accuracy": PixelAccuracy(ignore_index=ignore),
                "nll": PixelNLL(ignore_index=ignore),
                "ece": PixelECE(ignore_index=ignore),
            }
        )

    def predictive(self, outputs: Tensor) -> dict[str, Tensor]:
        """Per-pixel mean probabilities and entropy split, see :func:`segmentation_predictive`."""
        _check_images(outputs)
        return segmentation_predictive(outputs)

    def new_moments(self) -> SegmentationMoments:
        """Sums of probabilities and entropies over chunks of samples."""
        return SegmentationMoments()

    def _check_target(self, num_classes: int, spatial: tuple, target: Tensor) -> None:
        if target.is_floating_point() or target.dtype == torch.bool or target.shape != spatial:
            raise ValueError(
                f"segmentation targets must be integer labels of shape {spatial} ([N, H, W]), "
                f"got {target.dtype} of shape {tuple(target.shape)}"
            )
        if target.numel() and not in_functorch_transform():
            labeled = target[target != self.ignore_index]
            if labeled.numel():
                low, high = (int(v) for v in torch.aminmax(labeled))
                if low < 0 or high >= num_classes:
                    raise ValueError(
                        f"the network gives {num_classes} outputs (class logits) per pixel but "
                        f"the targets hold class index {low if low < 0 else high}; expected class "
                        f"indices in [0, {num_classes}) or `ignore_index`={self.ignore_index}: "
                        f"set the network's `n_outputs` (a UNet's `out_channels`) to the number "
                        f"of classes"
                    )

    def data_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Criterion on the logits of all samples ``[S, B, C, H, W]`` (unlabeled pixels skipped
        by the criterion's ``ignore_index``).
        """
        _check_images(outputs)
        num_samples, batch, num_classes = outputs.shape[:3]
        self._check_target(num_classes, (batch, *outputs.shape[3:]), target)
        self._remember_pixels(target)
        flat_target = target.unsqueeze(0).expand(num_samples, *target.shape).flatten(0, 1)
        return self.criterion(outputs.flatten(0, 1), flat_target)

    def running_terms(self, outputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Pixel accuracy of the sample-mean probabilities over the labeled pixels."""
        labels = outputs.softmax(2).mean(0).argmax(1)
        labeled = target != self.ignore_index
        correct = ((labels == target) & labeled).sum()
        return {"pixel_accuracy": correct / labeled.sum().clamp_min(1)}

    def update_metrics(
        self, metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        """Feed the mean probabilities ``[N, C, H, W]`` and the labels to every metric."""
        pred = preds["pred"]
        self._check_target(pred.shape[1], (pred.shape[0], *pred.shape[2:]), target)
        for metric in metrics.values():
            metric.update(pred, target)


class PixelRegressionTask(DenseTask):
    """Pixel-wise regression: per-pixel Gaussian mixture moments with the uncertainty split.

    Mix in before the method family (``class XPixelRegression(PixelRegressionTask, X)``). Targets
    are ``[N, T, H, W]``; the network gives ``criterion.num_outputs * T`` channels.
    """

    criterion: nn.Module

    def default_criterion(self) -> nn.Module:
        """Heteroscedastic Gaussian NLL per pixel (2 channels per target)."""
        return NLL()

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must be a module taking ``(outputs [S, P, O], target [P, T])``."""
        if not isinstance(criterion, nn.Module):
            raise TypeError(
                f"`criterion` must be an nn.Module such as uq_box.losses.NLL(), got "
                f"{type(criterion).__name__}"
            )

    def setup_task(self) -> None:
        """A mean-only criterion gets a homoscedastic noise estimate, the training RMSE."""
        if criterion_num_outputs(self.criterion) == 1 and not hasattr(self.criterion, "std"):
            self.register_buffer("noise_std", torch.ones(()))

    def on_epoch_means(self, stage: str, values: dict[str, Tensor]) -> None:
        """Keep the last training epoch's RMSE as a mean-only network's noise estimate."""
        if stage == "train" and hasattr(self, "noise_std") and "train_rmse" in values:
            self.noise_std.copy_(values["train_rmse"])

    def build_metrics(self) -> nn.ModuleDict:
        """Pixel Gaussian NLL, RMSE and CRPS."""
        return nn.ModuleDict(
            {
                "nll": PixelGaussianNLL(),
                "rmse": MeanSquaredError(squared=False),
                "crps": PixelCRPS(),
            }
        )

    def predictive(self, outputs: Tensor) -> dict[str, Tensor]:
        """Per-pixel mixture moments, see :func:`pixel_regression_predictive`."""
        _check_images(outputs)
        return pixel_regression_predictive(
            outputs, self.criterion, getattr(self, "noise_std", None)
        )

    def new_moments(self) -> PixelRegressionMoments:
        """Chunk-merged moments of the sampled means and variances."""
        return PixelRegressionMoments(self.criterion, getattr(self, "noise_std", None))

    def check_outputs(self, outputs: Tensor, target: Tensor) -> None:
        """Shapes: outputs ``[S, B, O, H, W]`` with ``O = num_outputs * T``, target
        ``[B, T, H, W]``.
        """
        _check_images(outputs)
        if target.ndim != 4 or target.shape[0] != outputs.shape[1]:
            raise ValueError(
                f"pixel regression targets must be [N, T, H, W] for outputs "
                f"{list(outputs.shape[1:])}, got {list(target.shape)}"
            )
        expected = criterion_num_outputs(self.criterion) * target.shape[1]
        if outputs.shape[2] != expected:
            raise ValueError(
                f"the network gives {outputs.shape[2]} output channels per pixel but the "
                f"criterion {type(self.criterion).__name__} needs {expected} for "
                f"{target.shape[1]} target(s); set the network's `n_outputs` (a UNet's "
                f"`out_channels`) to {expected} or change `criterion`"
            )
        if outputs.shape[3:] != target.shape[2:]:
            raise ValueError(
                f"outputs of {list(outputs.shape[3:])} pixels for targets of "
                f"{list(target.shape[2:])}"
            )

    @staticmethod
    def _flat_target(target: Tensor) -> Tensor:
        return target.movedim(1, -1).reshape(-1, target.shape[1])

    def data_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Criterion over all samples and pixels (every pixel a point)."""
        self.check_outputs(outputs, target)
        self._remember_pixels(target)
        return self.criterion(pixels_as_points(outputs), self._flat_target(target))

    def burnin_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """MSE of each sample's mean output per pixel."""
        self.check_outputs(outputs, target)
        means, _ = criterion_mean_and_std(self.criterion, pixels_as_points(outputs))
        return ((means - self._flat_target(target)) ** 2).mean()

    def running_terms(self, outputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Squared error of the sample-mean prediction (logged as ``rmse``)."""
        means, _ = criterion_mean_and_std(self.criterion, pixels_as_points(outputs))
        return {"mse": ((means.mean(0) - self._flat_target(target)) ** 2).mean()}

    def update_metrics(
        self, metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        """``rmse`` takes the mean, the others the Gaussian ``(pred, pred_uct, target)``."""
        target = target.to(preds["pred"].dtype)
        for name, metric in metrics.items():
            if name == "rmse":
                metric.update(preds["pred"], target)
            else:
                metric.update(preds["pred"], preds["pred_uct"], target)


# -- the thin classes ------------------------------------------------------------------------------
class DeterministicSegmentation(SegmentationTask, Deterministic):
    """One segmentation network; its uncertainty is the per-pixel softmax entropy only."""


class DeterministicPixelRegression(PixelRegressionTask, Deterministic):
    """One network giving a mean and a scale per pixel (Gaussian NLL); no epistemic part."""


class MCDropoutSegmentation(SegmentationTask, MCDropoutMethod):
    """MC dropout for segmentation (a U-Net with ``dropout_p > 0``; e.g. dropout only in the
    bottleneck and decoder, ``UNet(dropout_at="decoder")``).
    """


class MCDropoutPixelRegression(PixelRegressionTask, MCDropoutMethod):
    """MC dropout for pixel-wise regression (Gaussian NLL per pixel)."""


class DeepEnsembleSegmentation(SegmentationTask, DeepEnsemble):
    """Deep ensemble of segmentation networks (cross-entropy per member)."""


class DeepEnsemblePixelRegression(PixelRegressionTask, DeepEnsemble):
    """Deep ensemble for pixel-wise regression (Gaussian NLL per member)."""


class BNNVISegmentation(SegmentationTask, BNNVI):
    """Bayes by Backprop for segmentation; partially stochastic with ``stochastic_module_names``
    (e.g. only the bottleneck, ``["bottleneck.0", "bottleneck.2"]``, or the decoder,
    ``UNet.decoder_layers()``).
    """


class BNNVIPixelRegression(PixelRegressionTask, BNNVI):
    """Bayes by Backprop for pixel-wise regression (partially stochastic as for segmentation)."""


class SWAGSegmentation(SegmentationTask, SWAG):
    """SWAG for segmentation (the chosen modules' parameters get the SWAG Gaussian)."""


class SWAGPixelRegression(PixelRegressionTask, SWAG):
    """SWAG for pixel-wise regression."""


class SGMCMCSegmentation(SegmentationTask, SGMCMC):
    """SG-MCMC (pSGLD by default) for segmentation; ``N`` of the potential counts pixels."""


class SGMCMCPixelRegression(PixelRegressionTask, SGMCMC):
    """SG-MCMC (pSGLD by default) for pixel-wise regression."""
