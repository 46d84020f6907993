"""KL divergence of a whole model's Bayesian layers from their priors."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def kl_divergence(module: nn.Module) -> Tensor:
    """Sum of ``KL(q || p)`` over every Bayesian layer in ``module`` (itself included).

    Returns a scalar tensor; zero, on the module's device, for a module without Bayesian layers.
    """
    from uq_box.nn.layers import _BayesianLayer

    terms = [m.layer_kl() for m in module.modules() if isinstance(m, _BayesianLayer)]
    if terms:
        return torch.stack(terms).sum()
    reference = next(module.parameters(), None)
    if reference is None:
        return torch.zeros(())
    return torch.zeros((), device=reference.device, dtype=reference.dtype)


kl = kl_divergence
