"""SWAG: Maddox, Izmailov, Garipov, Vetrov & Wilson 2019, "A Simple Baseline for Bayesian
Uncertainty in Deep Learning".

Training is ordinary training on the data loss (``optimizer``, optionally a constant ``swa_lr``,
the paper's recipe). From epoch ``burnin_epochs`` on, every training epoch ends with a snapshot of
the chosen parameters ``theta`` (a flat vector of ``P`` numbers) into in-memory buffers:

- ``swag_mean``: the running mean ``theta_SWA`` (first moment);
- ``swag_sq_mean``: the running mean of ``theta ** 2`` (second moment, for the diagonal);
- ``swag_deviations`` ``[K, P]``: the deviations ``theta_i - theta_SWA`` of the last
  ``K = max_num_samples`` snapshots (the mean *after* snapshot ``i`` entered it, as in the
  paper's Algorithm 1), oldest first;
- ``swag_num_snapshots``: how many snapshots were taken.

They are registered buffers, so they follow the module's device and dtype and go into
checkpoints; nothing is read from disk to predict.

Prediction draws ``S`` parameter vectors from the SWAG Gaussian

``theta = theta_SWA + sqrt(scale) * (Sigma_diag^(1/2) z1 + D^T z2 / sqrt(K - 1))``,

``Sigma_diag = clamp(swag_sq_mean - theta_SWA^2, min=1e-30)``, ``z1 ~ N(0, I_P)``,
``z2 ~ N(0, I_K)``, with ``K`` the deviations stored so far; the covariance is
``scale * (Sigma_diag + D^T D / (K - 1))``. ``scale=0.5`` is the paper's sampling rule (its
``1/sqrt(2)`` factors). (The authors' code multiplies its own ``scale`` on top of that ``1/2``: its
``scale=1`` is ``scale=0.5`` here.) With fewer than 2 deviations only the diagonal part is used.

The ``S`` samples run as one vectorized call (``torch.func.vmap`` over
``torch.func.functional_call``): the chosen parameters are stacked ``[S, ...]``, every other
parameter and buffer is shared. Layers before the first stochastic one see no batched input, so
vmap runs them once, not ``S`` times. The model's own parameters are never changed by a prediction.

Choices (see :class:`SWAG`):

- ``burnin_epochs`` is the number of epochs of ordinary training before the first snapshot, as for
  SG-MCMC. SWAG has no separate burn-in *loss*: every epoch trains on the criterion (the
  regression task's MSE burn-in of other methods does not apply; ``in_burnin`` is always False).
  Otherwise the scale head of an NLL network would start to learn only in the collection epochs
  and the snapshots would mostly record that transient.
- Parameters outside ``stochastic_module_names`` keep their current (last trained) values in
  every sample, not their SWA average.
- Buffers such as BatchNorm running statistics keep their current values: the paper recomputes
  them for every sample with a pass over the training data, which a forward pass that reads no
  data cannot do.

Written here rather than taken from ``torch.optim.swa_utils`` (which keeps only the mean, as a
whole model copy): the second moment, the deviation matrix and the vectorized sampling over a
subset of the parameters are the method, and they are a few lines on flat buffers.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from uq_box.checks import (
    non_negative_finite,
    non_negative_int,
    positive_finite,
    positive_int,
)
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
)
from uq_box.methods.sampled import ParameterSampling
from uq_box.nn.convert import StochasticModuleNames

VARIANCE_FLOOR = 1e-30
"""Lower clamp of the diagonal variance ``second moment - mean^2`` (as in the authors' code)."""


class SWAG(ParameterSampling):
    """SWA-Gaussian for any task mixin.

    Args:
        model: the backbone.
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters (SGD with a high constant rate is the paper's
            recipe; Adam works too).
        lr_scheduler: callable taking the optimizer.
        stochastic_module_names: which parameters get a SWAG posterior: ``None`` = all; ints index
            the parameter-owning layers (``[-1]`` = last layer); strings are dotted module names.
            The others keep their current trained values at prediction.
        burnin_epochs: epochs of ordinary training (on the criterion) before the first snapshot;
            one snapshot is taken at the end of every later training epoch.
        max_num_samples: ``K``, the number of last snapshots whose deviations are kept (rank of
            the low-rank part).
        num_mc_samples_test: parameter samples per prediction.
        scale: covariance scale; ``0.5`` is the paper's sampling rule.
        swa_lr: if given, the constant learning rate of every optimizer step from epoch
            ``burnin_epochs`` on (it overrides the scheduler's rate in those epochs); ``None``
            leaves the rate to ``optimizer`` and ``lr_scheduler``.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        stochastic_module_names: StochasticModuleNames = None,
        burnin_epochs: int = 0,
        max_num_samples: int = 20,
        num_mc_samples_test: int = 30,
        scale: float = 0.5,
        swa_lr: float | None = None,
    ) -> None:
        super().__init__(model, criterion, optimizer, lr_scheduler)
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        self.max_num_samples = positive_int(max_num_samples, "max_num_samples")
        self.num_mc_samples_test = positive_int(num_mc_samples_test, "num_mc_samples_test")
        self.scale = non_negative_finite(scale, "scale")
        self.swa_lr = None if swa_lr is None else positive_finite(swa_lr, "swa_lr")

        first = self.select_parameters(stochastic_module_names)
        num_params = self.num_sampled_parameters
        like = {"dtype": first.dtype, "device": first.device}
        self.register_buffer("swag_mean", torch.zeros(num_params, **like))
        self.register_buffer("swag_sq_mean", torch.zeros(num_params, **like))
        self.register_buffer(
            "swag_deviations", torch.zeros(self.max_num_samples, num_params, **like)
        )
        self.register_buffer(
            "swag_num_snapshots", torch.zeros((), dtype=torch.long, device=first.device)
        )
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    # -- the SWAG moments ---------------------------------------------------------------------
    @property
    def num_snapshots(self) -> int:
        """Snapshots collected so far."""
        return int(self.swag_num_snapshots.item())

    @property
    def num_deviations(self) -> int:
        """Rows of ``swag_deviations`` in use: ``min(num_snapshots, max_num_samples)``."""
        return min(self.num_snapshots, self.max_num_samples)

    @torch.no_grad()
    def collect_snapshot(self) -> None:
        """Add the current parameters to the running moments and the deviation matrix."""
        theta = self.flat_parameters().to(self.swag_mean.dtype)
        n = self.num_snapshots
        self.swag_mean.mul_(n / (n + 1)).add_(theta / (n + 1))
        self.swag_sq_mean.mul_(n / (n + 1)).add_(theta**2 / (n + 1))
        deviation = theta - self.swag_mean
        if n < self.max_num_samples:
            self.swag_deviations[n].copy_(deviation)
        else:  # drop the oldest row, keep the order oldest first
            self.swag_deviations.copy_(
                torch.cat([self.swag_deviations[1:], deviation.unsqueeze(0)])
            )
        self.swag_num_snapshots.add_(1)

    @property
    def has_samples(self) -> bool:
        """Whether a snapshot was taken."""
        return self.num_snapshots > 0

    def no_samples_message(self) -> str:
        return (
            f"SWAG has no snapshot yet: snapshots are taken at the end of every training "
            f"epoch from epoch `burnin_epochs`={self.burnin_epochs} on, so train for more "
            f"than `burnin_epochs` epochs (trainer `max_epochs`) before predicting"
        )

    @torch.no_grad()
    def sample_parameters(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """``S`` flat parameter vectors ``[S, P]`` drawn from the SWAG Gaussian.

        ``theta_SWA + sqrt(scale) * (Sigma_diag^(1/2) z1 + D^T z2 / sqrt(K - 1))``; the low-rank
        term only with ``K >= 2`` stored deviations.

        Args:
            num_samples: ``S``.
            generator: source of the standard normal noise (the global one when ``None``).
        """
        self.check_samples()
        positive_int(num_samples, "num_samples")
        mean = self.swag_mean
        like = {"dtype": mean.dtype, "device": mean.device, "generator": generator}
        std = (self.swag_sq_mean - mean**2).clamp(min=VARIANCE_FLOOR).sqrt()
        noise = std * torch.randn(num_samples, mean.numel(), **like)
        k = self.num_deviations
        if k >= 2:
            z2 = torch.randn(num_samples, k, **like)
            noise = noise + z2 @ self.swag_deviations[:k] / math.sqrt(k - 1)
        return mean + math.sqrt(self.scale) * noise

    def swa_parameters(self) -> dict[str, Tensor]:
        """The SWA means of the chosen parameters, by name."""
        self.check_samples()
        return self.unflatten(self.swag_mean.clone())

    # -- uq_box hooks -------------------------------------------------------------------------
    def on_train_batch_begin(self, batch_idx: int) -> None:
        """Hold the learning rate at ``swa_lr`` in the collection epochs (when given)."""
        if self.swa_lr is None or self.current_epoch < self.burnin_epochs:
            return
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.swa_lr

    def on_train_epoch_done(self) -> None:
        """Take a snapshot at the end of every training epoch from epoch ``burnin_epochs`` on."""
        if self.current_epoch >= self.burnin_epochs:
            self.collect_snapshot()

    def on_train_done(self) -> None:
        """A ``fast_dev_run`` (smoke test) that ends before the first snapshot takes one."""
        if self.trainer.fast_dev_run and not self.has_samples:
            rank_zero_info(
                f"fast_dev_run: {type(self).__name__} took one snapshot of the current weights "
                f"(`burnin_epochs`={self.burnin_epochs} were not reached) so that testing and "
                f"the report run; its predictions have no epistemic part"
            )
            self.collect_snapshot()


class SWAGRegression(RegressionTask, SWAG):
    """SWAG for regression (default criterion: heteroscedastic Gaussian NLL, 2 outputs).

    Prediction is the Gaussian mixture over parameter samples: ``pred_uct^2 = aleatoric^2 +
    epistemic^2`` (see :func:`uq_box.methods.predictive.regression_predictive`).
    """


class SWAGClassification(ClassificationTask, SWAG):
    """SWAG for classification (default criterion: cross-entropy on the logits).

    The predictive is the mean of the sampled softmax probabilities; its entropy splits into the
    expected entropy (aleatoric) and the mutual information (epistemic).
    """


__all__ = ["SWAG", "SWAGClassification", "SWAGRegression"]
