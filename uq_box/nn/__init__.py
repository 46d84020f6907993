"""Bayesian layers (drop-in for ``torch.nn``), priors, KL and model conversion."""

from uq_box.nn.convert import parameter_layers, select_modules, to_bayesian
from uq_box.nn.dropout import MCDropout, to_mc_dropout
from uq_box.nn.ensemble import StackedEnsemble, stack_members
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
    "MCDropout",
    "MCState",
    "Prior",
    "StackedEnsemble",
    "current_mc_state",
    "kl",
    "kl_divergence",
    "mc_sampling",
    "mean_field_kl",
    "parameter_layers",
    "sample_forward",
    "select_modules",
    "stack_members",
    "to_bayesian",
    "to_mc_dropout",
]
