"""Losses: Gaussian negative log-likelihood and the evidence lower bound.

A regression criterion also says how to read the network's raw outputs as a predictive mean and
standard deviation (:meth:`NLL.mean_and_std`), so that every method splits uncertainty the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


def softplus_std(raw: Tensor, min_std: float = 1e-6) -> Tensor:
    """Standard deviation from an unconstrained output: ``softplus(raw) + min_std``.

    Softplus (Lakshminarayanan et al. 2017, "Simple and Scalable Predictive Uncertainty Estimation
    using Deep Ensembles") grows linearly rather than exponentially, so a large raw output does not
    blow up the gradient as a log-variance parameterization can.
    """
    return F.softplus(raw) + min_std


def gaussian_nll(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Elementwise ``-log N(target | mean, std^2)``, shapes broadcast."""
    return 0.5 * LOG_2PI + torch.log(std) + 0.5 * ((target - mean) / std) ** 2


class NLL(nn.Module):
    """Gaussian negative log-likelihood, averaged over all elements.

    With ``std=None`` (heteroscedastic) the network has 2 outputs per target: ``[..., 0]`` is the
    mean and ``[..., 1]`` an unconstrained scale ``s`` with ``std = softplus(s) + min_std``.
    With a fixed ``std`` (known homoscedastic noise) the network has 1 output, the mean.

    Outputs may carry leading sample dimensions (``[S, N, 2]``); the target ``[N, 1]`` broadcasts.

    Args:
        std: known noise standard deviation, or ``None`` to learn it per input.
        min_std: floor added to the learned standard deviation.
    """

    def __init__(self, std: float | None = None, min_std: float = 1e-6) -> None:
        super().__init__()
        if std is not None and not std > 0:
            raise ValueError(f"`std` must be positive or None, got {std}")
        if not min_std >= 0:
            raise ValueError(f"`min_std` must be non-negative, got {min_std}")
        self.std = std
        self.min_std = min_std

    @property
    def num_outputs(self) -> int:
        """Network outputs per target: 2 (mean, scale) or 1 (mean, with a fixed ``std``)."""
        return 1 if self.std is not None else 2

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``[..., num_outputs] -> (mean [..., 1], std [..., 1])``."""
        mean = outputs[..., :1]
        if self.std is not None:
            return mean, torch.full_like(mean, self.std)
        return mean, softplus_std(outputs[..., 1:2], self.min_std)

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean NLL of ``target`` under the Gaussians the ``outputs`` describe."""
        mean, std = self.mean_and_std(outputs)
        return gaussian_nll(mean, std, target).mean()

    def extra_repr(self) -> str:
        return f"std={self.std}" if self.std is not None else f"min_std={self.min_std}"


class MSE(nn.Module):
    """Mean squared error of a 1-output network; it predicts a mean and no noise level."""

    num_outputs = 1

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, None]:
        """``[..., 1] -> (mean [..., 1], None)``."""
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
