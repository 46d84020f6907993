"""Selective prediction: the risk-coverage curve, AURC, E-AURC and AUGRC, for any uncertainty score.

A selective classifier answers only where its uncertainty score is at most a threshold ``t`` and
abstains elsewhere. Sweeping ``t`` over every distinct score gives the **risk-coverage curve**:
the *coverage* (the share of points answered), the *selective risk* (the mean loss over the
answered points; Geifman & El-Yaniv 2017) and the *generalized risk* (the loss summed over the
answered points, divided by all ``N``: for the 0/1 error, the share of points that are answered
**and** wrong; Traub et al. 2024). The functions take

- ``uncertainty`` ``[N]``: any score where higher means "abstain first" (``pred_uct``,
  ``epistemic_uct``, ``1 - max_c p_c``, a conformal set's size, ...); for a confidence, pass
  its negative;
- ``loss`` ``[N]``: the loss of each point's prediction, e.g. the 0/1 error
  ``pred.argmax(-1) != target`` (booleans are read as 0/1).

The areas summarize the curve over all thresholds (lower is better):

- :func:`aurc`, the area under the risk-coverage curve (Geifman, Uziel & El-Yaniv 2019, "Bias-
  Reduced Uncertainty Estimation for Deep Neural Classifiers"): the mean over ``k = 1..N`` of the
  selective risk of the ``k`` least uncertain points, ``(1/N) sum_k R(k)``;
- :func:`eaurc`, the excess AURC: :func:`aurc` minus the AURC of the oracle ranking (the points
  sorted by their own loss), the same estimator on both, so a perfect ranking scores exactly 0
  and any ranking scores ``>= 0``. For the 0/1 error with error rate ``r`` the oracle AURC is
  ``r - (1 - r)(H_N - H_{N - rN})`` (``H`` the harmonic numbers), which tends to
  ``r + (1 - r) log(1 - r)``, the closed form that Geifman et al. and fd-shifts subtract;
- :func:`augrc`, the area under the generalized risk-coverage curve (Traub, Bungert, Lüth,
  Baumgartner & Jaeger 2024, "Overcoming Common Flaws in the Evaluation of Selective
  Classification Systems"): the trapezoidal area under the generalized risk from ``(0, 0)`` to
  ``(1, mean loss)``; for the 0/1 error the probability that a random point is answered and
  wrong, averaged over thresholds. Its oracle value is ``r^2 / 2``; a constant score gives
  ``r / 2``.

**Ties.** Points with equal uncertainty are answered together: the curve has one point per
distinct score. The areas are the *expected* areas when ties are broken in a uniformly random
order, computed exactly (no sampling): within a run of tied points the expected loss of the
accepted ones grows linearly, so the AUGRC is the trapezoid between distinct scores (as in
Traub et al.'s fd-shifts), and the AURC is the mean of the expected ``R(k)``. Without ties both
equal the plain definitions; with ties the result does not depend on the order of the points,
and a constant score gives the risk at full coverage as its AURC.

Written in torch (float64, one sort, ``O(N log N)``) rather than taken from a library, so that
the metrics run on any device; tested against a direct numpy implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["aurc", "augrc", "eaurc", "risk_coverage_curve"]


def _check_uncertainty_loss(uncertainty: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten and check ``uncertainty`` and ``loss``; return them as float64 ``[N]``."""
    for name, value in (("uncertainty", uncertainty), ("loss", loss)):
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if value.is_complex():
            raise ValueError(f"`{name}` must be real, got {value.dtype}")
    if uncertainty.ndim > 1 and uncertainty.shape[1:].numel() != 1:
        raise ValueError(
            f"`uncertainty` must have shape [N] (one score per point), got "
            f"{list(uncertainty.shape)}"
        )
    uncertainty, loss = uncertainty.reshape(-1), loss.reshape(-1)
    if uncertainty.numel() == 0:
        raise ValueError("`uncertainty` is empty; selective metrics need at least one point")
    if loss.numel() != uncertainty.numel():
        raise ValueError(
            f"`loss` must hold one value per point, {uncertainty.numel()} like `uncertainty`, "
            f"got {loss.numel()}"
        )
    uncertainty, loss = uncertainty.double(), loss.double()
    for name, value in (("uncertainty", uncertainty), ("loss", loss)):
        bad = int((~value.isfinite()).sum())
        if bad:
            raise ValueError(
                f"`{name}` contains {bad} non-finite values (NaN or inf); expected finite values"
            )
    return uncertainty, loss


