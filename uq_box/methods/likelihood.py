"""One network with a richer likelihood: mixture density networks and deep evidential regression.

Both are deterministic networks (:class:`~uq_box.methods.deterministic.Deterministic`: one forward
pass, ``S = 1``) whose criterion reads the outputs as a distribution other than one Gaussian:

- :class:`MDNRegression`: a mixture of ``K`` Gaussians per target (Bishop 1994, "Mixture Density
  Networks"), :class:`~uq_box.losses.GaussianMixtureNLL`. The prediction contract's moments are
  the mixture's: ``pred`` its mean, ``aleatoric_uct`` its total standard deviation (the spread of
  the components' means included: for one network it is all noise), ``epistemic_uct = 0``. The
  ``nll`` metric scores the mixture's density, so a bimodal predictive is not judged as the
  Gaussian of its moments (``nll_gaussian``).
- :class:`DERRegression`: deep evidential regression (Amini et al. 2020, "Deep Evidential
  Regression"), :class:`~uq_box.losses.NormalInverseGammaNLL`: a Normal-inverse-gamma
  ``(gamma, nu, alpha, beta)`` per target; ``pred = gamma``, aleatoric variance
  ``beta / (alpha - 1)``, epistemic variance ``beta / (nu (alpha - 1))``; the predictive density
  (``nll``) is the Student-t marginal with ``2 alpha`` degrees of freedom.

The other likelihood families (Student-t, Laplace, log-normal, beta-NLL) need no class of their
own: pass them as the ``criterion`` of any regression method, e.g.
``MVERegression(model, criterion=StudentTNLL())``.
"""

from __future__ import annotations

from torch import nn

from uq_box.checks import non_negative_finite, positive_int
from uq_box.losses import GaussianMixtureNLL, NormalInverseGammaNLL
from uq_box.methods.base import LRSchedulerCallable, OptimizerCallable, RegressionTask
from uq_box.methods.deterministic import Deterministic

__all__ = ["DERRegression", "MDNRegression"]


class MDNRegression(RegressionTask, Deterministic):
    """Mixture density network: ``K`` Gaussian components per target, ``3 K`` outputs each.

    See the module docstring for the uncertainty split. ``burnin_epochs`` trains the mixture's
    mean on the MSE first.

    Args:
        model: the backbone, with ``3 K`` outputs per target (logits, means, scales).
        num_components: ``K >= 1``, the Gaussian components.
        criterion: ``GaussianMixtureNLL(num_components)`` when ``None``; one given must be a
            :class:`~uq_box.losses.GaussianMixtureNLL` with ``num_components`` components.
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        burnin_epochs: epochs trained on the MSE of the mixture mean.
        min_std: floor of each component's std (for the default criterion).
    """

    def __init__(
        self,
        model: nn.Module,
        num_components: int = 2,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        burnin_epochs: int = 0,
        min_std: float = 1e-6,
    ) -> None:
        num_components = positive_int(num_components, "num_components")
        min_std = non_negative_finite(min_std, "min_std")
        if criterion is None:
            criterion = GaussianMixtureNLL(num_components, min_std=min_std)
        elif isinstance(criterion, GaussianMixtureNLL) and (
            criterion.num_components != num_components
        ):
            raise ValueError(
                f"`criterion` has {criterion.num_components} components but `num_components` "
                f"is {num_components}; give the same number"
            )
        super().__init__(model, criterion, optimizer, lr_scheduler, burnin_epochs)
        self.num_components = num_components
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must be a Gaussian mixture NLL."""
        super().check_criterion(criterion)
        if not isinstance(criterion, GaussianMixtureNLL):
            raise ValueError(
                f"`criterion` of MDNRegression must be a uq_box.losses.GaussianMixtureNLL, got "
                f"{criterion!r}"
            )


class DERRegression(RegressionTask, Deterministic):
    """Deep evidential regression: a Normal-inverse-gamma per target, 4 outputs each.

    The loss is the NIG negative log-likelihood plus ``coeff`` times the evidence regularizer
    ``|y - gamma| (2 nu + alpha)`` (:class:`~uq_box.losses.NormalInverseGammaNLL`). One network,
    yet ``epistemic_uct = sqrt(beta / (nu (alpha - 1))) > 0``: the evidential model's own
    estimate of the uncertainty of the mean, not a spread over samples (``samples`` holds the
    one ``gamma``).

    Args:
        model: the backbone, with 4 outputs per target (gamma, nu, alpha, beta).
        coeff: ``lambda``, the weight of the evidence regularizer (for the default criterion).
        criterion: ``NormalInverseGammaNLL(coeff)`` when ``None``; one given must be a
            :class:`~uq_box.losses.NormalInverseGammaNLL`.
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        burnin_epochs: epochs trained on the MSE of ``gamma``.
    """

    def __init__(
        self,
        model: nn.Module,
        coeff: float = 0.01,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        burnin_epochs: int = 0,
    ) -> None:
        coeff = non_negative_finite(coeff, "coeff")
        if criterion is None:
            criterion = NormalInverseGammaNLL(coeff)
        super().__init__(model, criterion, optimizer, lr_scheduler, burnin_epochs)
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must be a Normal-inverse-gamma NLL."""
        super().check_criterion(criterion)
        if not isinstance(criterion, NormalInverseGammaNLL):
            raise ValueError(
                f"`criterion` of DERRegression must be a uq_box.losses.NormalInverseGammaNLL, "
                f"got {criterion!r}"
            )
