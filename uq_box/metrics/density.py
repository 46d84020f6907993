"""The predictive negative log-likelihood of a mixture over samples or members.

A method with ``S`` samples (Monte Carlo samples, ensemble members, posterior samples) predicts
the mixture ``p(y) = (1/S) sum_s p_s(y)`` of its samples' densities. Its log-density is
``logsumexp_s(log p_s(y)) - log S``, computed from the per-sample log-densities (each family's
``log_prob`` in :mod:`uq_box.losses`) without leaving log space. This is the real predictive
density; :class:`uq_box.metrics.GaussianNLL` scores the Gaussian with the mixture's mean and
variance (moment-matched) instead, which is lower for a bimodal or heavy-tailed predictive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MixtureNLL", "mixture_log_prob", "mixture_nll"]


def mixture_log_prob(log_probs: Tensor) -> Tensor:
    """Log-density of the equal-weight mixture over dim 0: ``[S, ...] -> [...]``.

    ``logsumexp_s(log_probs[s]) - log S``.
    """
    if log_probs.ndim < 1 or log_probs.shape[0] == 0:
        raise ValueError(
            f"`log_probs` must be per-sample log-densities [S, ...] with S >= 1, got shape "
            f"{tuple(log_probs.shape)}"
        )
    return torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])


def mixture_nll(log_probs: Tensor) -> Tensor:
    """Mean negative log-density of the mixture over dim 0 of per-sample log-densities
    ``[S, N]`` or ``[S, N, T]`` (mean over points and targets).
    """
    return -mixture_log_prob(log_probs).mean()


class MixtureNLL(Metric):
    """Mean predictive NLL of the mixture over samples, see :func:`mixture_nll`.

    ``update(log_probs)`` takes the per-sample log-densities ``[S, B]`` or ``[S, B, T]`` of a
    batch's targets; the state is a sum and a count (summed across processes under DDP), so
    batches of any size give the mean over all points (and targets). ``update(log_probs,
    num_targets=T)`` takes joint log-densities ``[S, B]`` of ``T`` targets each (a multivariate
    predictive, :class:`~uq_box.losses.MultivariateNLL`) and counts each point ``T`` times: the
    mean is then per target, the joint NLL divided by ``T`` (for independent targets the mean of
    their marginal NLLs).

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, log_probs: Tensor, num_targets: int = 1) -> None:
        """Add a batch's per-sample log-densities ``[S, B, ...]`` (each a joint density of
        ``num_targets`` targets).
        """
        log_density = mixture_log_prob(log_probs)
        self.total += -log_density.sum().to(self.total.dtype)
        self.count += log_density.numel() * int(num_targets)

    def compute(self) -> Tensor:
        """The mean NLL over every point seen since the last reset."""
        return self.total / self.count
