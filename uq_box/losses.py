"""Losses: Gaussian negative log-likelihood, the evidence lower bound and the pinball loss.

A regression criterion also says how to read the network's raw outputs as a predictive mean and
standard deviation (:meth:`NLL.mean_and_std`), so that every method splits uncertainty the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from uq_box.checks import non_negative_finite, positive_finite

LOG_2PI = math.log(2.0 * math.pi)


def softplus_std(raw: Tensor, min_std: float = 1e-6) -> Tensor:
    """Standard deviation from an unconstrained output: ``softplus(raw) + min_std``.

    Softplus (Lakshminarayanan et al. 2017, "Simple and Scalable Predictive Uncertainty Estimation
    using Deep Ensembles") grows linearly rather than exponentially, so a large raw output does not
    blow up the gradient as a log-variance parameterization can.
    """
    return F.softplus(raw) + min_std


def gaussian_nll_loss(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Elementwise ``-log N(target | mean, std^2)``, shapes broadcast (no reduction).

    The loss of :class:`NLL`; the metric of the same quantity, the mean over checked ``[N]`` or
    ``[N, T]`` predictions, is :func:`uq_box.metrics.functional.gaussian_nll`.
    """
    return 0.5 * LOG_2PI + torch.log(std) + 0.5 * ((target - mean) / std) ** 2


class NLL(nn.Module):
    """Gaussian negative log-likelihood, averaged over all elements.

    With ``std=None`` (heteroscedastic) the network has 2 outputs per target, laid out
    target-major as :class:`PinballLoss` lays out its levels: ``[..., 2 T]`` holds
    ``(mean, scale)`` of target 0, then of target 1, ...; for one target ``[..., 0]`` is the mean
    and ``[..., 1]`` an unconstrained scale ``s`` with ``std = softplus(s) + min_std``.
    With a fixed ``std`` (known homoscedastic noise) the network has 1 output per target, the
    mean: ``[..., T]``.

    Outputs may carry leading sample dimensions (``[S, N, 2 T]``); the target ``[N, T]``
    broadcasts.

    Targets recorded on a grid (integer quality scores, prices rounded to cents) carry a
    rounding error: with ``resolution`` ``Δ`` the grid step, the observed target is a continuous
    one plus a uniform error on ``[-Δ/2, Δ/2]`` of variance ``Δ² / 12``, and the predicted std is
    ``sqrt(std² + Δ² / 12)``. Without it a Gaussian density on discrete targets is unbounded: the
    learned std can collapse onto training points that sit exactly on the grid, and a test point
    one step away scores a log-likelihood of minus hundreds (wine quality in the UCI benchmark).
    :func:`uq_box.datamodules.target_resolution` finds ``Δ`` from the training targets.

    Args:
        std: known noise standard deviation, or ``None`` to learn it per input.
        min_std: floor added to the learned standard deviation.
        resolution: grid step ``Δ`` of the targets (0: continuous targets).
    """

    def __init__(
        self, std: float | None = None, min_std: float = 1e-6, resolution: float = 0.0
    ) -> None:
        super().__init__()
        self.std = None if std is None else positive_finite(std, "std")
        self.min_std = non_negative_finite(min_std, "min_std")
        resolution = non_negative_finite(resolution, "resolution")
        self.quantized = resolution > 0
        # a buffer, so that stacked runs (one split each) keep their own grid step
        self.register_buffer("resolution", torch.tensor(float(resolution)), persistent=False)

    @property
    def num_outputs(self) -> int:
        """Network outputs per target: 2 (mean, scale) or 1 (mean, with a fixed ``std``)."""
        return 1 if self.std is not None else 2

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``[..., T * num_outputs] -> (mean [..., T], std [..., T])``."""
        if self.std is not None:
            mean = outputs
            std = torch.full_like(mean, self.std)
        else:
            if outputs.shape[-1] == 0 or outputs.shape[-1] % 2 != 0:
                raise ValueError(
                    f"the network gives {outputs.shape[-1]} outputs per point, expected an even "
                    f"number (a mean and a scale per target) for the heteroscedastic NLL"
                )
            pairs = outputs.unflatten(-1, (-1, 2))  # [..., T, (mean, scale)]
            mean = pairs[..., 0]
            std = softplus_std(pairs[..., 1], self.min_std)
        if self.quantized:  # the rounding error's variance (see the class docstring)
            std = (std.square() + self.resolution.square() / 12.0).sqrt()
        return mean, std

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean NLL of ``target`` under the Gaussians the ``outputs`` describe."""
        mean, std = self.mean_and_std(outputs)
        return gaussian_nll_loss(mean, std, target).mean()

    def extra_repr(self) -> str:
        text = f"std={self.std}" if self.std is not None else f"min_std={self.min_std}"
        # the step itself is a buffer (per stacked run), not part of the architecture
        return text + (", quantized targets" if self.quantized else "")


class MSE(nn.Module):
    """Mean squared error of a network with one output per target: a mean and no noise level."""

    num_outputs = 1

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, None]:
        """``[..., T] -> (mean [..., T], None)``."""
        return outputs, None

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean of ``(outputs - target)^2``."""
        return ((outputs - target) ** 2).mean()


def elbo_loss(data_nll: Tensor, kl: Tensor, num_training_points: int, beta: float = 1.0) -> Tensor:
    """Negative ELBO per training point, ``(N * data_nll + beta * KL) / N``.

    ``data_nll`` is the minibatch mean of the NLL (over points and Monte Carlo samples), so
    ``N * data_nll`` estimates the NLL summed over the whole training set without bias, and the KL
    is summed over every parameter (Blundell et al. 2015). Dividing by ``N`` leaves the optimum
    unchanged and keeps step sizes independent of the data set size.
    """
    return data_nll + beta * kl / num_training_points


def pinball_loss(quantile_pred: Tensor, target: Tensor, level: Tensor | float) -> Tensor:
    """Elementwise pinball (check) loss of Koenker & Bassett (1978), "Regression Quantiles".

    ``rho_q(r) = max(q r, (q - 1) r)`` of the residual ``r = target - quantile_pred``: under-
    predictions cost ``q`` per unit, over-predictions ``1 - q``, so its expectation is minimal at
    the ``q``-quantile of the target's distribution. Shapes broadcast.
    """
    residual = target - quantile_pred
    return torch.maximum(level * residual, (level - 1.0) * residual)


class PinballLoss(nn.Module):
    """Pinball loss over several quantile levels, averaged over levels, points and samples.

    The network gives one output per level and target, laid out ``[..., T * Q]`` (target-major:
    the ``Q`` levels of target 0, then of target 1, ...); for one target simply ``[..., Q]``.
    Averaging (rather than summing) over levels keeps the loss' scale independent of ``Q``; the
    minimizer is the same.

    As a regression criterion it also reads the outputs as a point prediction and a spread
    (:meth:`mean_and_std`): the median, and the standard deviation of the Gaussian whose
    ``q_lo``- and ``q_hi``-quantiles are the outer predicted quantiles,
    ``(upper - lower) / (z(q_hi) - z(q_lo))`` -- ``(upper - lower) / (2 z(q_hi))`` for a central
    interval such as ``(0.05, 0.95)``. Predicted quantiles are sorted first (the monotone
    rearrangement of Chernozhukov, Fernandez-Val & Galichon 2010), so crossing quantiles never
    give a negative width; training uses the raw outputs.

    Args:
        quantiles: strictly increasing levels in ``(0, 1)``. :meth:`mean_and_std` needs ``0.5``
            (the point prediction) and at least one other level.
        min_std: floor of the Gaussian-equivalent standard deviation.
    """

    def __init__(
        self,
        quantiles: tuple[float, ...] | list[float] = (0.05, 0.5, 0.95),
        min_std: float = 1e-6,
    ) -> None:
        super().__init__()
        try:
            levels = tuple(float(q) for q in quantiles)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"`quantiles` must be a sequence of levels in (0, 1), got {quantiles!r}"
            ) from err
        if not levels or not all(0.0 < q < 1.0 for q in levels):
            raise ValueError(
                f"`quantiles` must be a non-empty sequence of levels in (0, 1), got {quantiles!r}"
            )
        if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
            raise ValueError(f"`quantiles` must be strictly increasing, got {quantiles!r}")
        self.quantiles = levels
        self.min_std = non_negative_finite(min_std, "min_std")
        self.register_buffer("levels", torch.tensor(levels), persistent=False)

    @property
    def num_outputs(self) -> int:
        """Network outputs per target: one per quantile level."""
        return len(self.quantiles)

    def _split_levels(self, outputs: Tensor) -> Tensor:
        """``[..., T * Q] -> [..., T, Q]`` (a clear error on a width that is no multiple of Q)."""
        num_levels = len(self.quantiles)
        if outputs.shape[-1] == 0 or outputs.shape[-1] % num_levels != 0:
            raise ValueError(
                f"the network gives {outputs.shape[-1]} outputs per point, expected a multiple "
                f"of len(`quantiles`) = {num_levels} (one output per quantile level and target)"
            )
        return outputs.unflatten(-1, (-1, num_levels))

    def quantile_outputs(self, outputs: Tensor) -> Tensor:
        """Predicted quantiles ``[..., T, Q]``, sorted along the levels."""
        return self._split_levels(outputs).sort(dim=-1).values

    def check_levels_for_prediction(self) -> None:
        """Raise unless the levels include the median and another level."""
        if 0.5 not in self.quantiles or len(self.quantiles) < 2:
            raise ValueError(
                f"`quantiles` must contain 0.5 (the median is the point prediction) and at least "
                f"one other level, got {self.quantiles}"
            )

    def gaussian_std(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Std of the Gaussian with ``lower``/``upper`` as its outer-level quantiles."""
        outer = torch.tensor([self.quantiles[0], self.quantiles[-1]], dtype=torch.float64)
        z_lo, z_hi = torch.special.ndtri(outer).tolist()
        return ((upper - lower) / (z_hi - z_lo)).clamp_min(self.min_std)

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``[..., T * Q] -> (median [..., T], Gaussian-equivalent std [..., T])``."""
        self.check_levels_for_prediction()
        quantiles = self.quantile_outputs(outputs)
        median = quantiles[..., self.quantiles.index(0.5)]
        return median, self.gaussian_std(quantiles[..., 0], quantiles[..., -1])

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean pinball loss of outputs ``[..., T * Q]`` against ``target`` ``[..., T]``."""
        quantiles = self._split_levels(outputs)
        levels = self.levels.to(quantiles.dtype)
        return pinball_loss(quantiles, target.unsqueeze(-1).to(quantiles.dtype), levels).mean()

    def extra_repr(self) -> str:
        return f"quantiles={self.quantiles}"
