"""Deep ensembles: Lakshminarayanan, Pritzel & Blundell 2017, "Simple and Scalable Predictive
Uncertainty Estimation using Deep Ensembles".

The members train together as one vectorized model (:class:`uq_box.nn.ensemble.StackedEnsemble`):
the loss is the sum of the members' losses, so each member's gradient is its own, and with an
elementwise optimizer (Adam, SGD) the fit equals ``M`` independent fits on the same batches. The
prediction is the mixture over members (variances, not standard deviations, are averaged).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from uq_box.checks import non_negative_int
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
)
from uq_box.nn.ensemble import stack_members


class DeepEnsemble(UQMethod):
    """Deep ensemble for any task mixin.

    Args:
        model: a network to copy ``num_members`` times with fresh random inits, or a list of
            (possibly trained) networks of one architecture.
        criterion: the data loss of each member (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        num_members: ensemble size ``M`` (5 when ``None`` and ``model`` is one network; the
            list's length when ``model`` is a list).
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_members: int | None = None,
        burnin_epochs: int = 0,
    ) -> None:
        ensemble = stack_members(model, num_members)
        super().__init__(ensemble, criterion, optimizer, lr_scheduler)
        self.num_members = ensemble.num_members
        self.num_mc_samples_test = ensemble.num_members
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])
        # the size actually stacked (also when given a list of members), so that
        # load_from_checkpoint(path, model=<one fresh network>) rebuilds M members
        self.hparams["num_members"] = self.num_members

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """Every member's output: ``[M, N, ...]`` (``num_samples`` is ignored)."""
        return self.model(x)

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Sum of the members' losses (each member's gradient is its own)."""
        terms, outputs = super().loss(x, target)
        return {**terms, "loss": terms["loss"] * self.num_members}, outputs


class DeepEnsembleRegression(RegressionTask, DeepEnsemble):
    """Deep ensemble for regression (default: heteroscedastic Gaussian NLL per member)."""


class DeepEnsembleClassification(ClassificationTask, DeepEnsemble):
    """Deep ensemble for classification (cross-entropy per member)."""
