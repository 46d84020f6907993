"""Functional metrics for Gaussian predictive distributions in regression.

Every function takes the predictive ``mean``, the predictive standard deviation ``std`` and the
``target``, each of shape ``[N]`` or ``[N, T]`` (the same for all three; ``[N]`` and ``[N, 1]`` mix),
and flattens them internally: with ``T`` targets a score is the mean over all ``N T`` values.

The calibration metrics reproduce uncertainty-toolbox 0.1.1
(``uncertainty_toolbox.metrics_calibration``, Chung et al. 2021, arXiv:2109.10254) with its
defaults: centred-interval proportions (``prop_type="interval"``) at expected proportions
``linspace(0, 1, num_bins)``. They are written in torch rather than wrapping the toolbox so they run
on any device inside a training loop; observed proportions come from a sort and two
``searchsorted`` calls (``O(N log N)`` time, ``O(N)`` memory) instead of an ``[N, num_bins]``
comparison matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uq_box.checks import int_at_least, number_in

__all__ = [
    "calibration_curve",
    "gaussian_crps",
    "gaussian_nll",
    "interval_coverage",
    "mean_absolute_calibration_error",
    "miscalibration_area",
    "root_mean_squared_calibration_error",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _flatten_inputs(mean: Tensor, std: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Check that ``mean``, ``std`` and ``target`` are ``[N]`` or ``[N, T]``; return them flat."""
    flat, shapes = [], []
    for name, value in (("mean", mean), ("std", std), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim not in (1, 2):
            raise ValueError(f"`{name}` must have shape [N] or [N, T], got {list(value.shape)}")
        flat.append(value.reshape(-1))
        shapes.append(list(value.shape) if value.ndim == 2 else [value.numel(), 1])
    if any(shape != shapes[0] for shape in shapes):
        sizes = [list(v.shape) for v in (mean, std, target)]
        raise ValueError(f"`mean`, `std` and `target` must have the same shape, got {sizes}")
    if flat[0].numel() == 0:
        raise ValueError("`mean`, `std` and `target` are empty")
    if not bool((flat[1] > 0).all()):
        raise ValueError("`std` must be strictly positive everywhere")
    return flat[0], flat[1], flat[2]


def _gaussian_nll_terms(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Per-point Gaussian negative log-likelihood of flat inputs."""
    z = (target - mean) / std
    return _HALF_LOG_2PI + torch.log(std) + 0.5 * z.square()


def _gaussian_crps_terms(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Per-point closed-form CRPS of ``N(mean, std^2)`` (Gneiting & Raftery 2007, eq. 21)."""
    z = (target - mean) / std
    pdf = torch.exp(-0.5 * z.square()) / math.sqrt(2.0 * math.pi)
    cdf = torch.special.ndtr(z)
    return std * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - 1.0 / math.sqrt(math.pi))


def _interval_hits(mean: Tensor, std: Tensor, target: Tensor, level: float) -> Tensor:
    """Boolean ``[N]``: whether each target lies in the central ``level`` Gaussian interval."""
    number_in(level, "level", 0.0, 1.0)
    half_width = torch.special.ndtri(torch.tensor(0.5 + level / 2.0, dtype=torch.float64))
    z = ((mean - target) / std).to(torch.float64)
    return z.abs() <= half_width.to(z.device)


def gaussian_nll(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Mean negative log-likelihood of the targets under ``N(mean, std^2)``.

    Includes the constant ``0.5 * log(2 * pi)``, so it equals
    ``uncertainty_toolbox.nll_gaussian``.

    Args:
        mean: predictive means, ``[N]`` or ``[N, T]``.
        std: predictive standard deviations (positive), same shape as ``mean``.
        target: observed targets, same shape as ``mean``.

    Returns:
        Scalar tensor.
    """
    mean, std, target = _flatten_inputs(mean, std, target)
    return _gaussian_nll_terms(mean, std, target).mean()


def gaussian_crps(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Mean continuous ranked probability score of ``N(mean, std^2)`` (lower is better).

    Closed form of Gneiting & Raftery (2007), "Strictly proper scoring rules, prediction, and
    estimation", JASA 102(477), eq. 21:
    ``std * (z * (2 * Phi(z) - 1) + 2 * phi(z) - 1 / sqrt(pi))`` with ``z = (target - mean) / std``.

    Args:
        mean: predictive means, ``[N]`` or ``[N, T]``.
        std: predictive standard deviations (positive), same shape as ``mean``.
        target: observed targets, same shape as ``mean``.

    Returns:
        Scalar tensor.
    """
    mean, std, target = _flatten_inputs(mean, std, target)
    return _gaussian_crps_terms(mean, std, target).mean()


def interval_coverage(mean: Tensor, std: Tensor, target: Tensor, level: float = 0.95) -> Tensor:
    """Fraction of targets inside the central ``level`` interval of ``N(mean, std^2)``.

    The interval is ``mean ± Phi^{-1}(0.5 + level / 2) * std`` (bounds included).

    Args:
        mean: predictive means, ``[N]`` or ``[N, T]``.
        std: predictive standard deviations (positive), same shape as ``mean``.
        target: observed targets, same shape as ``mean``.
        level: nominal coverage of the interval, in ``(0, 1)``.

    Returns:
        Scalar tensor in ``[0, 1]`` with the dtype of ``mean``.
    """
    mean, std, target = _flatten_inputs(mean, std, target)
    return _interval_hits(mean, std, target, level).to(mean.dtype).mean()


def calibration_curve(
    mean: Tensor, std: Tensor, target: Tensor, num_bins: int = 100
) -> tuple[Tensor, Tensor]:
    """Return expected and observed proportions of targets inside central Gaussian intervals.

    Same values as uncertainty-toolbox's ``get_proportion_lists_vectorized`` and
    ``get_proportion_lists`` with ``prop_type="interval"``: for each expected proportion ``p`` in
    ``linspace(0, 1, num_bins)``, the observed proportion is the fraction of normalised residuals
    ``(mean - target) / std`` in ``[Phi^{-1}(0.5 - p / 2), Phi^{-1}(0.5 + p / 2)]``.

    Args:
        mean: predictive means, ``[N]`` or ``[N, T]``.
        std: predictive standard deviations (positive), same shape as ``mean``.
        target: observed targets, same shape as ``mean``.
        num_bins: number of expected proportions, at least 2.

    Returns:
        ``(expected, observed)``, each ``[num_bins]`` with the dtype of ``mean``.
    """
    mean, std, target = _flatten_inputs(mean, std, target)
    expected, observed = _proportions(mean, std, target, num_bins)
    return expected.to(mean.dtype), observed.to(mean.dtype)


def _proportions(mean: Tensor, std: Tensor, target: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Float64 expected and observed interval proportions of flat, checked inputs."""
    int_at_least(num_bins, "num_bins", 2)
    expected = torch.linspace(0.0, 1.0, num_bins, dtype=torch.float64, device=mean.device)
    lower = torch.special.ndtri(0.5 - expected / 2.0)
    upper = torch.special.ndtri(0.5 + expected / 2.0)
    # Divide in the input dtype, then compare in float64, as numpy does in uncertainty-toolbox.
    z = ((mean - target) / std).to(torch.float64).sort().values
    inside = torch.searchsorted(z, upper, right=True) - torch.searchsorted(z, lower, right=False)
    return expected, inside.to(torch.float64) / z.numel()


def _area_from_proportions(expected: Tensor, observed: Tensor) -> Tensor:
    """Exact integral of ``|observed - expected|`` for piecewise-linear curves on a shared grid.

    Each segment is a trapezoid when the curve stays on one side of the diagonal, and two triangles
    meeting at the crossing point otherwise, as ``uncertainty_toolbox.utils.trapezoid_area``.
    """
    gap = observed - expected
    left, right = gap[:-1], gap[1:]
    width = expected[1:] - expected[:-1]
    trapezoid = 0.5 * width * (left + right).abs()
    abs_sum = left.abs() + right.abs()
    # Crossing at x = x_l + width * |left| / (|left| + |right|): two triangles.
    hourglass = 0.5 * width * (left.square() + right.square()) / abs_sum.clamp_min(1e-300)
    return torch.where(left * right < 0, hourglass, trapezoid).sum()


def miscalibration_area(mean: Tensor, std: Tensor, target: Tensor, num_bins: int = 100) -> Tensor:
    """Area between the interval calibration curve and the diagonal.

    Matches ``uncertainty_toolbox.miscalibration_area`` (default ``prop_type="interval"``): the
    exact area between the piecewise-linear curve of :func:`calibration_curve` and ``y = x``,
    splitting segments that cross the diagonal at the crossing point.

    Args:
        mean: predictive means, ``[N]`` or ``[N, T]``.
        std: predictive standard deviations (positive), same shape as ``mean``.
        target: observed targets, same shape as ``mean``.
        num_bins: number of expected proportions, at least 2.

    Returns:
        Scalar tensor in ``[0, 0.5]`` with the dtype of ``mean``.
    """
    mean, std, target = _flatten_inputs(mean, std, target)
    expected, observed = _proportions(mean, std, target, num_bins)
    return _area_from_proportions(expected, observed).to(mean.dtype)


def mean_absolute_calibration_error(
    mean: Tensor, std: Tensor, target: Tensor, num_bins: int = 100
) -> Tensor:
    """Mean of ``|observed - expected|`` over the interval calibration curve (MACE).

    Matches ``uncertainty_toolbox.mean_absolute_calibration_error`` with its defaults.

    Args:
        mean: predictive means, ``[N]`` or ``[N, T]``.
        std: predictive standard deviations (positive), same shape as ``mean``.
        target: observed targets, same shape as ``mean``.
        num_bins: number of expected proportions, at least 2.

    Returns:
        Scalar tensor with the dtype of ``mean``.
    """
    mean, std, target = _flatten_inputs(mean, std, target)
    expected, observed = _proportions(mean, std, target, num_bins)
    return (observed - expected).abs().mean().to(mean.dtype)


def root_mean_squared_calibration_error(
    mean: Tensor, std: Tensor, target: Tensor, num_bins: int = 100
) -> Tensor:
    """Root mean of ``(observed - expected)^2`` over the interval calibration curve (RMSCE).

    Matches ``uncertainty_toolbox.root_mean_squared_calibration_error`` with its defaults.

    Args:
        mean: predictive means, ``[N]`` or ``[N, T]``.
        std: predictive standard deviations (positive), same shape as ``mean``.
        target: observed targets, same shape as ``mean``.
        num_bins: number of expected proportions, at least 2.

    Returns:
        Scalar tensor with the dtype of ``mean``.
    """
    mean, std, target = _flatten_inputs(mean, std, target)
    expected, observed = _proportions(mean, std, target, num_bins)
    return (observed - expected).square().mean().sqrt().to(mean.dtype)
