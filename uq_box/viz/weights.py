"""Weight distributions of trained networks, one histogram per method (Blundell et al. 2015,
figure 3; the "Weight Distributions" figure of the Bayesian-Neural-Networks repository).
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from uq_box.checks import non_negative_int
from uq_box.nn.layers import _BayesianLayer
from uq_box.nn.pruning import snr as weight_snr

__all__ = ["model_weights", "plot_weight_histograms"]


def model_weights(
    model: nn.Module,
    num_samples: int = 0,
    include_bias: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """All weights of ``model`` as one flat CPU tensor.

    Bayesian layers give their posterior means, or ``num_samples`` draws ``mu + sigma * eps`` of
    every weight when ``num_samples > 0``; every other parameter (a plain layer's weights, an
    ensemble's stacked members, ...) is taken as it is.

    Args:
        model: any network.
        num_samples: posterior draws per Bayesian weight (0: the means).
        include_bias: include biases (parameters named ``bias``/``bias_mu``).
        generator: CPU source of the draws.

    Returns:
        1-D float tensor.
    """
    values: list[Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, _BayesianLayer):
            kinds = ["weight"] + (["bias"] if include_bias and module.bias_mu is not None else [])
            for kind in kinds:
                mu = getattr(module, f"{kind}_mu").detach().cpu().float()
                if num_samples > 0:
                    sigma = getattr(module, f"{kind}_sigma").detach().cpu().float()
                    eps = torch.randn((num_samples, *mu.shape), generator=generator)
                    values.append((mu + sigma * eps).flatten())
                else:
                    values.append(mu.flatten())
            continue
        for name, param in module.named_parameters(recurse=False):
            if include_bias or not name.startswith("bias"):
                values.append(param.detach().cpu().float().flatten())
    if not values:
        raise ValueError(f"`model` ({type(model).__name__}) has no weights to plot")
    return torch.cat(values)


def plot_weight_histograms(
    models: Mapping[str, nn.Module],
    num_samples: int = 0,
    snr: bool = False,
    include_bias: bool = True,
    bins: int = 100,
    value_range: tuple[float, float] | None = None,
    log_density: bool = False,
    generator: torch.Generator | None = None,
) -> Figure:
    """Histograms of the weights of several trained networks, overlaid (one line per method).

    Bayesian layers contribute their posterior means (or ``num_samples`` posterior draws per
    weight), plain networks their weights (:func:`model_weights`). With ``snr=True`` a second
    axes shows the signal-to-noise ratio ``|mu| / sigma`` in decibels of the models that have
    Bayesian layers, the quantity :func:`uq_box.nn.prune_by_snr` ranks weights by.

    Args:
        models: ``{method name: network}``.
        num_samples: posterior draws per Bayesian weight (0: the posterior means).
        snr: add the SNR histogram.
        include_bias: include the biases.
        bins: histogram bins.
        value_range: weight range of the histograms; default the central 99.8% of all weights.
        log_density: logarithmic density axis.
        generator: CPU source of the posterior draws.

    Returns:
        Figure with one axes (weights), or two with ``snr=True`` (weights, SNR).

    Raises:
        TypeError: ``models`` is not a mapping of names to ``nn.Module``.
        ValueError: ``models`` is empty, or ``snr=True`` and no model has a Bayesian layer.
    """
    _check_models(models)
    num_samples = non_negative_int(num_samples, "num_samples")
    weights = {
        name: model_weights(model, num_samples, include_bias, generator).numpy()
        for name, model in models.items()
    }
    snrs = _snr_decibels(models, include_bias) if snr else {}
    if value_range is None:
        everything = np.concatenate(list(weights.values()))
        low, high = np.quantile(everything, [0.001, 0.999])
        value_range = (float(low), float(high)) if high > low else (float(low) - 1, float(low) + 1)

    fig, axes = plt.subplots(
        1, 2 if snr else 1, figsize=(12 if snr else 7, 4.5), constrained_layout=True, squeeze=False
    )
    kind = f"{num_samples} posterior samples per weight" if num_samples else "posterior means"
    _draw_histograms(
        axes[0, 0], weights, "weight", f"Weights (Bayesian layers: {kind})", log_density,
        bins=bins, range=value_range,
    )  # fmt: skip
    if snr:
        finite = {name: values[values > -300] for name, values in snrs.items()}
        _draw_histograms(
            axes[0, 1], finite, "signal-to-noise ratio |mu| / sigma (dB)",
            "Signal-to-noise ratio of the Bayesian weights", log_density, bins=bins,
        )  # fmt: skip
    return fig


def _check_models(models: object) -> None:
    """Raise unless ``models`` is a non-empty mapping of names to ``nn.Module``."""
    if not isinstance(models, Mapping):
        raise TypeError(
            f"`models` must be a dict of name -> nn.Module, got {type(models).__name__}"
        )
    if not models:
        raise ValueError("`models` is empty; pass at least one {name: network}")
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"`models[{name!r}]` must be an nn.Module, got {type(model).__name__}")


def _snr_decibels(models: Mapping[str, nn.Module], include_bias: bool) -> dict[str, np.ndarray]:
    """``10 log10(|mu| / sigma)`` of every Bayesian weight, per model that has Bayesian layers."""
    snrs = {}
    for name, model in models.items():
        if any(isinstance(m, _BayesianLayer) for m in model.modules()):
            ratio = torch.cat([v.flatten().cpu() for v in weight_snr(model, include_bias).values()])
            snrs[name] = (10.0 * torch.log10(ratio.clamp_min(1e-30))).numpy()
    if not snrs:
        raise ValueError(
            f"`snr=True` needs a model with Bayesian layers; none of {list(models)} has one"
        )
    return snrs


def _draw_histograms(
    ax, values: dict[str, np.ndarray], xlabel: str, title: str, log_density: bool, **hist
) -> None:
    """One step histogram (a density) per model on ``ax``, with a legend."""
    for name, array in values.items():
        ax.hist(array, density=True, histtype="step", lw=1.5, label=name, **hist)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    if log_density:
        ax.set_yscale("log")
    ax.legend()
