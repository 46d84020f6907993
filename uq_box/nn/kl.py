"""KL divergence of a whole model's Bayesian layers from their priors."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def kl_divergence(module: nn.Module) -> Tensor:
    """Sum of ``KL(q || p)`` over every Bayesian layer in ``module`` (itself included).

    Returns a scalar tensor; zero, on the module's device, for a module without Bayesian layers.
    """
    from uq_box.nn.layers import _BayesianLayer

    terms = [m.layer_kl() for m in _walk(module) if isinstance(m, _BayesianLayer)]
    if len(terms) == 1:
        return terms[0]
    if terms:
        return torch.stack(terms).sum()
    reference = next(module.parameters(), None)
    if reference is None:
        return torch.zeros(())
    return torch.zeros((), device=reference.device, dtype=reference.dtype)


def _walk(module: nn.Module) -> list[nn.Module]:
    """``module`` and its submodules, each once: ``modules()`` without the name strings (the KL
    is taken at every training step).
    """
    seen, order, stack = set(), [], [module]
    while stack:
        m = stack.pop()
        if id(m) not in seen:
            seen.add(id(m))
            order.append(m)
            stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return order


kl = kl_divergence
