"""Predictive distributions from Monte Carlo samples of network outputs (pure functions)."""

from __future__ import annotations

from torch import Tensor, nn


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
