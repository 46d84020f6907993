"""Quantile regression: Koenker & Bassett 1978, "Regression Quantiles", with a neural network.

One network outputs one value per quantile level (default 0.05, 0.5, 0.95), trained on the pinball
loss averaged over the levels (:class:`uq_box.losses.PinballLoss`). No distribution is assumed:
the outer quantiles form a prediction interval (nominal coverage ``q_hi - q_lo``, 90% by default),
which conformal calibration (:class:`uq_box.methods.posthoc.ConformalRegression`, CQR) can make
exact in finite samples.

To fit the prediction contract and the Gaussian metrics (NLL, CRPS, calibration), the predictive
is summarized as ``pred`` = the median and ``pred_uct`` = the standard deviation of the Gaussian
whose ``q_lo``/``q_hi`` quantiles are the outer predicted ones; one deterministic network has no
epistemic part, so ``aleatoric_uct = pred_uct`` and ``epistemic_uct = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from uq_box.losses import PinballLoss
from uq_box.methods.base import LRSchedulerCallable, OptimizerCallable, RegressionTask
from uq_box.methods.deterministic import Deterministic
from uq_box.methods.predictive import regression_predictive

DEFAULT_QUANTILES = (0.05, 0.5, 0.95)

__all__ = ["DEFAULT_QUANTILES", "QuantileRegression", "interpolate_quantiles"]


class QuantileRegression(RegressionTask, Deterministic):
    """Neural quantile regression on the pinball loss.

    ``predict_step`` returns the regression contract (``pred`` = median, ``pred_uct`` =
    ``aleatoric_uct`` = Gaussian-equivalent std of the outer quantiles, ``epistemic_uct`` = 0,
    ``samples`` ``[1, N, T]``) plus ``lower``/``upper`` (the outer quantiles, ``[N, T]``) and
    ``quantiles`` (``[N, Q]`` for one target, ``[N, T, Q]`` for several), sorted along the levels
    so that they never cross; with ``quantile_levels`` set, ``quantiles`` ``[N, T, Q]`` at those
    levels instead, linear between the predicted ones (:func:`interpolate_quantiles`). The validation and test metrics add ``coverage`` (fraction of
    targets in ``[lower, upper]``, nominally ``q_hi - q_lo``) and ``pinball`` to the Gaussian ones.

    Args:
        model: the backbone, with ``len(quantiles)`` outputs per target (target-major layout for
            several targets, see :class:`uq_box.losses.PinballLoss`).
        quantiles: strictly increasing levels in ``(0, 1)`` that include ``0.5`` (the median is
            the point prediction) and at least one other level.
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        burnin_epochs: epochs trained on the MSE of the median first (0 by default: the pinball
            loss needs no warm start).
    """

    criterion: PinballLoss

    def __init__(
        self,
        model: nn.Module,
        quantiles: tuple[float, ...] | list[float] = DEFAULT_QUANTILES,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        burnin_epochs: int = 0,
    ) -> None:
        criterion = PinballLoss(quantiles)
        criterion.check_levels_for_prediction()
        num_levels = criterion.num_outputs
        n_outputs = getattr(model, "n_outputs", None)
        if isinstance(n_outputs, int) and n_outputs % num_levels != 0:
            raise ValueError(
                f"the network has `n_outputs`={n_outputs} but `quantiles`={criterion.quantiles} "
                f"needs one output per level and target: set `n_outputs` to {num_levels} (or a "
                f"multiple of it for several targets)"
            )
        super().__init__(model, criterion, optimizer, lr_scheduler, burnin_epochs)

    @property
    def quantiles(self) -> tuple[float, ...]:
        """The quantile levels."""
        return self.criterion.quantiles

    def default_criterion(self) -> nn.Module:
        """Pinball loss at the default levels."""
        return PinballLoss(DEFAULT_QUANTILES)

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must be a :class:`uq_box.losses.PinballLoss`."""
        if not isinstance(criterion, PinballLoss):
            raise ValueError(
                f"`criterion` of QuantileRegression must be a uq_box.losses.PinballLoss, got "
                f"{criterion!r}"
            )

    def build_metrics(self) -> nn.ModuleDict:
        """The Gaussian regression metrics plus interval ``coverage`` and ``pinball`` loss."""
        metrics = super().build_metrics()
        metrics["coverage"] = MeanMetric()
        metrics["pinball"] = MeanMetric()
        return metrics

    def check_outputs(self, outputs: Tensor, target: Tensor) -> None:
        """The network must give ``len(quantiles)`` outputs per target."""
        expected = self.criterion.num_outputs * target.shape[-1]
        if outputs.shape[-1] != expected:
            raise ValueError(
                f"the network gives {outputs.shape[-1]} outputs per point but `quantiles`="
                f"{self.quantiles} needs {expected} for {target.shape[-1]} target(s); set the "
                f"network's `n_outputs` to {expected} or change `quantiles`"
            )

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The pinball loss (logged as ``pinball``; ``loss`` during burn-in is the MSE)."""
        terms, outputs = super().loss(x, target)
        terms["pinball"] = terms.pop("nll")
        return terms, outputs

    def predictive(self, outputs: Tensor) -> dict[str, Tensor]:
        """Median, Gaussian-equivalent std and the sorted quantiles of outputs ``[S, N, T*Q]``."""
        preds = regression_predictive(outputs, self.criterion)
        quantiles = self.criterion.quantile_outputs(outputs).mean(0)  # [N, T, Q]
        preds["lower"] = quantiles[..., 0]
        preds["upper"] = quantiles[..., -1]
        if self.quantile_levels is None:
            preds["quantiles"] = quantiles.squeeze(-2) if quantiles.shape[-2] == 1 else quantiles
        else:
            preds["quantiles"] = interpolate_quantiles(
                quantiles, self.criterion.quantiles, self.quantile_levels
            )
        return preds


def interpolate_quantiles(
    quantiles: Tensor, grid: tuple[float, ...], levels: tuple[float, ...]
) -> Tensor:
    """Quantiles ``[N, T, Q]`` at ``levels``, linear between the predicted ones ``[N, T, K]`` at
    the increasing ``grid``; a level outside ``[grid[0], grid[-1]]`` is an error (the network
    says nothing about the tails beyond its outer levels).
    """
    outside = [level for level in levels if not grid[0] <= level <= grid[-1]]
    if outside:
        raise ValueError(
            f"`quantile_levels` {list(levels)} must lie within the levels QuantileRegression "
            f"predicts, [{grid[0]}, {grid[-1]}] (`quantiles`={list(grid)}); got {outside}"
        )
    knots = quantiles.new_tensor(grid)
    tau = quantiles.new_tensor(levels)
    right = torch.searchsorted(knots, tau).clamp(1, len(grid) - 1)
    weight = (tau - knots[right - 1]) / (knots[right] - knots[right - 1])
    low, high = quantiles[..., right - 1], quantiles[..., right]
    return low + weight * (high - low)
