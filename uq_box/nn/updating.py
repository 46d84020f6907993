"""Bayesian updating: the posterior of one fit becomes the prior of the next.

After a fit on data ``D``, :func:`posterior_as_prior` sets every Bayesian layer's prior to its
current mean-field posterior ``N(mu, sigma^2)``, elementwise (the parameters stored as buffers of
the weight's shape in :class:`~uq_box.nn.Prior`). A further fit on new data ``D'`` alone then
targets ``p(w | D, D') ~ p(D' | w) q(w | D)``, the recursive form of Bayes' rule (the Pyro BNN
tutorial's "Bayesian updating" exercise). It is exact where the mean-field family contains the
posterior (e.g. Bayesian linear regression with an orthogonal design) and an approximation
otherwise. The posterior is left where it is, so the next fit starts from the old posterior.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Normal

from uq_box.nn.layers import _BayesianLayer
from uq_box.nn.priors import Prior

__all__ = ["posterior_as_prior"]


def posterior_as_prior(module: nn.Module, min_scale: float = 1e-12) -> nn.Module:
    """Replace the prior of every Bayesian layer in ``module`` by its current posterior, in place.

    Weights get ``Normal(weight_mu, weight_sigma)`` as their prior, biases
    ``Normal(bias_mu, bias_sigma)`` (the layer's ``bias_prior``); both are detached copies, so
    training on afterwards moves the posterior and leaves the new prior fixed.

    Args:
        module: a network (or a LightningModule) holding Bayesian layers.
        min_scale: lower bound of the prior scales (a pruned weight's ``sigma`` can be 0).

    Returns:
        ``module``.

    Raises:
        ValueError: ``module`` holds no Bayesian layer, or ``min_scale`` is not positive.
    """
    if not min_scale > 0:
        raise ValueError(f"`min_scale` must be positive, got {min_scale}")
    layers = [m for m in module.modules() if isinstance(m, _BayesianLayer)]
    if not layers:
        raise ValueError(
            f"`module` ({type(module).__name__}) has no Bayesian layer whose posterior could "
            f"become the prior"
        )
    with torch.no_grad():
        for layer in layers:
            layer.prior = _normal_prior(layer.weight_mu, layer.weight_sigma, min_scale)
            if layer.bias_mu is not None:
                layer.bias_prior = _normal_prior(layer.bias_mu, layer.bias_sigma, min_scale)
    return module


def _normal_prior(mu: torch.Tensor, sigma: torch.Tensor, min_scale: float) -> Prior:
    loc = mu.detach().clone()
    scale = sigma.detach().clamp_min(min_scale).clone()
    prior = Prior(Normal(loc, scale, validate_args=False))
    # Prior stores the buffers as given: keep the layer's dtype and device
    return prior.to(device=mu.device, dtype=mu.dtype)
