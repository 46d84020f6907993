"""Weight pruning by signal-to-noise ratio (Blundell et al. 2015, "Weight Uncertainty in Neural
Networks", section 5.1).

The signal-to-noise ratio of a weight with posterior ``N(mu, sigma^2)`` is ``|mu| / sigma``. A
Bayes-by-Backprop network keeps most of its accuracy when the weights of lowest SNR are removed,
far more than when as many weights are removed at random or, often, by magnitude ``|mu|`` alone.
A pruned weight gets mean 0 and a standard deviation of ``softplus(PRUNED_RHO)`` (about 1e-13),
so it contributes nothing to the output. Pruning is not a mask: training on afterwards moves the
pruned weights again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from uq_box.checks import number_in
from uq_box.nn.layers import _BayesianLayer

__all__ = ["PRUNED_RHO", "prune_by_snr", "prune_random", "pruning_curve", "snr"]

PRUNED_RHO = -30.0
"""``rho`` of a pruned weight: ``sigma = softplus(-30) = 9.4e-14``."""


def _check_fraction(fraction: float) -> float:
    return number_in(fraction, "fraction", 0.0, 1.0, closed="low high")


def _prunable(module: nn.Module, include_bias: bool) -> dict[str, tuple[_BayesianLayer, str]]:
    """``{"layer.weight": (layer, "weight"), ...}`` for every Bayesian layer, in module order."""
    entries: dict[str, tuple[_BayesianLayer, str]] = {}
    seen: set[int] = set()
    for name, layer in module.named_modules():
        if not isinstance(layer, _BayesianLayer) or id(layer) in seen:
            continue
        seen.add(id(layer))
        prefix = f"{name}." if name else ""
        entries[f"{prefix}weight"] = (layer, "weight")
        if include_bias and layer.bias_mu is not None:
            entries[f"{prefix}bias"] = (layer, "bias")
    if not entries:
        raise ValueError(f"`module` ({type(module).__name__}) has no Bayesian layer to prune")
    return entries


def snr(module: nn.Module, include_bias: bool = True) -> dict[str, Tensor]:
    """Signal-to-noise ratio ``|mu| / sigma`` of every Bayesian weight (and bias).

    Args:
        module: a network (or LightningModule) holding Bayesian layers.
        include_bias: also give the biases' SNR.

    Returns:
        ``{"<layer name>.weight": tensor of the weight's shape, "<layer name>.bias": ...}``,
        detached. Blundell et al. plot it in decibels, ``10 log10(snr)``.
    """
    out = {}
    for key, (layer, kind) in _prunable(module, include_bias).items():
        mu = getattr(layer, f"{kind}_mu").detach()
        sigma = getattr(layer, f"{kind}_sigma").detach()
        out[key] = mu.abs() / sigma
    return out


def _prune(entries: dict[str, tuple[_BayesianLayer, str]], scores: Tensor, k: int) -> dict:
    """Prune the ``k`` entries with the lowest ``scores`` (flattened in ``entries`` order)."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        pruned[torch.argsort(scores.cpu(), stable=True)[:k]] = True
    masks, start = {}, 0
    with torch.no_grad():
        for key, (layer, kind) in entries.items():
            mu, rho = getattr(layer, f"{kind}_mu"), getattr(layer, f"{kind}_rho")
            drop = pruned[start : start + mu.numel()].reshape(mu.shape).to(mu.device)
            start += mu.numel()
            mu.masked_fill_(drop, 0.0)
            rho.masked_fill_(drop, PRUNED_RHO)
            masks[key] = ~drop
    return masks


def prune_by_snr(
    module: nn.Module, fraction: float, include_bias: bool = True
) -> dict[str, Tensor]:
    """Prune the ``fraction`` of Bayesian weights with the lowest SNR, globally, in place.

    The threshold is global across all Bayesian layers (as Blundell et al.): ``round(fraction *
    total)`` weights with the lowest ``|mu| / sigma`` get ``mu = 0`` and ``rho = PRUNED_RHO``.

    Args:
        module: a network (or LightningModule) holding Bayesian layers.
        fraction: share of the weights to prune, in ``[0, 1]``.
        include_bias: count the biases among the weights that may be pruned.

    Returns:
        Boolean masks, ``True`` where a weight was kept, keyed as :func:`snr`.
    """
    fraction = _check_fraction(fraction)
    entries = _prunable(module, include_bias)
    scores = torch.cat([s.flatten().cpu() for s in snr(module, include_bias).values()])
    return _prune(entries, scores, round(fraction * scores.numel()))


def prune_random(
    module: nn.Module,
    fraction: float,
    generator: torch.Generator | None = None,
    include_bias: bool = True,
) -> dict[str, Tensor]:
    """Prune a random ``fraction`` of the Bayesian weights in place: the control for
    :func:`prune_by_snr` (same count, same treatment of a pruned weight).

    Args:
        module: a network (or LightningModule) holding Bayesian layers.
        fraction: share of the weights to prune, in ``[0, 1]``.
        generator: CPU source of the random choice (default: the global one).
        include_bias: count the biases among the weights that may be pruned.

    Returns:
        Boolean masks, ``True`` where a weight was kept, keyed as :func:`snr`.
    """
    fraction = _check_fraction(fraction)
    entries = _prunable(module, include_bias)
    total = sum(getattr(layer, f"{kind}_mu").numel() for layer, kind in entries.values())
    scores = torch.rand(total, generator=generator)
    return _prune(entries, scores, round(fraction * total))


def pruning_curve(
    module: nn.Module,
    fractions: Sequence[float],
    evaluate: Callable[[nn.Module], float],
    method: str = "snr",
    generator: torch.Generator | None = None,
    include_bias: bool = True,
) -> list[float]:
    """A metric as a function of the fraction pruned; ``module`` itself is left unchanged.

    Args:
        module: the trained network.
        fractions: shares of the weights to prune, each applied to a fresh copy of ``module``.
        evaluate: ``evaluate(pruned_copy) -> float``, e.g. test accuracy.
        method: ``"snr"`` (:func:`prune_by_snr`) or ``"random"`` (:func:`prune_random`).
        generator: source of the random choice for ``"random"``.
        include_bias: count the biases among the weights that may be pruned.

    Returns:
        ``[evaluate(pruned at fraction) for fraction in fractions]``.
    """
    if method not in ("snr", "random"):
        raise ValueError(f"`method` must be 'snr' or 'random', got {method!r}")
    _prunable(module, include_bias)  # fail before copying
    values = []
    for fraction in fractions:
        pruned = copy.deepcopy(module)
        if method == "snr":
            prune_by_snr(pruned, fraction, include_bias)
        else:
            prune_random(pruned, fraction, generator, include_bias)
        values.append(float(evaluate(pruned)))
    return values
