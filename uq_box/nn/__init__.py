"""Bayesian layers (drop-in for ``torch.nn``), priors, KL and model conversion.

``import uq_box.nn as vinn`` gives the drop-in flow: ``vinn.Linear``, ``vinn.Conv2d`` and
``vinn.Module`` (whose ``.kl`` sums the KL of every Bayesian layer inside).
"""

from uq_box.nn.convert import parameter_layers, select_modules, to_bayesian
from uq_box.nn.dropin import Conv1d, Conv2d, Conv3d, Linear, Module
from uq_box.nn.dropout import MCDropout, to_mc_dropout
from uq_box.nn.ensemble import StackedEnsemble, stack_members
from uq_box.nn.graph import MCPlan, mc_plan
from uq_box.nn.kl import kl, kl_divergence
from uq_box.nn.layers import (
    BayesianConv1d,
    BayesianConv2d,
    BayesianConv3d,
    BayesianConvTranspose1d,
    BayesianConvTranspose2d,
    BayesianConvTranspose3d,
    BayesianLinear,
    BayesianModule,
)
from uq_box.nn.priors import Prior, ScaleMixtureNormal, mean_field_kl
from uq_box.nn.pruning import prune_by_snr, prune_random, pruning_curve, snr
from uq_box.nn.sampling import (
    MCState,
    SamplingModule,
    current_mc_state,
    mc_sampling,
    sample_forward,
)
from uq_box.nn.updating import posterior_as_prior

__all__ = [
    "BayesianConv1d",
    "BayesianConv2d",
    "BayesianConv3d",
    "BayesianConvTranspose1d",
    "BayesianConvTranspose2d",
    "BayesianConvTranspose3d",
    "BayesianLinear",
    "BayesianModule",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Linear",
    "MCDropout",
    "MCPlan",
    "MCState",
    "Module",
    "Prior",
    "SamplingModule",
    "ScaleMixtureNormal",
    "StackedEnsemble",
    "current_mc_state",
    "kl",
    "kl_divergence",
    "mc_plan",
    "mc_sampling",
    "mean_field_kl",
    "parameter_layers",
    "posterior_as_prior",
    "prune_by_snr",
    "prune_random",
    "pruning_curve",
    "sample_forward",
    "select_modules",
    "snr",
    "stack_members",
    "to_bayesian",
    "to_mc_dropout",
]
