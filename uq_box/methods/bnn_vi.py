"""Bayes by Backprop: mean-field variational inference over (some of) the weights.

Blundell, Cornebise, Kavukcuoglu & Wierstra 2015, "Weight Uncertainty in Neural Networks".
The chosen layers become mean-field Gaussian (:func:`uq_box.nn.to_bayesian`); training minimizes
the negative ELBO with the exact scaling of :func:`uq_box.losses.elbo_loss`, and the ``S`` Monte
Carlo samples run as one batched forward (:func:`uq_box.nn.sample_forward`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.distributions import Distribution

from uq_box.checks import non_negative_int, positive_int
from uq_box.losses import elbo_loss
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
)
from uq_box.nn import kl_divergence, sample_forward, to_bayesian
from uq_box.nn.convert import StochasticModuleNames


class BNNVI(UQMethod):
    """Bayes by Backprop, for any task mixin.

    Args:
        model: the backbone; the layers named by ``stochastic_module_names`` are converted in place.
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        stochastic_module_names: which layers become Bayesian (ints index parameter-owning layers,
            strings name modules, ``None`` = all).
        prior: prior of the Bayesian weights (default ``Normal(0, 1)``).
        posterior_rho_init: initial ``rho`` of the posterior (``sigma = softplus(rho)``).
        estimator: ``"reparameterization"``, ``"local"`` (local reparameterization trick) or
            ``"flipout"`` (Wen et al. 2018).
        num_mc_samples_train: weight samples per training step.
        num_mc_samples_test: weight samples per prediction.
        beta: weight of the KL term (1 is the ELBO).
        burnin_epochs: epochs that fit only the mean (MSE) before the criterion takes over.
        num_training_points: ``N`` of the ELBO; read from the training loader when ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        stochastic_module_names: StochasticModuleNames = None,
        prior: Distribution | float | None = None,
        posterior_rho_init: float = -5.0,
        estimator: str = "reparameterization",
        num_mc_samples_train: int = 10,
        num_mc_samples_test: int = 50,
        beta: float = 1.0,
        burnin_epochs: int = 0,
        num_training_points: int | None = None,
    ) -> None:
        super().__init__(model, criterion, optimizer, lr_scheduler)
        self.num_mc_samples_train = positive_int(num_mc_samples_train, "num_mc_samples_train")
        self.num_mc_samples_test = positive_int(num_mc_samples_test, "num_mc_samples_test")
        if not beta >= 0:
            raise ValueError(f"`beta` must be non-negative, got {beta}")
        if num_training_points is not None:
            positive_int(num_training_points, "num_training_points")
        self.beta = beta
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        self._num_training_points_given = num_training_points
        self.model = to_bayesian(
            self.model,
            stochastic_module_names,
            prior=prior,
            posterior_rho_init=posterior_rho_init,
            estimator=estimator,
        )
        self.save_hyperparameters(
            ignore=["model", "criterion", "optimizer", "lr_scheduler", "prior"]
        )

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """``S`` weight samples in one batched forward: ``[S, N, ...]``."""
        return sample_forward(self.model, x, num_samples)

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Negative ELBO per training point; mean MSE instead of the criterion during burn-in."""
        return variational_loss(self, x, target, lambda: kl_divergence(self.model))


def variational_loss(
    method: UQMethod, x: Tensor, target: Tensor, kl: Callable[[], Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """The terms of a variational method's objective and its outputs ``[S, B, ...]``.

    The negative ELBO per training point (:func:`uq_box.losses.elbo_loss`): the data loss over
    ``num_mc_samples_train`` samples (the burn-in loss in the first ``burnin_epochs``) plus
    ``beta * kl() / N``; ``kl`` is called after the forward pass. Shared by Bayes by Backprop
    and the rank-1 BNN.
    """
    outputs = method.sample_outputs(x, method.num_mc_samples_train)
    nll = method.data_loss(outputs, target)
    data = method.burnin_loss(outputs, target) if method.in_burnin else nll
    divergence = kl()
    loss = elbo_loss(data, divergence, method.num_training_points, method.beta)
    return {"loss": loss, "nll": nll, "kl": divergence}, outputs


class BNNVIRegression(RegressionTask, BNNVI):
    """Bayes by Backprop for regression (default criterion: heteroscedastic Gaussian NLL).

    Prediction is the Gaussian mixture over weight samples: ``pred_uct^2 = aleatoric^2 +
    epistemic^2`` (see :func:`uq_box.methods.predictive.regression_predictive`).
    """


class BNNVIClassification(ClassificationTask, BNNVI):
    """Bayes by Backprop for classification (default criterion: cross-entropy on the logits).

    The predictive is the mean of the sampled softmax probabilities; its entropy splits into the
    expected entropy (aleatoric) and the mutual information (epistemic).
    """
