"""Priors over weights and the KL divergence of a mean-field Gaussian posterior from them.

Any ``torch.distributions`` family works as a prior (:class:`Prior` keeps its parameters in
buffers): ``Normal`` and ``Laplace`` have a closed-form KL from a Gaussian posterior, others
(``StudentT``, ``Cauchy``, :class:`ScaleMixtureNormal`) use the Monte Carlo estimate of
:func:`mean_field_kl`. Prior parameters may be tensors that broadcast against the weights, e.g.
elementwise means and scales of the weight's own shape (:func:`uq_box.nn.posterior_as_prior`).
"""

from __future__ import annotations

import math
from numbers import Number

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal, constraints, kl_divergence
from torch.distributions.utils import broadcast_all


class ScaleMixtureNormal(Distribution):
    """Zero-mean scale mixture of two Gaussians, the prior of Blundell et al. 2015.

    ``p(w) = pi N(w | 0, sigma1^2) + (1 - pi) N(w | 0, sigma2^2)``: with ``sigma1 > sigma2`` and
    ``sigma2 << 1`` (the paper searches ``pi`` in {1/4, 1/2, 3/4}, ``-log sigma1`` in {0, 1, 2},
    ``-log sigma2`` in {6, 7, 8}; e.g. ``ScaleMixtureNormal(0.5, 1.0, 0.0025)``) it resembles a
    spike-and-slab prior: a sharp peak at zero pulls many weights to zero while the broad component
    lets the others grow. It has no closed-form KL from a Gaussian posterior, so
    :func:`mean_field_kl` estimates it by Monte Carlo (``num_kl_samples`` of the layer).

    Args:
        pi: weight of the first component, in ``[0, 1]``.
        sigma1: standard deviation of the first component, positive.
        sigma2: standard deviation of the second component, positive.
    """

    arg_constraints = {
        "pi": constraints.unit_interval,
        "sigma1": constraints.positive,
        "sigma2": constraints.positive,
    }
    support = constraints.real
    has_rsample = False

    def __init__(
        self,
        pi: Tensor | float,
        sigma1: Tensor | float,
        sigma2: Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        self.pi, self.sigma1, self.sigma2 = broadcast_all(pi, sigma1, sigma2)
        if all(isinstance(v, Number) for v in (pi, sigma1, sigma2)):
            batch_shape = torch.Size()
        else:
            batch_shape = self.pi.size()
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):  # noqa: ANN001, ANN201 -- torch's signature
        new = self._get_checked_instance(ScaleMixtureNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.pi = self.pi.expand(batch_shape)
        new.sigma1 = self.sigma1.expand(batch_shape)
        new.sigma2 = self.sigma2.expand(batch_shape)
        super(ScaleMixtureNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        return torch.zeros_like(self.pi)

    @property
    def mode(self) -> Tensor:
        return torch.zeros_like(self.pi)

    @property
    def variance(self) -> Tensor:
        return self.pi * self.sigma1**2 + (1.0 - self.pi) * self.sigma2**2

    def log_prob(self, value: Tensor) -> Tensor:
        """``log(pi N(value | 0, sigma1^2) + (1 - pi) N(value | 0, sigma2^2))``, stably."""
        if self._validate_args:
            self._validate_sample(value)
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value, dtype=self.pi.dtype, device=self.pi.device)
        half_log_2pi = 0.5 * math.log(2.0 * math.pi)

        def component(weight: Tensor, sigma: Tensor) -> Tensor:
            return torch.log(weight) - torch.log(sigma) - half_log_2pi - 0.5 * (value / sigma) ** 2

        return torch.logaddexp(component(self.pi, self.sigma1), component(1 - self.pi, self.sigma2))

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Pick a component with probability ``pi`` / ``1 - pi``, then draw from it."""
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            first = torch.rand(shape, dtype=self.pi.dtype, device=self.pi.device) < self.pi
            scale = torch.where(first, self.sigma1.expand(shape), self.sigma2.expand(shape))
            return scale * torch.randn(shape, dtype=self.pi.dtype, device=self.pi.device)

    def cdf(self, value: Tensor) -> Tensor:
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value, dtype=self.pi.dtype, device=self.pi.device)

        def phi(sigma: Tensor) -> Tensor:
            return 0.5 * (1 + torch.erf(value / (sigma * math.sqrt(2.0))))

        return self.pi * phi(self.sigma1) + (1 - self.pi) * phi(self.sigma2)


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

    def _load_from_state_dict(  # noqa: ANN001 -- torch's signature
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Take parameters of another shape from a checkpoint (a scalar prior loads the
        elementwise prior :func:`~uq_box.nn.posterior_as_prior` wrote, and back).
        """
        for name in self.param_names:
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                current = getattr(self, name)
                shape = state_dict[key].shape
                setattr(self, name, current.new_empty(shape))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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
        mu: posterior means, any shape.
        sigma: posterior standard deviations, the shape of ``mu``.
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
