"""Quantiles of a predictive distribution: a Gaussian mixture, or samples (pure torch functions).

Every regression method's predictive is a mixture of ``S`` Gaussians ``N(mu_s, sigma_s^2)`` with
equal weights (one Gaussian for a single network, the members of an ensemble, the Monte Carlo
samples of a Bayesian network; see ``docs/architecture.md``), or only samples ``mu_s`` when no
spread is known. :func:`mixture_quantiles` inverts the mixture's CDF, :func:`sample_quantiles`
takes empirical quantiles; both give ``[N, T, Q]`` (level last), the layout of the prediction
contract's ``quantiles``. :func:`mixture_cdf` is the forward map, the PIT value of a target.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "bisect_quantiles",
    "check_levels",
    "gaussian_quantiles",
    "mixture_cdf",
    "mixture_quantiles",
    "sample_quantiles",
]

#: bisection steps of :func:`mixture_quantiles`: the bracket shrinks by 2^-60, below float64's
#: resolution of the initial bracket.
BISECTION_STEPS = 60


def check_levels(levels: Sequence[float] | Tensor, name: str = "quantile_levels") -> tuple:
    """Check that ``levels`` is a non-empty sequence of numbers in ``(0, 1)``; return a tuple.

    The message names the argument ``name``, the offending level and the range: a level of 0 or
    1 is an infinite quantile of a Gaussian, and outside ``[0, 1]`` no quantile exists.
    """
    if isinstance(levels, Tensor):
        if levels.ndim > 1:
            raise ValueError(
                f"`{name}` must be one level or a 1-D sequence, got shape {list(levels.shape)}"
            )
        levels = levels.reshape(-1).tolist()
    elif isinstance(levels, numbers.Real) and not isinstance(levels, bool):
        levels = [levels]
    if isinstance(levels, str | bytes) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(
            f"`{name}` must be a non-empty sequence of levels in (0, 1), got {levels!r}"
        )
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, numbers.Real):
            raise ValueError(f"`{name}` must hold numbers in (0, 1), got {level!r} in {levels!r}")
        if not 0.0 < float(level) < 1.0:
            raise ValueError(
                f"`{name}` must hold levels strictly inside (0, 1), got {level!r} in "
                f"{list(levels)!r}: the 0 and 1 quantiles are infinite"
            )
    return tuple(float(level) for level in levels)


def _level_tensor(levels: Sequence[float] | Tensor, like: Tensor, name: str) -> Tensor:
    return torch.tensor(check_levels(levels, name), dtype=like.dtype, device=like.device)


def gaussian_quantiles(
    mean: Tensor, std: Tensor, levels: Sequence[float] | Tensor, name: str = "quantile_levels"
) -> Tensor:
    """Quantiles ``mean + std Phi^{-1}(tau)`` of ``N(mean, std^2)``, ``[*mean.shape, Q]``."""
    z = torch.special.ndtri(_level_tensor(levels, mean, name).double()).to(mean.dtype)
    return mean.unsqueeze(-1) + std.unsqueeze(-1) * z


def mixture_cdf(means: Tensor, stds: Tensor, value: Tensor) -> Tensor:
    """CDF ``mean_s Phi((value - mu_s) / sigma_s)`` of an equal-weight Gaussian mixture.

    Args:
        means: ``[S, *shape]``.
        stds: ``[S, *shape]`` (positive), or broadcastable to it.
        value: ``[*shape]`` (or broadcastable).

    Returns:
        ``[*shape]`` in ``[0, 1]``.
    """
    return torch.special.ndtr((value - means) / stds).mean(0)


def mixture_quantiles(
    means: Tensor,
    stds: Tensor | None,
    levels: Sequence[float] | Tensor,
    name: str = "quantile_levels",
) -> Tensor:
    """Quantiles of the equal-weight Gaussian mixture ``(1/S) sum_s N(mu_s, sigma_s^2)``.

    The mixture's quantile at ``tau`` lies between the smallest and the largest of the
    components' ``tau``-quantiles; :data:`BISECTION_STEPS` vectorized bisection steps on
    :func:`mixture_cdf` (in float64, every point, target and level at once, no data-dependent
    control flow, so it runs under ``torch.func.vmap``) close that bracket. For ``S = 1`` the
    bracket is a point: the Gaussian quantile, exactly. With ``stds=None`` (no spread known)
    the result is :func:`sample_quantiles` of ``means``.

    Args:
        means: ``[S, N, T]`` (any ``[S, *shape]``).
        stds: ``[S, N, T]`` (positive; broadcastable to ``means``), or ``None``.
        levels: ``Q`` levels in ``(0, 1)``.
        name: the argument named in errors.

    Returns:
        ``[N, T, Q]`` (``[*shape, Q]``) in the dtype of ``means``, non-decreasing in the level
        for increasing levels.
    """
    if stds is None:
        return sample_quantiles(means, levels, name)
    tau = _level_tensor(levels, means, name).double()
    mu = means.double().unsqueeze(-1)  # [S, *shape, 1]
    sigma = stds.double().expand_as(means).unsqueeze(-1)
    component = mu + sigma * torch.special.ndtri(tau)  # [S, *shape, Q]
    low, high = component.amin(0), component.amax(0)
    if means.shape[0] == 1:
        return low.to(means.dtype)
    return bisect_quantiles(lambda value: mixture_cdf(mu, sigma, value), low, high, tau).to(
        means.dtype
    )


def bisect_quantiles(
    cdf: Callable[[Tensor], Tensor],
    low: Tensor,
    high: Tensor,
    levels: Tensor,
    steps: int = BISECTION_STEPS,
) -> Tensor:
    """Invert a non-decreasing ``cdf`` by bisection, every value at once.

    Args:
        cdf: maps values ``[*shape, Q]`` to probabilities of the same shape.
        low: a lower bracket ``[*shape, Q]``, ``cdf(low) <= levels``.
        high: an upper bracket, ``cdf(high) >= levels``.
        levels: ``[Q]`` (broadcast against the last dimension).
        steps: a fixed number of halvings (no data-dependent control flow: runs under vmap).

    Returns:
        The midpoint of the final bracket, ``[*shape, Q]``.
    """
    for _ in range(steps):
        middle = 0.5 * (low + high)
        below = cdf(middle) < levels
        low = torch.where(below, middle, low)
        high = torch.where(below, high, middle)
    return 0.5 * (low + high)


def sample_quantiles(
    samples: Tensor, levels: Sequence[float] | Tensor, name: str = "quantile_levels"
) -> Tensor:
    """Empirical quantiles of samples ``[S, *shape]`` (linear interpolation), ``[*shape, Q]``.

    ``torch.quantile``'s default (numpy's ``"linear"``, type 7 of Hyndman & Fan 1996); one
    sample gives itself at every level.
    """
    tau = _level_tensor(levels, samples, name)
    quantiles = torch.quantile(samples, tau, dim=0)  # [Q, *shape]
    return quantiles.movedim(0, -1)
