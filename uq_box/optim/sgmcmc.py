"""Stochastic-gradient MCMC samplers as ``torch.optim.Optimizer`` subclasses.

- :class:`SGLD`: stochastic gradient Langevin dynamics (Welling & Teh 2011, "Bayesian Learning via
  Stochastic Gradient Langevin Dynamics"); with ``preconditioned=True`` the RMSprop-preconditioned
  pSGLD of Li, Chen, Carlson & Carin 2016, "Preconditioned Stochastic Gradient Langevin Dynamics
  for Deep Neural Networks".
- :class:`SGHMC`: stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014) with the
  scale adaptation during burn-in of Springenberg, Klein, Falkner & Hutter 2016, "Bayesian
  Optimization with Robust Bayesian Neural Networks" (their Eq. 8-10, as in their code).

**Scaling convention.** Every sampler here draws the parameters from

``p(theta) ∝ exp(-U(theta))``,

where ``U`` is the loss whose gradient ``loss.backward()`` leaves in ``p.grad``. For a Bayesian
posterior that loss must be the negative log posterior *summed over the whole data set*:

``U(theta) = -sum_{i=1..N} log p(y_i | x_i, theta) - log p(theta)``,

estimated without bias from a minibatch ``B`` as ``N * mean_{i in B} NLL_i(theta) - log p(theta)``
(``N`` the training-set size). Passing the usual *mean* loss instead targets
``exp(-U / N)``-like densities: a posterior as wide as if there were one data point. No sampler
here knows ``N``; :class:`uq_box.methods.sgmcmc.SGMCMC` builds ``U`` from its criterion, ``N``
and its prior.

With ``lr = epsilon`` an SGLD step is exactly

``theta <- theta - (epsilon / 2) * grad U(theta) + sqrt(epsilon) * xi``,  ``xi ~ N(0, I)``.

It samples ``exp(-U)`` up to a discretization bias of order ``epsilon``: for a Gaussian of
precision ``lambda`` the stationary variance is ``1 / (lambda * (1 - epsilon * lambda / 4))``, so
``epsilon`` must be small against ``1 / lambda_max``; since ``lambda`` grows like ``N``, good step
sizes shrink like ``1 / N``.

Written here rather than taken from a library: the samplers are a few lines each, and no kept
PyTorch package offers them with this (full-data) scaling convention stated and tested.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from uq_box.checks import non_negative_int, number_in

EPS_SGHMC = 1e-16
"""Floor of the SGHMC scale estimates, as in the authors' code."""


def _adapts(step: int, num_burn_in_steps: int | None) -> bool:
    """Whether step ``step`` (0-based) of a parameter updates the adapted scales."""
    return num_burn_in_steps is None or step < num_burn_in_steps


class SGMCMCOptimizer(Optimizer):
    """Base of the samplers: ``step`` draws the next sample of ``exp(-U)`` from ``p.grad``.

    Subclasses implement :meth:`_update` for one parameter. A custom sampler used with
    :class:`uq_box.methods.sgmcmc.SGMCMC` subclasses this class, which says that the optimizer
    samples (a plain optimizer such as Adam would only find a mode).
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One sampler step; ``closure`` (re)computes ``U`` and its gradients, as in torch.optim.

        Returns:
            The closure's loss, if a closure was given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, p.grad, group, self.state[p])
        return loss

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict) -> None:
        raise NotImplementedError

    @property
    def adapting(self) -> bool:
        """Whether the next step may still change the sampler's own scales (its burn-in).

        A chain is a valid sampler only once this is False: samples collected before are biased.
        False for a sampler that adapts nothing, or that adapts for ever by design
        (``num_burn_in_steps=None`` of :class:`SGLD`).
        """
        for group in self.param_groups:
            burn_in = group.get("num_burn_in_steps")
            if not burn_in or ("preconditioned" in group and not group["preconditioned"]):
                continue
            for p in group["params"]:
                if self.state.get(p, {}).get("step", 0) < burn_in:
                    return True
        return False


class SGLD(SGMCMCOptimizer):
    """Stochastic gradient Langevin dynamics; preconditioned (pSGLD) with ``preconditioned=True``.

    Targets ``exp(-U)`` with ``U`` the loss in ``p.grad``: the negative log posterior summed over
    the data (see the module docstring for the scaling convention).

    SGLD: ``theta <- theta - (lr / 2) * grad U + sqrt(lr) * xi``.

    pSGLD (Li et al. 2016, Algorithm 1, with the ``Gamma`` correction dropped as the authors do in
    practice): ``V <- alpha * V + (1 - alpha) * grad U ** 2``, ``G = 1 / (eps + sqrt(V))`` and
    ``theta <- theta - (lr / 2) * G * grad U + sqrt(lr * G) * xi``. Two deliberate differences
    from the paper: ``V`` tracks the gradient of the *summed* ``U`` (the paper's ``V`` tracks the
    mean log-likelihood gradient, so its ``G`` is about ``N`` times larger: ``lr`` here is about
    ``N`` times the paper's for the same behaviour), and ``V`` starts at the first squared gradient
    rather than at zero (zero would make the first steps ``1 / sqrt(1 - alpha)`` times too large).
    By default (``num_burn_in_steps=None``, the paper) ``V`` keeps adapting while sampling. That
    makes the preconditioner depend on the recent path and, with ``Gamma`` dropped, biases the
    stationary distribution: on a strongly correlated 2-D Gaussian the covariance comes out about
    10-20% too large (the tests measure it). With ``num_burn_in_steps=k`` ``V`` adapts during the
    first ``k`` steps only and stays fixed afterwards; the chain is then SGLD with a constant
    diagonal preconditioner, ``Gamma`` is exactly zero and the samples after step ``k`` have the
    right distribution (up to the step-size bias). Collect samples only after those ``k`` steps.

    Args:
        params: parameters (or parameter groups) to sample.
        lr: step size ``epsilon`` (a scheduler may anneal it, the Robbins-Monro schedule of
            Welling & Teh; a constant small step is the usual practice).
        preconditioned: use the RMSprop preconditioner (pSGLD).
        alpha: decay of the squared-gradient average ``V`` (pSGLD only).
        eps: ``lambda`` of the paper, added to ``sqrt(V)`` (pSGLD only).
        num_burn_in_steps: steps during which ``V`` adapts (pSGLD only); ``None``: every step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        preconditioned: bool = False,
        alpha: float = 0.99,
        eps: float = 1e-5,
        num_burn_in_steps: int | None = None,
    ) -> None:
        lr = number_in(lr, "lr", 0.0)
        if num_burn_in_steps is not None:
            non_negative_int(num_burn_in_steps, "num_burn_in_steps")
        alpha = number_in(alpha, "alpha", 0.0, 1.0, closed="low")
        eps = number_in(eps, "eps", 0.0)
        if not isinstance(preconditioned, bool):
            raise TypeError(f"`preconditioned` must be a bool, got {preconditioned!r}")
        defaults = {
            "lr": lr,
            "preconditioned": preconditioned,
            "alpha": alpha,
            "eps": eps,
            "num_burn_in_steps": num_burn_in_steps,
        }
        super().__init__(params, defaults)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict) -> None:
        lr = group["lr"]
        noise = torch.randn_like(p)
        if not group["preconditioned"]:
            p.add_(grad, alpha=-0.5 * lr).add_(noise, alpha=math.sqrt(lr))
            return
        if not state:
            state["step"] = 0
            state["square_avg"] = grad.square()
        elif _adapts(state["step"], group["num_burn_in_steps"]):
            state["square_avg"].mul_(group["alpha"]).addcmul_(grad, grad, value=1 - group["alpha"])
        state["step"] += 1
        precond = 1.0 / (group["eps"] + state["square_avg"].sqrt())
        p.addcmul_(precond, grad, value=-0.5 * lr).addcmul_(precond.mul_(lr).sqrt_(), noise)


