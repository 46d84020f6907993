"""Predictive distributions from Monte Carlo samples of network outputs (pure functions)."""

from __future__ import annotations

from torch import Tensor, nn

from uq_box.losses import pinball_loss


def regression_predictive(
    outputs: Tensor, criterion: nn.Module, noise_std: Tensor | None = None
) -> dict[str, Tensor]:
    """Moments of the Gaussian mixture over ``S`` samples, with the uncertainty split.

    Each sample ``s`` gives a Gaussian ``N(mu_s, sigma_s^2)`` (``sigma_s`` from the criterion; none
    for a mean-only network). The mixture has mean ``mean_s mu_s`` and variance
    ``mean_s sigma_s^2`` (aleatoric) ``+ var_s mu_s`` (epistemic), the law of total variance.

    Args:
        outputs: raw network outputs ``[S, N, O]``.
        criterion: reads ``O`` outputs as ``(mean, std)`` through ``mean_and_std``.
        noise_std: homoscedastic noise std used when the criterion gives no std (mean-only).

    Returns:
        ``pred``, ``pred_uct`` (total std), ``epistemic_uct``, ``aleatoric_uct`` (stds), each
        ``[N, T]`` for ``T`` targets, and ``samples`` ``[S, N, T]`` (the sampled means).
    """
    means, stds = criterion_mean_and_std(criterion, outputs)
    pred = means.mean(0)
    epistemic_var = means.var(0, unbiased=False)
    if stds is not None:
        aleatoric_var = (stds**2).mean(0)
    elif noise_std is not None:
        aleatoric_var = noise_std.to(pred.dtype) ** 2
    else:
        aleatoric_var = epistemic_var.new_zeros(())
    aleatoric_var = aleatoric_var.expand_as(pred)
    return {
        "pred": pred,
        "pred_uct": (epistemic_var + aleatoric_var).sqrt(),
        "epistemic_uct": epistemic_var.sqrt(),
        "aleatoric_uct": aleatoric_var.sqrt(),
        "samples": means,
    }


def criterion_mean_and_std(criterion: nn.Module, outputs: Tensor) -> tuple[Tensor, Tensor | None]:
    """``criterion.mean_and_std(outputs)``, or ``(outputs, None)`` for a mean-only loss."""
    if hasattr(criterion, "mean_and_std"):
        return criterion.mean_and_std(outputs)
    return outputs, None


def criterion_num_outputs(criterion: nn.Module) -> int:
    """Network outputs per target that ``criterion`` expects (1 for plain losses such as MSE)."""
    return int(getattr(criterion, "num_outputs", 1))


def update_regression_metrics(
    metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor, criterion: nn.Module
) -> None:
    """Feed one batch of regression predictions to ``metrics``, the one place that says which
    prediction each metric (by its name) takes.

    ``rmse``: the mean ``pred``; ``coverage``: whether the target lies in ``[lower, upper]``;
    ``interval_width``: ``upper - lower``; ``pinball``: the pinball loss of the predicted
    ``quantiles`` at the criterion's ``levels``; any other name: the Gaussian
    ``(pred, pred_uct, target)`` (NLL, CRPS, coverage of a Gaussian interval, calibration).
    """
    target = target.to(preds["pred"].dtype)
    for name, metric in metrics.items():
        if name == "rmse":
            metric.update(preds["pred"], target)
        elif name == "coverage":
            inside = (target >= preds["lower"]) & (target <= preds["upper"])
            metric.update(inside.to(target.dtype))
        elif name == "interval_width":
            metric.update(preds["upper"] - preds["lower"])
        elif name == "pinball":
            quantiles = preds["quantiles"]
            if quantiles.ndim == target.ndim:  # one target: [N, Q] -> [N, 1, Q]
                quantiles = quantiles.unsqueeze(-2)
            levels = criterion.levels.to(target.dtype)
            metric.update(pinball_loss(quantiles, target.unsqueeze(-1), levels))
        else:
            metric.update(preds["pred"], preds["pred_uct"], target)
