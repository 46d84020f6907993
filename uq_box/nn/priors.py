"""Priors over weights and the KL divergence of a mean-field Gaussian posterior from them."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal, kl_divergence


class Prior(nn.Module):
    """A ``torch.distributions`` family whose parameters live in buffers.

    Buffers follow the module across devices and into checkpoints, which a bare ``Distribution``
    does not. Any family whose parameters are named in its ``arg_constraints`` works: ``Normal``,
    ``Laplace``, ``StudentT``, ``Cauchy``... Parameters broadcast against the weight they cover.

    Args:
        distribution: the prior, e.g. ``Normal(0.0, 1.0)``; a number ``s`` means ``Normal(0, s)``.
    """

    def __init__(self, distribution: Distribution | float | None = None) -> None:
        super().__init__()
        distribution = as_distribution(distribution)
        self.family = type(distribution)
        self.param_names = [
            name for name in distribution.arg_constraints if name in vars(distribution)
        ]
        for name in self.param_names:
            value = torch.as_tensor(getattr(distribution, name))
            if not value.is_floating_point():
                value = value.to(torch.get_default_dtype())
            self.register_buffer(name, value.detach().clone())

    def distribution(self) -> Distribution:
        """The prior as a ``torch.distributions.Distribution``."""
        params = {name: getattr(self, name) for name in self.param_names}
        return self.family(**params, validate_args=False)

    def kl_from(self, mu: Tensor, sigma: Tensor, num_mc_samples: int = 1) -> Tensor:
        """``KL(N(mu, sigma^2) || self)`` summed; a direct closed form for a Normal prior."""
        if self.family is Normal:
            return normal_kl(mu, sigma, self.loc, self.scale).sum()
        return mean_field_kl(mu, sigma, self.distribution(), num_mc_samples)

    def extra_repr(self) -> str:
        params = ", ".join(
            f"{name}={getattr(self, name).tolist() if getattr(self, name).numel() == 1 else '...'}"
            for name in self.param_names
        )
        return f"{self.family.__name__}({params})"


def as_distribution(prior: Distribution | float | None) -> Distribution:
    """Check a ``prior`` argument and turn it into a distribution (default ``Normal(0, 1)``)."""
    if prior is None:
        return Normal(0.0, 1.0)
    if isinstance(prior, bool) or not isinstance(prior, Distribution | int | float | Prior):
        raise TypeError(
            f"`prior` must be a torch.distributions.Distribution or a positive number (the scale "
            f"of a zero-mean Normal), got {type(prior).__name__}"
        )
    if isinstance(prior, Prior):
        return prior.distribution()
    if isinstance(prior, int | float):
        if not 0 < prior < math.inf:
            raise ValueError(f"`prior` scale must be positive and finite, got {prior}")
        return Normal(0.0, float(prior))
    for name, constraint in prior.arg_constraints.items():
        if name not in vars(prior):
            continue
        value = torch.as_tensor(getattr(prior, name))
        if not torch.isfinite(value).all() or not constraint.check(value).all():
            raise ValueError(f"`prior` parameter `{name}` must satisfy {constraint}, got {value}")
    return prior


def normal_kl(mu: Tensor, sigma: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """Elementwise ``KL(N(mu, sigma^2) || N(loc, scale^2))`` in closed form, shapes broadcast.

    The same value as ``torch.distributions.kl_divergence`` without building distribution objects
    and validating their arguments at every training step.
    """
    ratio = sigma / scale
    return 0.5 * (ratio**2 + ((mu - loc) / scale) ** 2 - 1.0) - torch.log(ratio)


def mean_field_kl(
    mu: Tensor, sigma: Tensor, prior: Distribution, num_mc_samples: int = 1
) -> Tensor:
    """``KL(N(mu, sigma^2) || prior)`` summed over all elements.

    Closed form where ``torch.distributions.kl_divergence`` has one for the pair, otherwise the
    Monte Carlo estimate ``mean_s [log q(w_s) - log p(w_s)]`` with reparameterized ``w_s ~ q``,
    which is unbiased and differentiable (Blundell et al. 2015, "Weight Uncertainty in Neural
    Networks", eq. 2).

    Args:
        mu, sigma: posterior means and standard deviations, any shape.
        prior: distribution broadcastable to ``mu``.
        num_mc_samples: samples of the Monte Carlo estimate.

    Returns:
        Scalar KL.
    """
    posterior = Normal(mu, sigma, validate_args=False)
    try:
        return kl_divergence(posterior, prior).sum()
    except NotImplementedError:
        w = posterior.rsample((num_mc_samples,))
        return (posterior.log_prob(w) - prior.log_prob(w)).sum() / num_mc_samples
