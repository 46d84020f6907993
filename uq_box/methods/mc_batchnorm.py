"""MC BatchNorm: Teye, Azizpour & Smith 2018, "Bayesian Uncertainty Estimation for Batch
Normalized Deep Networks".

A network with BatchNorm trains as usual (each step normalizes with its mini-batch's statistics,
the running averages are kept for plain prediction). When training ends
(:meth:`~UQMethod.on_train_done`), the statistics of ``S = num_mc_samples_test`` random training
mini-batches are stored in every BatchNorm layer (:func:`uq_box.nn.mc_batchnorm.collect_batch_statistics`);
at prediction sample ``s`` normalizes with set ``s``. The ``S`` sets are the sample dimension of
one batched forward pass (:func:`uq_box.nn.sample_forward`; the BatchNorm layers are sampling
layers), and the split into aleatoric and epistemic parts is the task's, as for MC dropout: the
spread over the ``S`` batch compositions is the epistemic part.

The training loader should shuffle: the stored sets are the first ``S`` full-size batches of one
or more passes over it, so a shuffled loader gives random mini-batches of the training batch size
(as in the paper). Call :meth:`MCBatchNormMethod.collect_statistics` yourself to store the
statistics from other data (e.g. after loading weights trained elsewhere). Until statistics are
stored (validation during training), predictions use the running statistics: one sample,
``epistemic_uct = 0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from lightning import LightningDataModule
from torch import Tensor, nn

from uq_box.checks import non_negative_int, positive_int
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
    unpack_batch,
)
from uq_box.nn import sample_forward
from uq_box.nn.mc_batchnorm import (
    collect_batch_statistics,
    mc_batchnorm_layers,
    to_mc_batchnorm,
)


class MCBatchNormMethod(UQMethod):
    """MC BatchNorm for any task mixin (the family base; the layers are
    :class:`uq_box.nn.mc_batchnorm.MCBatchNorm2d` and its 1d/3d twins).

    Args:
        model: the backbone with ``nn.BatchNorm1d/2d/3d`` layers (converted in place, same
            parameters and names); a network without BatchNorm is refused.
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        num_mc_samples_test: ``S``, the sets of training batch statistics stored and used at
            prediction (one per sample).
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_mc_samples_test: int = 32,
        burnin_epochs: int = 0,
    ) -> None:
        num_samples = positive_int(num_mc_samples_test, "num_mc_samples_test")
        super().__init__(to_mc_batchnorm(model, num_samples), criterion, optimizer, lr_scheduler)
        self.num_mc_samples_test = num_samples
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    @property
    def statistics_collected(self) -> bool:
        """Whether every BatchNorm layer holds its ``S`` sets of batch statistics."""
        return all(int(m.num_collected) >= self.num_mc_samples_test for m in self._layers())

    def _layers(self) -> list:
        return mc_batchnorm_layers(self.model)

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """``S`` stored statistics sets in one batched forward ``[S, N, ...]``; before they are
        collected, the network with its running statistics ``[1, N, ...]``.
        """
        if not self.statistics_collected:
            return self.model(x).unsqueeze(0)
        return sample_forward(self.model, x, num_samples)

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The data loss of the plain network (BatchNorm on the training batch's statistics)."""
        outputs = self.model(x).unsqueeze(0)
        nll = self.data_loss(outputs, target)
        if self.in_burnin:
            return {"loss": self.burnin_loss(outputs, target), "nll": nll}, outputs
        return {"loss": nll, "nll": nll}, outputs

    def on_fit_begin(self) -> None:
        """Forget stored statistics: they belong to the weights before this fit."""
        for layer in self._layers():
            layer.num_collected.zero_()

    def on_train_done(self) -> None:
        """Store the statistics of ``S`` training mini-batches (rank 0's under DDP)."""
        self.collect_statistics(self.trainer.train_dataloader)
        if self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            for layer in self._layers():
                for name in ("sample_mean", "sample_var", "num_collected"):
                    buffer = getattr(layer, name)
                    buffer.copy_(strategy.broadcast(buffer, src=0))

    def collect_statistics(self, data: Any) -> None:
        """Store the batch statistics of ``S = num_mc_samples_test`` training mini-batches.

        Args:
            data: the training batches: a data loader (or any re-iterable of batches: dicts
                ``{"input", ...}``, tuples or input tensors) or a ``LightningDataModule`` (its
                ``train_dataloader()``). The first ``S`` batches of the first batch's size are
                used, over several passes if one pass has fewer; the loader should shuffle.

        Raises:
            ValueError: if ``data`` gives fewer than ``S`` full-size batches.
        """
        if isinstance(data, LightningDataModule):
            data = data.train_dataloader()
        count = collect_batch_statistics(self.model, self._full_batches(data))
        if count < self.num_mc_samples_test:
            raise ValueError(
                f"`data` gave {count} full-size batches; MC BatchNorm stores "
                f"num_mc_samples_test={self.num_mc_samples_test} sets of batch statistics: "
                f"pass a data loader (it is iterated again as needed) or lower num_mc_samples_test"
            )

    def _full_batches(self, data: Iterable) -> Iterator[Tensor]:
        size = None
        while True:
            found = 0
            for batch in data:
                x, _ = unpack_batch(batch)
                size = len(x) if size is None else size
                if len(x) < size:  # the short last batch of a pass
                    continue
                found += 1
                yield self._as_network_dtype(x.to(self.device))
            if found == 0:
                return


class MCBatchNormRegression(RegressionTask, MCBatchNormMethod):
    """MC BatchNorm for regression (default: heteroscedastic Gaussian NLL, 2 outputs)."""


class MCBatchNormClassification(ClassificationTask, MCBatchNormMethod):
    """MC BatchNorm for classification (cross-entropy; entropy / mutual-information split)."""