class SGHMC(SGMCMCOptimizer):
    """Scale-adapted SGHMC (Springenberg et al. 2016).

    Targets ``exp(-U)`` with ``U`` the loss in ``p.grad``: the negative log posterior summed over
    the data (see the module docstring). In the authors' reparameterization (their Eq. 10), with
    ``v`` the scaled momentum and ``M^-1 = 1 / sqrt(V_hat)`` a diagonal mass estimated from the
    squared gradients:

    ``v <- v - lr^2 * M^-1 * grad U - mdecay * v + N(0, 2 * lr^2 * mdecay * M^-1 - lr^4)``,
    ``theta <- theta + v``.

    During the first ``num_burn_in_steps`` steps of each parameter the running averages of the
    gradient ``g`` and of its square ``V_hat`` adapt, with the window ``tau`` of their Eq. 8-9;
    afterwards the mass stays fixed, so the chain is a valid sampler. The ``lr^4`` term removes
    the gradient noise estimated by ``V_hat`` (a small downward bias of the variance, of relative
    size ``lr^2 * sqrt(V_hat) / (2 * mdecay)``, when the gradient has no noise). With ``U``
    summed over the data this is the reference code's ``scale_grad = N``; ``lr`` means the same.

    Args:
        params: parameters (or parameter groups) to sample.
        lr: step size ``epsilon``.
        mdecay: momentum decay per step, the friction ``epsilon * M^-1 * C`` (0 < mdecay <= 1).
        num_burn_in_steps: steps of scale adaptation; collect samples only after them.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        mdecay: float = 0.05,
        num_burn_in_steps: int = 3000,
    ) -> None:
        lr = number_in(lr, "lr", 0.0)
        mdecay = number_in(mdecay, "mdecay", 0.0, 1.0, closed="high")
        non_negative_int(num_burn_in_steps, "num_burn_in_steps")
        defaults = {"lr": lr, "mdecay": mdecay, "num_burn_in_steps": num_burn_in_steps}
        super().__init__(params, defaults)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict) -> None:
        if not state:
            state["step"] = 0
            state["tau"] = torch.ones_like(p)
            state["g"] = torch.ones_like(p)
            state["v_hat"] = torch.ones_like(p)
            state["momentum"] = torch.zeros_like(p)
        state["step"] += 1
        lr, mdecay = group["lr"], group["mdecay"]
        tau, g, v_hat, momentum = state["tau"], state["g"], state["v_hat"], state["momentum"]
        if _adapts(state["step"] - 1, group["num_burn_in_steps"]):
            tau_inv = 1.0 / (tau + 1.0)
            tau.sub_(tau * g.square() / (v_hat + EPS_SGHMC)).add_(1.0)
            g.sub_(g * tau_inv).add_(tau_inv * grad)
            v_hat.sub_(v_hat * tau_inv).add_(tau_inv * grad.square())
        minv = 1.0 / (v_hat.sqrt() + EPS_SGHMC)
        noise_var = (2.0 * lr**2 * mdecay) * minv - lr**4
        noise_std = noise_var.clamp_(min=EPS_SGHMC).sqrt_()
        momentum.mul_(1.0 - mdecay).addcmul_(minv, grad, value=-(lr**2))
        momentum.addcmul_(noise_std, torch.randn_like(p))
        p.add_(momentum)


__all__ = ["SGHMC", "SGLD", "SGMCMCOptimizer"]
