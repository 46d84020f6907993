"""Bayesian layers (drop-in for ``torch.nn``), priors, KL and model conversion."""

from uq_box.nn.convert import parameter_layers, select_modules, to_bayesian
from uq_box.nn.kl import kl, kl_divergence
from uq_box.nn.layers import (
    BayesianConv1d,
    BayesianConv2d,
    BayesianConv3d,
    BayesianLinear,
    BayesianModule,
)
from uq_box.nn.priors import Prior, mean_field_kl
from uq_box.nn.sampling import MCState, current_mc_state, mc_sampling, sample_forward

__all__ = [
    "BayesianConv1d",
    "BayesianConv2d",
    "BayesianConv3d",
    "BayesianLinear",
    "BayesianModule",
    "MCState",
    "Prior",
    "current_mc_state",
    "kl",
    "kl_divergence",
    "mc_sampling",
    "mean_field_kl",
    "parameter_layers",
    "sample_forward",
    "select_modules",
    "to_bayesian",
]
