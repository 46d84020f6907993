"""Optimizers: the stochastic-gradient MCMC samplers (SGLD, pSGLD, scale-adapted SGHMC)."""

from uq_box.optim.sgmcmc import SGHMC, SGLD, SGMCMCOptimizer

__all__ = ["SGHMC", "SGLD", "SGMCMCOptimizer"]
