"""Predictive distributions from Monte Carlo samples of network outputs (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from uq_box.losses import gaussian_nll_loss, pinball_loss
from uq_box.metrics.density import MixtureNLL
from uq_box.metrics.functional_quantiles import (
    bisect_quantiles,
    check_levels,
    mixture_quantiles,
)


def regression_predictive(
    outputs: Tensor, criterion: nn.Module, noise_std: Tensor | None = None
) -> dict[str, Tensor]:
    """Moments of the Gaussian mixture over ``S`` samples, with the uncertainty split.

    Each sample ``s`` gives a distribution of mean ``mu_s`` and std ``sigma_s`` (the criterion's
    ``mean_and_std``; a Gaussian for ``NLL``, none for a mean-only network). The mixture has mean
    ``mean_s mu_s`` and variance ``mean_s sigma_s^2`` (aleatoric) ``+ var_s mu_s`` (epistemic),
    the law of total variance. A criterion with ``variance_split`` (deep evidential regression)
    splits each sample's variance itself: its epistemic part joins ``var_s mu_s``.

    Args:
        outputs: raw network outputs ``[S, N, O]``.
        criterion: reads ``O`` outputs as ``(mean, std)`` through ``mean_and_std``.
        noise_std: homoscedastic noise std used when the criterion gives no std (mean-only).

    A criterion with a full covariance (``covariance``, :class:`~uq_box.losses.MultivariateNLL`)
    gives marginal stds through ``mean_and_std``, so the keys above are the marginal moments; the
    prediction adds ``covariance`` ``[N, T, T]``, the mixture's by the law of total variance for
    matrices: ``mean_s Sigma_s + mean_s (mu_s - pred)(mu_s - pred)^T``.

    Returns:
        ``pred``, ``pred_uct`` (total std), ``epistemic_uct``, ``aleatoric_uct`` (stds), each
        ``[N, T]`` for ``T`` targets, ``samples`` ``[S, N, T]`` (the sampled means) and, when the
        criterion has a density (``log_prob``), ``outputs``: the raw outputs ``[S, N, O]``,
        from which the ``nll`` metric reads the real predictive density; ``covariance``
        ``[N, T, T]`` when the criterion has one.
    """
    means, stds = criterion_mean_and_std(criterion, outputs)
    pred = means.mean(0)
    epistemic_var = means.var(0, unbiased=False)
    if hasattr(criterion, "variance_split"):
        sample_aleatoric, sample_epistemic = criterion.variance_split(outputs)
        aleatoric_var = sample_aleatoric.mean(0)
        epistemic_var = epistemic_var + sample_epistemic.mean(0)
    elif stds is not None:
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
        **({"outputs": outputs} if hasattr(criterion, "log_prob") else {}),
        **({"covariance": mixture_covariance(outputs, criterion)} if _full(criterion) else {}),
    }


def _full(criterion: nn.Module) -> bool:
    """A criterion with a full covariance per point (``covariance``)."""
    return hasattr(criterion, "covariance")


def mixture_covariance(outputs: Tensor, criterion: nn.Module) -> Tensor:
    """Covariance ``[N, T, T]`` of the equal-weight mixture of the samples' Gaussians.

    The law of total variance for matrices: ``Cov[y] = E_s[Sigma_s] + Cov_s[mu_s]``, the mean of
    the samples' covariances (``criterion.covariance(outputs)`` ``[S, N, T, T]``) plus the
    covariance of their means (over ``S``, divided by ``S``).
    """
    means, _ = criterion.mean_and_std(outputs)
    centered = means - means.mean(0)
    spread = (centered.unsqueeze(-1) * centered.unsqueeze(-2)).mean(0)
    return criterion.covariance(outputs).mean(0) + spread


def predictive_draws(
    outputs: Tensor,
    criterion: nn.Module,
    num_draws: int = 32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draws ``[M, N, T]`` of the mixture over ``S`` samples, through ``criterion.sample``.

    Stratified over the samples: each of the ``S`` samples' distributions gives ``M / S`` draws,
    ``M`` the smallest multiple of ``S`` that is at least ``num_draws``, so the draws' mixture
    weights are exactly equal.

    Args:
        outputs: raw network outputs ``[S, N, O]``.
        criterion: with ``sample(outputs, generator)`` (one draw per leading index).
        num_draws: at least this many draws per point.
        generator: the random generator (``None``: torch's global one).
    """
    num_samples = outputs.shape[0]
    repeats = -(-max(int(num_draws), 1) // num_samples)
    tiled = outputs.repeat(repeats, *([1] * (outputs.ndim - 1)))  # [M, N, O], sample s at s + kS
    return criterion.sample(tiled, generator=generator)


def predictive_log_probs(preds: dict[str, Tensor], target: Tensor, criterion: nn.Module) -> Tensor:
    """Per-sample log-densities ``[S, N, T]`` of ``target`` under a regression prediction.

    The criterion's ``log_prob`` of the raw ``outputs`` when the prediction carries them (the
    real predictive density is their equal-weight mixture); otherwise (a mean-only network, a
    Laplace GLM predictive, a conformal interval) the Gaussian ``(pred, pred_uct)`` as one sample.
    """
    if "outputs" in preds and hasattr(criterion, "log_prob"):
        return criterion.log_prob(preds["outputs"], target)
    return -gaussian_nll_loss(preds["pred"], preds["pred_uct"], target).unsqueeze(0)


def criterion_mean_and_std(criterion: nn.Module, outputs: Tensor) -> tuple[Tensor, Tensor | None]:
    """``criterion.mean_and_std(outputs)``, or ``(outputs, None)`` for a mean-only loss."""
    if hasattr(criterion, "mean_and_std"):
        return criterion.mean_and_std(outputs)
    return outputs, None


def criterion_num_outputs(criterion: nn.Module) -> int:
    """Network outputs per target that ``criterion`` expects (1 for plain losses such as MSE)."""
    return int(getattr(criterion, "num_outputs", 1))


def criterion_output_width(criterion: nn.Module, num_targets: int) -> int:
    """Network outputs per point for ``num_targets`` targets: the criterion's
    ``output_width(num_targets)`` when it has one (a full covariance head needs
    ``T (T + 3) / 2``), else ``num_outputs * num_targets``.
    """
    if hasattr(criterion, "output_width"):
        return int(criterion.output_width(num_targets))
    return criterion_num_outputs(criterion) * num_targets


def update_regression_metrics(
    metrics: nn.ModuleDict,
    preds: dict[str, Tensor],
    target: Tensor,
    criterion: nn.Module,
    quantile_levels: Sequence[float] | None = None,
) -> None:
    """Feed one batch of regression predictions to ``metrics``, the one place that says which
    prediction each metric (by its name) takes.

    ``rmse``: the mean ``pred``; ``coverage``: whether the target lies in ``[lower, upper]``;
    ``interval_width``: ``upper - lower``; ``pinball``: the pinball loss of the predicted
    ``quantiles`` at ``quantile_levels`` (the method's, when it was asked for quantiles) or else
    the criterion's ``levels``; a :class:`~uq_box.metrics.MixtureNLL`
    (``nll``): the per-sample log-densities of :func:`predictive_log_probs` (joint ones, ``[S,
    N]`` for ``T`` targets, count ``T`` times: a per-target NLL); ``energy_score``: draws of the
    predictive mixture (:func:`predictive_draws`, 32 per point at least, a fixed seed so that the
    global random state is untouched; skipped for a prediction without ``outputs``); any other name: the Gaussian ``(pred, pred_uct, target)``
    (``nll_gaussian``, CRPS, coverage of a Gaussian interval, calibration).
    """
    target = target.to(preds["pred"].dtype)
    for name, metric in metrics.items():
        if isinstance(metric, MixtureNLL):
            log_probs = predictive_log_probs(preds, target, criterion)
            joint = log_probs.ndim == target.ndim  # [S, N] for targets [N, T]
            metric.update(log_probs, num_targets=target.shape[-1] if joint else 1)
        elif name == "energy_score":
            if "outputs" not in preds:  # a wrapper's calibrated prediction: no draws to score
                continue
            generator = torch.Generator(target.device).manual_seed(0)
            draws = predictive_draws(preds["outputs"], criterion, generator=generator)
            metric.update(draws, target)
        elif name == "rmse":
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
            levels = (
                criterion.levels
                if quantile_levels is None
                else quantiles.new_tensor(quantile_levels)
            )
            levels = levels.to(device=target.device, dtype=target.dtype)
            metric.update(pinball_loss(quantiles, target.unsqueeze(-1), levels))
        else:
            metric.update(preds["pred"], preds["pred_uct"], target)


class QuantileLevels:
    """The ``quantile_levels`` attribute of a regression method: the levels at which its
    ``predict_step`` adds ``quantiles`` ``[N, T, Q]`` (:func:`regression_quantiles`).

    ``None`` (the default) adds nothing; setting levels checks them (each in ``(0, 1)``, else a
    ``ValueError`` naming ``quantile_levels``) and keeps them as a tuple of floats. A prediction
    option, not a hyperparameter: it is not saved in checkpoints.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"_{name}"

    def __get__(self, obj: object, owner: type | None = None) -> tuple[float, ...] | None:
        if obj is None:
            return self  # type: ignore[return-value]
        return obj.__dict__.get(self.key)

    def __set__(self, obj: object, value: Sequence[float] | Tensor | None) -> None:
        obj.__dict__[self.key] = None if value is None else check_levels(value, "quantile_levels")


def regression_quantiles(
    outputs: Tensor,
    criterion: nn.Module,
    levels: Sequence[float] | Tensor,
    noise_std: Tensor | None = None,
) -> Tensor:
    """Quantiles ``[N, T, Q]`` of the predictive mixture over ``S`` samples at ``levels``.

    The predictive is the equal-weight mixture of each sample's distribution (see
    :func:`regression_predictive`); its CDF is inverted by vectorized bisection:

    - a criterion with ``cdf(outputs, value)`` (each sample's CDF at ``value`` ``[N, T]``, shaped
      ``[S, N, T]`` as ``log_prob``) is inverted as it is, inside the bracket that Cantelli's
      inequality gives from the mixture's mean and std (any distribution with a finite variance);
    - a Gaussian criterion (``mean_and_std`` only) is the Gaussian mixture,
      :func:`~uq_box.metrics.functional_quantiles.mixture_quantiles` (exact for ``S = 1``);
    - a mean-only network with a noise std: the mixture of ``N(mu_s, noise^2)``; without one,
      the empirical quantiles of the sampled means.

    Args:
        outputs: raw network outputs ``[S, N, O]``.
        criterion: reads them (``mean_and_std``, optionally ``cdf``).
        levels: ``Q`` levels in ``(0, 1)``.
        noise_std: a mean-only network's homoscedastic noise std.
    """
    levels = check_levels(levels, "quantile_levels")
    means, stds = criterion_mean_and_std(criterion, outputs)
    if hasattr(criterion, "cdf"):
        return _criterion_quantiles(outputs, criterion, means, stds, levels)
    if stds is None and noise_std is not None:
        stds = noise_std.to(means.dtype).expand_as(means)
    return mixture_quantiles(means, stds, levels)


def _criterion_quantiles(
    outputs: Tensor, criterion: nn.Module, means: Tensor, stds: Tensor, levels: tuple
) -> Tensor:
    num_samples, num_points = outputs.shape[:2]
    num_levels = len(levels)
    tau = torch.tensor(levels, dtype=torch.float64, device=outputs.device)
    mean = means.double().mean(0)
    std = ((stds.double() ** 2).mean(0) + means.double().var(0, unbiased=False)).sqrt()
    # Cantelli: F(mu - s sqrt((1 - tau) / tau)) <= tau <= F(mu + s sqrt(tau / (1 - tau)))
    low = mean.unsqueeze(-1) - std.unsqueeze(-1) * ((1 - tau) / tau).sqrt()
    high = mean.unsqueeze(-1) + std.unsqueeze(-1) * (tau / (1 - tau)).sqrt()
    # every level as extra points: outputs [S, N * Q, O], values [N * Q, T]
    folded = (
        outputs.unsqueeze(2)
        .expand(-1, -1, num_levels, -1)
        .reshape(num_samples, num_points * num_levels, -1)
    )

    def cdf(value: Tensor) -> Tensor:  # [N, T, Q] -> [N, T, Q]
        flat = value.to(outputs.dtype).movedim(-1, 1).reshape(num_points * num_levels, -1)
        probs = criterion.cdf(folded, flat).mean(0).double()  # [N * Q, T]
        return probs.reshape(num_points, num_levels, -1).movedim(1, -1)

    return bisect_quantiles(cdf, low, high, tau).to(means.dtype)
