"""Monte Carlo dropout: Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation".

Dropout stays active at prediction and its ``S`` masks are a batch dimension
(:class:`uq_box.nn.MCDropout`); every other layer is in eval mode, so BatchNorm uses its running
statistics rather than the statistics of the Monte Carlo batch.
"""

from __future__ import annotations

from torch import Tensor, nn

from uq_box.checks import non_negative_int, positive_int
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
)
from uq_box.nn import sample_forward
from uq_box.nn.dropout import to_mc_dropout


class MCDropoutMethod(UQMethod):
    """MC dropout for any task mixin (the family base; the layer is :class:`uq_box.nn.MCDropout`).

    Args:
        model: the backbone with ``nn.Dropout`` layers (converted to MC dropout in place).
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        num_mc_samples_train: dropout masks per training step (1 is ordinary dropout training).
        num_mc_samples_test: dropout masks per prediction.
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_mc_samples_train: int = 1,
        num_mc_samples_test: int = 50,
        burnin_epochs: int = 0,
    ) -> None:
        super().__init__(to_mc_dropout(model), criterion, optimizer, lr_scheduler)
        self.num_mc_samples_train = positive_int(num_mc_samples_train, "num_mc_samples_train")
        self.num_mc_samples_test = positive_int(num_mc_samples_test, "num_mc_samples_test")
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """``S`` dropout masks in one batched forward: ``[S, N, ...]``."""
        return sample_forward(self.model, x, num_samples)


class MCDropoutRegression(RegressionTask, MCDropoutMethod):
    """MC dropout for regression (default: heteroscedastic Gaussian NLL, 2 outputs)."""


class MCDropoutClassification(ClassificationTask, MCDropoutMethod):
    """MC dropout for classification (cross-entropy; entropy / mutual-information split)."""
