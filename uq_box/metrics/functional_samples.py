"""Scores that need no Gaussian: samples, quantiles and intervals (pure torch functions).

The Gaussian metrics of :mod:`uq_box.metrics.functional` read a predictive distribution as
``N(pred, pred_uct^2)``. The scores here take what any method can give instead:

- **samples** ``[S, N]`` or ``[S, N, T]`` of the predictive distribution (the contract's
  ``samples``, draws of a mixture, ensemble members): :func:`sample_crps` (the CRPS in its energy
  form, unbiased) and :func:`energy_score` (its multivariate generalization);
- **quantiles** ``[N, Q]`` or ``[N, T, Q]`` at levels ``[Q]`` (the contract's ``quantiles``):
  :func:`quantile_pinball` (the pinball or check loss over a grid of levels) and
  :func:`quantile_calibration` (the observed fraction of targets below each quantile);
- **intervals** ``lower``, ``upper`` ``[N]`` or ``[N, T]``: :func:`interval_width` (MPIW),
  :func:`interval_score` (the Winkler score) and :func:`quantile_coverage` (PICP).

Every function is vectorized (no Python loop over samples or points) and returns the mean over
all ``N T`` values (``reduction="mean"``) or the per-point scores ``[N]`` / ``[N, T]``
(``reduction="none"``). Scores are negatively oriented (lower is better) but the coverages.

:mod:`uq_box.metrics.functional_quantiles` turns a Gaussian mixture or samples into quantiles.

Written in torch rather than taken from a library (properscoring, scoringrules): they run on any
device inside the test loop, batch over ``T`` targets, and the sorted-sample CRPS is ``O(S log
S)`` per point. The tests check them against closed forms and uncertainty-toolbox.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uq_box.checks import int_at_least, number_in, positive_finite
from uq_box.metrics.functional import _area_from_proportions
from uq_box.metrics.functional_quantiles import check_levels

__all__ = [
    "energy_score",
    "interval_score",
    "interval_width",
    "pit_calibration_curve",
    "pit_miscalibration_area",
    "quantile_calibration",
    "quantile_coverage",
    "quantile_pinball",
    "sample_crps",
]

REDUCTIONS = ("mean", "none")


def _tensor(value: Tensor, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor, got {value.dtype}")
    if value.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {list(value.shape)})")
    return value


def _reduce(scores: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return scores.mean()
    if reduction == "none":
        return scores
    raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")


def _check_samples(samples: Tensor, target: Tensor, min_samples: int) -> None:
    _tensor(samples, "samples")
    _tensor(target, "target")
    if target.ndim not in (1, 2) or samples.shape[1:] != target.shape:
        raise ValueError(
            f"`samples` must have shape [S, *target.shape] for `target` [N] or [N, T], got "
            f"samples {list(samples.shape)} and target {list(target.shape)}"
        )
    if samples.shape[0] < min_samples:
        raise ValueError(
            f"`samples` must hold at least {min_samples} samples (dimension 0) for the unbiased "
            f"estimate, got {samples.shape[0]}; pass `unbiased=False` for one sample"
        )


def _check_bounds(lower: Tensor, upper: Tensor, target: Tensor | None = None) -> None:
    named = {"lower": lower, "upper": upper}
    if target is not None:
        named["target"] = target
    for name, value in named.items():
        _tensor(value, name)
    shapes = {name: list(value.shape) for name, value in named.items()}
    if len({tuple(s) for s in shapes.values()}) != 1 or lower.ndim not in (1, 2):
        raise ValueError(
            f"{', '.join(f'`{n}`' for n in named)} must share one shape [N] or [N, T], got {shapes}"
        )


def sample_crps(
    samples: Tensor, target: Tensor, unbiased: bool = True, reduction: str = "mean"
) -> Tensor:
    """CRPS of the predictive distribution given by samples, in its energy form.

    ``CRPS(F, y) = E|X - y| - 1/2 E|X - X'|`` for ``X, X'`` independent draws of ``F``
    (Gneiting & Raftery 2007, eq. 20). Estimated from ``S`` samples, the first term is their mean
    and the second the mean over pairs: with ``unbiased=True`` over the ``S (S - 1)`` ordered pairs
    ``i != j`` (the "fair" CRPS of Ferro 2014, an unbiased estimate of the CRPS of the
    distribution the samples come from; needs ``S >= 2``), with ``unbiased=False`` over all
    ``S^2`` pairs (the CRPS of the samples' empirical distribution). The pair sum comes from the
    sorted samples, ``sum_{i,j} |x_i - x_j| = 2 sum_k (2k - S - 1) x_(k)``: ``O(S log S)`` time
    and ``O(S)`` memory per point, not ``O(S^2)``.

    Args:
        samples: ``[S, N]`` or ``[S, N, T]``.
        target: ``[N]`` or ``[N, T]``.
        unbiased: divide the pair sum by ``S (S - 1)`` (else ``S^2``).
        reduction: ``"mean"`` (a scalar) or ``"none"`` (``target``'s shape).

    Returns:
        The mean CRPS, or the CRPS of each point; in the units of the target, lower is better.
    """
    _check_samples(samples, target, 2 if unbiased else 1)
    num = samples.shape[0]
    spread = (samples - target).abs().mean(0)
    ordered = samples.sort(dim=0).values
    rank = torch.arange(1, num + 1, dtype=samples.dtype, device=samples.device)
    weights = (2.0 * rank - num - 1.0).reshape(-1, *([1] * target.ndim))
    pair_sum = 2.0 * (weights * ordered).sum(0)  # sum over all ordered pairs of |x_i - x_j|
    pairs = num * (num - 1) if unbiased else num * num
    return _reduce(spread - 0.5 * pair_sum / pairs, reduction)


def energy_score(
    samples: Tensor,
    target: Tensor,
    beta: float = 1.0,
    unbiased: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Energy score of samples of a multivariate predictive distribution (lower is better).

    ``ES(F, y) = E||X - y||^beta - 1/2 E||X - X'||^beta`` with the Euclidean norm over the ``T``
    targets (Gneiting & Raftery 2007, eq. 22), strictly proper for ``beta`` in ``(0, 2)``. For one
    target and ``beta = 1`` it is the CRPS (:func:`sample_crps`). The pair term averages over the
    ``S (S - 1)`` pairs ``i != j`` (``unbiased=True``, needs ``S >= 2``) or all ``S^2`` pairs; it
    is one batched distance matrix ``[N, S, S]`` (``torch.cdist``).

    Args:
        samples: ``[S, N, T]`` (or ``[S, N]`` for one target).
        target: ``[N, T]`` (or ``[N]``).
        beta: the exponent, in ``(0, 2]``.
        unbiased: divide the pair sum by ``S (S - 1)`` (else ``S^2``).
        reduction: ``"mean"`` (a scalar) or ``"none"`` (one score per point, ``[N]``).

    Returns:
        The mean energy score over points, or the score of each point.
    """
    beta = number_in(beta, "beta", 0.0, 2.0, closed="high")
    _check_samples(samples, target, 2 if unbiased else 1)
    if target.ndim == 1:
        samples, target = samples.unsqueeze(-1), target.unsqueeze(-1)
    num = samples.shape[0]
    points = samples.transpose(0, 1)  # [N, S, T]
    spread = (points - target.unsqueeze(1)).norm(dim=-1).pow(beta).mean(-1)  # [N]
    distances = torch.cdist(points, points)  # [N, S, S], zero diagonal
    pairs = num * (num - 1) if unbiased else num * num
    pair_term = distances.pow(beta).sum((-1, -2)) / pairs
    return _reduce(spread - 0.5 * pair_term, reduction)


def _levels(levels: Tensor | list[float] | tuple[float, ...], like: Tensor) -> Tensor:
    return torch.as_tensor(check_levels(levels, "levels"), dtype=like.dtype, device=like.device)


def _check_quantiles(quantiles: Tensor, target: Tensor, levels: Tensor) -> None:
    _tensor(quantiles, "quantiles")
    _tensor(target, "target")
    if target.ndim not in (1, 2) or quantiles.shape != (*target.shape, levels.numel()):
        raise ValueError(
            f"`quantiles` must have shape [*target.shape, Q] = {[*target.shape, levels.numel()]} "
            f"for `target` {list(target.shape)} and {levels.numel()} `levels`, got "
            f"{list(quantiles.shape)}"
        )


def quantile_pinball(
    quantiles: Tensor,
    target: Tensor,
    levels: Tensor | list[float] | tuple[float, ...],
    reduction: str = "mean",
) -> Tensor:
    """Pinball (check) loss of predicted quantiles, averaged over the grid of levels.

    ``rho_tau(y - q_tau) = max(tau (y - q_tau), (tau - 1) (y - q_tau))`` (Koenker & Bassett
    1978), minimal in expectation at the true ``tau``-quantile; averaged over the ``Q`` levels it
    approximates the CRPS / 2 on a fine uniform grid. With the Gaussian quantiles at
    ``linspace(0.01, 0.99, 99)`` it is uncertainty-toolbox's ``check_score``.

    Args:
        quantiles: ``[N, Q]`` or ``[N, T, Q]``, level last.
        target: ``[N]`` or ``[N, T]``.
        levels: the ``Q`` levels, each in ``(0, 1)``.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (``target``'s shape, mean over levels).

    Returns:
        The mean pinball loss (lower is better).
    """
    levels = _levels(levels, quantiles)
    _check_quantiles(quantiles, target, levels)
    residual = target.unsqueeze(-1) - quantiles
    loss = torch.maximum(levels * residual, (levels - 1.0) * residual)
    return _reduce(loss.mean(-1), reduction)


def quantile_calibration(
    quantiles: Tensor, target: Tensor, levels: Tensor | list[float] | tuple[float, ...]
) -> Tensor:
    """Observed fraction of targets at or below each predicted quantile, ``[Q]``.

    Calibrated quantiles give ``levels`` (the quantile calibration curve; its distance from the
    levels is the calibration error of the quantiles).

    Args:
        quantiles: ``[N, Q]`` or ``[N, T, Q]``, level last.
        target: ``[N]`` or ``[N, T]``.
        levels: the ``Q`` levels, each in ``(0, 1)``.
    """
    levels = _levels(levels, quantiles)
    _check_quantiles(quantiles, target, levels)
    below = target.unsqueeze(-1) <= quantiles
    return below.to(quantiles.dtype).reshape(-1, levels.numel()).mean(0)


def quantile_coverage(
    lower: Tensor, upper: Tensor, target: Tensor, reduction: str = "mean"
) -> Tensor:
    """Fraction of targets inside ``[lower, upper]`` (PICP; bounds included).

    With ``lower``, ``upper`` the predicted ``alpha / 2`` and ``1 - alpha / 2`` quantiles, the
    nominal value is ``1 - alpha``.

    Args:
        lower: ``[N]`` or ``[N, T]``.
        upper: the same shape.
        target: the same shape.
        reduction: ``"mean"`` (a fraction) or ``"none"`` (1.0 inside, 0.0 outside, per point).
    """
    _check_bounds(lower, upper, target)
    inside = (target >= lower) & (target <= upper)
    return _reduce(inside.to(lower.dtype), reduction)


def interval_width(lower: Tensor, upper: Tensor, reduction: str = "mean") -> Tensor:
    """Width ``upper - lower`` of prediction intervals: the mean is the MPIW (sharpness).

    Args:
        lower: ``[N]`` or ``[N, T]``.
        upper: the same shape.
        reduction: ``"mean"`` (a scalar) or ``"none"``.
    """
    _check_bounds(lower, upper)
    return _reduce(upper - lower, reduction)


def interval_score(
    lower: Tensor, upper: Tensor, target: Tensor, alpha: float, reduction: str = "mean"
) -> Tensor:
    """Interval (Winkler) score of central ``1 - alpha`` prediction intervals (lower is better).

    ``(u - l) + 2 / alpha (l - y) 1{y < l} + 2 / alpha (y - u) 1{y > u}`` (Winkler 1972;
    Gneiting & Raftery 2007, eq. 43): the width plus a penalty for each miss, proper for the
    ``alpha / 2`` and ``1 - alpha / 2`` quantiles. Averaged over the Gaussian intervals at
    ``alpha = 1 - p`` for ``p`` in ``linspace(0.01, 0.99, 99)`` it is uncertainty-toolbox's
    ``interval_score``.

    Args:
        lower: ``[N]`` or ``[N, T]``.
        upper: the same shape.
        target: the same shape.
        alpha: the nominal miscoverage, in ``(0, 1)``.
        reduction: ``"mean"`` (a scalar) or ``"none"``.
    """
    alpha = number_in(alpha, "alpha", 0.0, 1.0)
    _check_bounds(lower, upper, target)
    penalty = 2.0 / positive_finite(alpha, "alpha")
    below = (lower - target).clamp_min(0.0)
    above = (target - upper).clamp_min(0.0)
    return _reduce((upper - lower) + penalty * (below + above), reduction)


def pit_calibration_curve(pit: Tensor, num_bins: int = 100) -> tuple[Tensor, Tensor]:
    """Expected levels ``p`` (``linspace(0, 1, num_bins)``) and the observed fraction of PIT
    values ``F(y | x) <= p``: the quantile calibration curve of any predictive CDF (Kuleshov et
    al. 2018), the diagonal when calibrated.

    Args:
        pit: the predictive CDF at each target, ``[N]`` or ``[N, T]``, in ``[0, 1]``.
        num_bins: number of levels, at least 2.
    """
    _tensor(pit, "pit")
    int_at_least(num_bins, "num_bins", 2)
    values = pit.reshape(-1).double().sort().values
    expected = torch.linspace(0.0, 1.0, num_bins, dtype=torch.float64, device=pit.device)
    observed = torch.searchsorted(values, expected, right=True).double() / values.numel()
    return expected.to(pit.dtype), observed.to(pit.dtype)


def pit_miscalibration_area(pit: Tensor, num_bins: int = 100) -> Tensor:
    """Area between :func:`pit_calibration_curve` and the diagonal (0: calibrated, at most 0.5),
    computed as :func:`uq_box.metrics.functional.miscalibration_area` computes its own.
    """
    expected, observed = pit_calibration_curve(pit, num_bins)
    return _area_from_proportions(expected.double(), observed.double()).to(pit.dtype)
