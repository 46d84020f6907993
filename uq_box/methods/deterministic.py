"""Deterministic baselines and mean-variance estimation.

MVE: Nix & Weigend 1994, "Estimating the mean and variance of the target probability
distribution": one network outputs a mean and a scale, trained with the Gaussian NLL after a
burn-in on the MSE of the mean.
"""

from __future__ import annotations

from torch import Tensor, nn

from uq_box.checks import non_negative_int
from uq_box.losses import MSE, Likelihood
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
)


class Deterministic(UQMethod):
    """One network, one forward pass; the data loss (``burnin_epochs`` of burn-in loss first).

    Args:
        model: the backbone.
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        burnin_epochs: int = 0,
    ) -> None:
        super().__init__(model, criterion, optimizer, lr_scheduler)
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """The single output as one sample: ``[1, N, ...]``."""
        return self.model(x).unsqueeze(0)


class DeterministicRegression(RegressionTask, Deterministic):
    """Plain regression on the MSE; its aleatoric std is the training RMSE (homoscedastic)."""

    def default_criterion(self) -> nn.Module:
        """Mean squared error (1 output per target)."""
        return MSE()


class MVERegression(RegressionTask, Deterministic):
    """Mean-variance estimation: a mean and a scale output, Gaussian NLL (default ``NLL()``).

    Any heteroscedastic likelihood family of :mod:`uq_box.losses` may replace the Gaussian:
    ``NLL(beta=0.5)`` (beta-NLL), ``StudentTNLL()``, ``LaplaceNLL()``, ``LogNormalNLL()`` (the
    network then gives that family's ``num_outputs`` per target), or ``MultivariateNLL()``, a
    full covariance over the ``T`` targets (``T (T + 3) / 2`` outputs per point).
    """

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must predict a noise level: a likelihood family, not a fixed-std NLL."""
        super().check_criterion(criterion)
        if not isinstance(criterion, Likelihood) or getattr(criterion, "std", None) is not None:
            raise ValueError(
                f"`criterion` of MVERegression must be a heteroscedastic uq_box.losses.NLL() or "
                f"another likelihood family of uq_box.losses (StudentTNLL(), LaplaceNLL(), "
                f"LogNormalNLL(), ...), got {criterion!r}"
            )


class DeterministicClassification(ClassificationTask, Deterministic):
    """Plain classifier on the cross-entropy; its uncertainty is the softmax entropy only."""
