"""Recalibration of a fitted regression method that returns calibrated outputs.

Two post-hoc wrappers, fitted on held-out data (the ``"calib"`` split by default, like
:class:`~uq_box.methods.posthoc.ConformalRegression`; ``calibrate(dm, split="val")`` or an
``(inputs, targets)`` pair work too), that correct the wrapped method's predictive distribution
``F(y | x)``, read as the Gaussian ``N(pred, pred_uct^2)`` of the prediction contract:

- :class:`StdScaling`: one factor ``s`` per target on the predictive standard deviation (Levi,
  Gispan, Giladi & Fetaya 2022, "Evaluating and Calibrating Uncertainty Prediction in Regression
  Tasks"; Laves et al. 2020), fitted by minimizing the Gaussian NLL of the calibration split,
  whose minimum is in closed form: ``s^2 = mean(((y - pred) / pred_uct)^2)``.
- :class:`IsotonicRecalibration`: a monotone map ``R`` of the predicted CDF levels
  (Kuleshov, Fenner & Ermon 2018, "Accurate Uncertainties for Deep Learning Using Calibrated
  Regression"), so that the calibrated CDF ``R(F(y | x))`` is calibrated on the calibration
  split: ``R`` is the isotonic regression of the empirical frequencies ``P(F(Y) <= p)`` on the
  levels ``p = F(y_i | x_i)`` (the PIT values). Those frequencies, the empirical CDF of the PIT
  values, are non-decreasing already, so the isotonic fit (pool-adjacent-violators, as
  ``sklearn.isotonic.IsotonicRegression``) is that empirical CDF itself, with ``R(0) = 0`` and
  ``R(1) = 1``; it is evaluated in torch by linear interpolation between its knots, and
  inverted the same way for the calibrated quantiles ``F^{-1}(R^{-1}(tau) | x)``.

Both predict the regression contract of the calibrated distribution, and, with
``quantile_levels`` set, its ``quantiles`` ``[N, T, Q]``; ``pit(x, y)`` gives the calibrated
CDF at the targets (uniform on ``[0, 1]`` when calibrated), ``pit(x, y, calibrated=False)`` the
wrapped method's, for the before-and-after plot :func:`uq_box.viz.plot_recalibration`. A
recalibration fitted on ``n`` points is as good as those points: the split must not have been
used in training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from uq_box.checks import int_at_least
from uq_box.methods.base import RegressionTask, UQMethod
from uq_box.methods.posthoc import MIN_STD, PostHocCalibration, check_wrapped_model
from uq_box.metrics.functional_quantiles import gaussian_quantiles

__all__ = ["IsotonicRecalibration", "RegressionRecalibration", "StdScaling"]

#: keys of the wrapped prediction that describe the uncalibrated distribution (dropped).
STALE_KEYS = ("lower", "upper", "quantiles", "outputs")


class RegressionRecalibration(RegressionTask, PostHocCalibration):
    """Base of the regression recalibrators: collect standardized residuals, predict.

    Subclasses implement :meth:`fit_calibration` (on ``z = (y - pred) / pred_uct`` ``[n, T]``),
    :meth:`calibrated` (the calibrated contract and quantiles of the wrapped prediction) and
    :meth:`calibrated_cdf` (the calibrated CDF at standardized values); buffers whose shape is
    only known after fitting are listed in :attr:`fitted_buffers`.

    Args:
        model: a fitted regression method (a ``RegressionTask`` ``UQMethod``).
        quantile_levels: levels in ``(0, 1)`` at which ``predict_step`` adds the calibrated
            ``quantiles`` ``[N, T, Q]`` (``None``: none); also settable later.
    """

    default_split = "calib"
    concat_dims = {"z": 0}
    summary_buffers = {"calibration_points": "num_calibration_points"}

    def __init__(self, model: UQMethod, quantile_levels: list[float] | None = None) -> None:
        check_wrapped_model(
            model, RegressionTask, "regression", "MVERegression or DeepEnsembleRegression"
        )
        super().__init__(model)
        self.quantile_levels = quantile_levels
        self.register_buffer("num_calibration_points", torch.zeros((), dtype=torch.long))

    @property
    def is_calibrated(self) -> bool:
        """Whether the recalibration has been fitted."""
        return int(self.num_calibration_points) > 0

    def standardized(self, preds: dict[str, Tensor], target: Tensor) -> Tensor:
        """``(target - pred) / pred_uct`` ``[N, T]`` of a wrapped prediction."""
        target = target.to(device=preds["pred"].device, dtype=preds["pred"].dtype)
        std = preds["pred_uct"]
        if not bool((std > 0).all()):
            raise ValueError(
                f"{type(self).__name__} rescales pred_uct, but {type(self.model).__name__} "
                f"predicts pred_uct <= 0 for some points"
            )
        return (target.reshape(preds["pred"].shape) - preds["pred"]) / std

    def collect(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Standardized residuals of one batch."""
        return {"z": self.standardized(self.model.predict_step(x), target)}

    # -- to implement --------------------------------------------------------------------------
    def calibrated(self, preds: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(pred, pred_uct, quantiles or None)`` of the calibrated distribution."""
        raise NotImplementedError

    def calibrated_cdf(self, z: Tensor) -> Tensor:
        """The calibrated CDF at standardized values ``z`` ``[N, T]``."""
        raise NotImplementedError

    # -- prediction ----------------------------------------------------------------------------
    def pit(self, x: Tensor, target: Tensor, calibrated: bool = True) -> Tensor:
        """PIT values ``[N, T]``: the calibrated CDF at the targets (the wrapped method's
        Gaussian CDF with ``calibrated=False``); uniform on ``[0, 1]`` when calibrated.
        """
        with torch.no_grad():
            z = self.standardized(self.model.predict_step(x), target)
            if not calibrated:
                return torch.special.ndtr(z)
            self._check_calibrated()
            return self.calibrated_cdf(z)

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The regression contract of the calibrated distribution (see the module doc)."""
        preds = self.wrapped_predictions(batch)
        with torch.no_grad():
            preds = {k: v for k, v in preds.items() if k not in STALE_KEYS}
            old_pred, old_std = preds["pred"], preds["pred_uct"]
            pred, std, quantiles = self.calibrated(preds)
            std = std.clamp_min(MIN_STD)
            factor = std / old_std
            preds["pred"], preds["pred_uct"] = pred, std
            preds["aleatoric_uct"] = preds["aleatoric_uct"].expand_as(pred) * factor
            preds["epistemic_uct"] = preds["epistemic_uct"].expand_as(pred) * factor
            if "samples" in preds:  # spread the sampled means as the epistemic std
                preds["samples"] = pred + factor * (preds["samples"] - old_pred)
            if quantiles is not None:
                preds["quantiles"] = quantiles
        return preds


class StdScaling(RegressionRecalibration):
    """Standard-deviation scaling of a fitted regression method (Levi et al. 2022).

    ``pred_uct`` becomes ``s * pred_uct`` with one ``s > 0`` per target, the minimizer of the
    Gaussian NLL ``log(s pred_uct) + (y - pred)^2 / (2 s^2 pred_uct^2)`` on the calibration split:
    ``s^2 = mean(z^2)``, ``z = (y - pred) / pred_uct`` (closed form, no optimizer). ``pred`` is
    unchanged; the aleatoric and epistemic stds, and the spread of the sampled means around
    ``pred``, are scaled by ``s`` too, so the contract's identities hold. Calibrated quantiles are
    ``pred + s pred_uct Phi^{-1}(tau)``.

    Args:
        model: a fitted regression method (a ``RegressionTask`` ``UQMethod``).
        quantile_levels: levels at which ``predict_step`` adds ``quantiles`` (``None``: none).
    """

    fitted_buffers = ("scale",)

    def __init__(self, model: UQMethod, quantile_levels: list[float] | None = None) -> None:
        super().__init__(model, quantile_levels)
        self.register_buffer("scale", torch.full((1,), math.nan))
        self.save_hyperparameters(ignore=["model"])

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """``s = sqrt(mean(z^2))`` per target."""
        z = collected["z"].detach().double()
        scale = z.square().mean(0).sqrt().clamp_min(MIN_STD)
        self.scale = scale.to(device=self.scale.device, dtype=torch.float32)
        self.num_calibration_points = torch.tensor(z.shape[0], device=self.scale.device)

    def calibration_summary(self) -> dict[str, float]:
        """The fitted scale (mean over targets) and the number of calibration points."""
        return {"std_scale": self.scale.mean().item(), **super().calibration_summary()}

    def calibrated(self, preds: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        pred = preds["pred"]
        std = preds["pred_uct"] * self.scale.to(pred.dtype)
        levels = self.quantile_levels
        quantiles = None if levels is None else gaussian_quantiles(pred, std, levels)
        return pred, std, quantiles

    def calibrated_cdf(self, z: Tensor) -> Tensor:
        return torch.special.ndtr(z / self.scale.to(z.dtype))


class IsotonicRecalibration(RegressionRecalibration):
    """Isotonic recalibration of the predicted CDF of a fitted regression method (Kuleshov et
    al. 2018).

    On ``n`` calibration points with PIT values ``p_i = Phi(z_i)``, the map ``R`` (one per target)
    is the empirical CDF of the ``p_i`` (the isotonic regression of the frequencies on the
    levels, see the module doc), linear between its knots ``(0, 0), (p_(i), #{p <= p_(i)} / n),
    (1, 1)``. The calibrated CDF is ``R(Phi((y - pred) / pred_uct))`` and its ``tau``-quantile
    ``pred + pred_uct Phi^{-1}(R^{-1}(tau))``. ``pred`` and ``pred_uct`` become the mean and the
    standard deviation of the calibrated distribution, computed from its quantiles on a midpoint
    grid of ``num_levels`` levels (the std divided by the grid's std of the standard normal, so
    that a calibrated model keeps its ``pred_uct``); the aleatoric and epistemic stds and the spread of the sampled
    means are scaled by ``new pred_uct / old pred_uct``, so the contract's identities hold (the
    split itself is not recalibrated).

    Args:
        model: a fitted regression method (a ``RegressionTask`` ``UQMethod``).
        quantile_levels: levels at which ``predict_step`` adds ``quantiles`` (``None``: none).
        num_levels: levels of the grid for the calibrated mean and std, at least 2.
    """

    fitted_buffers = ("knots", "frequencies")

    def __init__(
        self,
        model: UQMethod,
        quantile_levels: list[float] | None = None,
        num_levels: int = 1000,
    ) -> None:
        num_levels = int_at_least(num_levels, "num_levels", 2)
        super().__init__(model, quantile_levels)
        self.num_levels = num_levels
        self.register_buffer("knots", torch.full((1, 2), math.nan))
        self.register_buffer("frequencies", torch.full((1, 2), math.nan))
        self.save_hyperparameters(ignore=["model"])

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """The empirical CDF of the PIT values, per target, as knots ``[T, n + 2]``."""
        pit = torch.special.ndtr(collected["z"].detach().double()).T.contiguous()  # [T, n]
        num_targets, num_points = pit.shape
        ordered = pit.sort(dim=-1).values
        frequency = torch.searchsorted(ordered, ordered, right=True).double() / num_points
        zeros = ordered.new_zeros(num_targets, 1)
        ones = ordered.new_ones(num_targets, 1)
        device = self.knots.device
        self.knots = torch.cat([zeros, ordered, ones], dim=-1).to(device)
        self.frequencies = torch.cat([zeros, frequency, ones], dim=-1).to(device)
        self.num_calibration_points = torch.tensor(num_points, device=device)

    def recalibrate(self, p: Tensor) -> Tensor:
        """``R(p)``: calibrated levels of predicted levels ``p`` ``[..., T, K]`` (float64)."""
        return _interpolate(self.knots, self.frequencies, p)

    def inverse(self, tau: Tensor) -> Tensor:
        """``R^{-1}(tau)``: the predicted level whose calibrated level is ``tau`` ``[T, K]``."""
        return _interpolate(self.frequencies, self.knots, tau)

    def calibrated_cdf(self, z: Tensor) -> Tensor:
        p = torch.special.ndtr(z.double())  # [N, T]
        return self.recalibrate(p.T.unsqueeze(0)).squeeze(0).T.to(z.dtype)

    def calibrated(self, preds: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        pred, std = preds["pred"], preds["pred_uct"]
        num_targets = pred.shape[-1]
        grid = (torch.arange(self.num_levels, dtype=torch.float64) + 0.5) / self.num_levels
        z_grid = self._calibrated_z(grid.to(pred.device), num_targets)  # [T, M]
        # the grid misses the far tails: divide by its std of the standard normal, so that the
        # identity map (a calibrated model) keeps pred_uct
        reference = torch.special.ndtri(grid).std(unbiased=False)
        mean_z, std_z = z_grid.mean(-1), z_grid.std(-1, unbiased=False) / reference.to(z_grid)
        new_pred = pred + std * mean_z.to(pred.dtype)
        new_std = std * std_z.to(pred.dtype)
        quantiles = None
        if self.quantile_levels is not None:
            tau = torch.tensor(self.quantile_levels, dtype=torch.float64, device=pred.device)
            z_q = self._calibrated_z(tau, num_targets).to(pred.dtype)  # [T, Q]
            quantiles = pred.unsqueeze(-1) + std.unsqueeze(-1) * z_q
        return new_pred, new_std, quantiles

    def _calibrated_z(self, tau: Tensor, num_targets: int) -> Tensor:
        """Standardized calibrated quantiles ``Phi^{-1}(R^{-1}(tau))`` ``[T, K]``."""
        levels = self.inverse(tau.expand(num_targets, -1).unsqueeze(0)).squeeze(0)
        eps = torch.finfo(torch.float64).eps
        return torch.special.ndtri(levels.clamp(eps, 1.0 - eps))


def _interpolate(x: Tensor, y: Tensor, value: Tensor) -> Tensor:
    """Piecewise-linear ``y(x)`` at ``value`` ``[B, T, K]`` for non-decreasing knots ``x``, ``y``
    ``[T, M]`` (per target); flat beyond the ends. Tied ``x`` knots share one ``y``.
    """
    x, y = x.to(value), y.to(value)
    batch = value.shape[0]
    flat = value.movedim(0, 1).reshape(x.shape[0], -1)  # [T, B * K]
    right = torch.searchsorted(x, flat, right=False).clamp(1, x.shape[-1] - 1)
    x0, x1 = x.gather(-1, right - 1), x.gather(-1, right)
    y0, y1 = y.gather(-1, right - 1), y.gather(-1, right)
    gap = x1 - x0
    weight = torch.where(gap > 0, (flat - x0) / gap.clamp_min(1e-300), torch.ones_like(gap))
    result = y0 + weight.clamp(0.0, 1.0) * (y1 - y0)
    return result.reshape(x.shape[0], batch, -1).movedim(1, 0)