def _sorted_groups(uncertainty: Tensor, loss: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Points sorted by uncertainty; per run of ties: id of each point, accepted count and loss.

    Returns ``(group [N], count [G], loss_sum [G], threshold [G])``: the group (run of equal
    uncertainty) of each sorted point, and at each distinct threshold, the number of points and
    the summed loss with uncertainty ``<=`` it.
    """
    order = torch.argsort(uncertainty, stable=True)
    u, sorted_loss = uncertainty[order], loss[order]
    last = torch.ones_like(u, dtype=torch.bool)
    last[:-1] = u[1:] != u[:-1]
    group = torch.cumsum(last, 0) - last.long()  # 0 for the first run, +1 after each run ends
    position = torch.arange(1, len(u) + 1, dtype=torch.float64, device=u.device)
    return group, position[last], torch.cumsum(sorted_loss, 0)[last], u[last]


def risk_coverage_curve(uncertainty: Tensor, loss: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The risk-coverage curve: one point per distinct uncertainty score, coverage ascending.

    At threshold ``t`` the points with ``uncertainty <= t`` are answered.

    Args:
        uncertainty: ``[N]`` scores, higher means abstain first.
        loss: ``[N]`` per-point loss (e.g. the 0/1 error; booleans read as 0/1).

    Returns:
        ``(coverage, selective_risk, generalized_risk, threshold)``, each float64 ``[K]`` for the
        ``K`` distinct scores: the share of points answered, their mean loss, their summed loss
        divided by ``N``, and the threshold ``t``. The last point is full coverage (1, mean loss,
        mean loss, max score).
    """
    uncertainty, loss = _check_uncertainty_loss(uncertainty, loss)
    num_points = uncertainty.numel()
    _, count, loss_sum, threshold = _sorted_groups(uncertainty, loss)
    return count / num_points, loss_sum / count, loss_sum / num_points, threshold


def aurc(uncertainty: Tensor, loss: Tensor) -> Tensor:
    """Area under the risk-coverage curve: ``(1/N) sum_{k=1}^N R(k)``, ties broken at random.

    ``R(k)`` is the mean loss of the ``k`` least uncertain points (Geifman et al. 2019); with ties
    the expectation over a uniformly random order of the tied points, see the module docstring.
    A constant score gives the mean loss; lower is better.

    Args:
        uncertainty: ``[N]`` scores, higher means abstain first.
        loss: ``[N]`` per-point loss (e.g. the 0/1 error).

    Returns:
        Scalar float64 tensor.
    """
    uncertainty, loss = _check_uncertainty_loss(uncertainty, loss)
    group, count, loss_sum, _ = _sorted_groups(uncertainty, loss)
    zero = count.new_zeros(1)
    count_before, sum_before = torch.cat([zero, count[:-1]]), torch.cat([zero, loss_sum[:-1]])
    group_mean = (loss_sum - sum_before) / (count - count_before)
    k = torch.arange(1, uncertainty.numel() + 1, dtype=torch.float64, device=loss.device)
    # expected summed loss of the k first points: the runs before, plus k - count_before points
    # of the current run at its mean loss
    expected_sum = sum_before[group] + (k - count_before[group]) * group_mean[group]
    return (expected_sum / k).mean()


def _oracle_aurc(loss: Tensor) -> Tensor:
    """AURC of the points ranked by their own loss (no ties matter: equal losses are equal)."""
    k = torch.arange(1, loss.numel() + 1, dtype=torch.float64, device=loss.device)
    return (torch.cumsum(loss.sort().values, 0) / k).mean()


def eaurc(uncertainty: Tensor, loss: Tensor) -> Tensor:
    """Excess AURC: :func:`aurc` minus the AURC of the oracle ranking by the loss itself.

    Both with the same estimator, so a ranking that puts every lower loss before every higher
    one gives exactly 0, and any ranking gives ``>= 0`` (the oracle minimizes every ``R(k)`` at
    once, and a tie-broken ranking is a ranking). Lower is better.

    Args:
        uncertainty: ``[N]`` scores, higher means abstain first.
        loss: ``[N]`` per-point loss (e.g. the 0/1 error).

    Returns:
        Scalar float64 tensor.
    """
    uncertainty, loss = _check_uncertainty_loss(uncertainty, loss)
    return aurc(uncertainty, loss) - _oracle_aurc(loss)


def augrc(uncertainty: Tensor, loss: Tensor) -> Tensor:
    """Area under the generalized risk-coverage curve (Traub et al. 2024), trapezoidal.

    The generalized risk at threshold ``t`` is the loss summed over the points with
    ``uncertainty <= t``, divided by ``N`` (for the 0/1 error: the share of points answered and
    wrong); the area runs from ``(0, 0)`` to ``(1, mean loss)`` through one point per distinct
    score. With the 0/1 error at error rate ``r``: ``r^2 / 2`` for a perfect ranking, ``r / 2``
    for a constant score. Lower is better.

    Args:
        uncertainty: ``[N]`` scores, higher means abstain first.
        loss: ``[N]`` per-point loss (e.g. the 0/1 error).

    Returns:
        Scalar float64 tensor.
    """
    uncertainty, loss = _check_uncertainty_loss(uncertainty, loss)
    num_points = uncertainty.numel()
    _, count, loss_sum, _ = _sorted_groups(uncertainty, loss)
    coverage = torch.cat([count.new_zeros(1), count / num_points])
    risk = torch.cat([loss_sum.new_zeros(1), loss_sum / num_points])
    return torch.trapezoid(risk, coverage)
