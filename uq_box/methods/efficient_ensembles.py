"""Parameter-efficient ensembles: ``M`` members inside one network, as a tensor dimension.

Five families, each for regression and classification, built on the layers and conversions of
:mod:`uq_box.nn.efficient`; ``sample_outputs`` returns the members' outputs ``[M, N, ...]`` from
one batched forward (no Python loop over members), and the prediction is the mixture over
members, as for a deep ensemble:

- :class:`BatchEnsemble` (Wen, Tran & Ba 2020): shared weights with per-member rank-1 fast
  weights; the input is repeated ``M`` times (a folded batch ``[M * B, ...]``) in training and
  prediction; the loss is the mean over members.
- :class:`Rank1BNN` (Dusenberry et al. 2020): BatchEnsemble whose fast weights have a Gaussian
  posterior; trained on the negative ELBO with the exact scaling of Bayes by Backprop
  (:func:`uq_box.losses.elbo_loss`: data NLL mean ``+ beta KL / N``), the KL averaged over the
  ``M`` mixture components (an upper bound of the mixture's KL, so the loss bounds the negative
  ELBO). Each member draws ``num_mc_samples_*`` factor samples: ``S = M * K`` outputs.
- :class:`Masksembles` (Durasov et al. 2021): fixed binary channel masks with a chosen overlap
  (``scale``) after the chosen layers, the same in training and prediction.
- :class:`PackedEnsemble` (Laurent et al. 2023): ``M`` independent members of width
  ``alpha * C / M`` in grouped layers; no input repetition.
- :class:`MIMO` (Havasi et al. 2021): one network with ``M`` inputs and ``M`` outputs. In
  training member ``m`` sees its own shuffle of the batch (inputs concatenated on dimension 1,
  a share ``input_repetition`` of the rows shown to every member unshuffled), and its outputs
  are put back in batch order before the loss, so the loss is the mean of the members' losses on
  their own examples; in evaluation (validation, test, prediction) every member gets the same
  input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from uq_box.checks import non_negative_int, number_in, positive_int
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
)
from uq_box.methods.bnn_vi import variational_loss
from uq_box.nn.convert import StochasticModuleNames
from uq_box.nn.efficient import (
    FoldedEnsemble,
    MemberOutputs,
    MIMOEnsemble,
    rank1_kl,
    to_batch_ensemble,
    to_masksembles,
    to_mimo,
    to_packed_ensemble,
    to_rank1_bnn,
)

_IGNORED = ["model", "criterion", "optimizer", "lr_scheduler"]


class _MembersInOneNetwork(UQMethod):
    """Shared set-up: ``M`` checked before any conversion, every member predicts."""

    def _setup(self, model: nn.Module, num_members: int, burnin_epochs: int) -> None:
        self.model = model
        self.num_members = num_members
        self.num_mc_samples_train = num_members
        self.num_mc_samples_test = num_members
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """Every member's output from one forward: ``[M, N, ...]`` (``num_samples`` is
        ignored).
        """
        return self.model(x)


class BatchEnsemble(_MembersInOneNetwork):
    """BatchEnsemble (Wen, Tran & Ba 2020) for any task mixin.

    The chosen ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers become BatchEnsemble layers
    (:func:`uq_box.nn.efficient.to_batch_ensemble`: shared weight, per-member fast weights and
    biases); the other layers are shared. The network runs on the input repeated ``M`` times.

    Args:
        model: the backbone (converted in place).
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        num_members: ensemble size ``M``.
        stochastic_module_names: the layers whose members differ (ints index parameter-owning
            layers, strings name modules, ``None`` = every supported layer).
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_members: int = 4,
        stochastic_module_names: StochasticModuleNames = None,
        burnin_epochs: int = 0,
    ) -> None:
        super().__init__(model, criterion, optimizer, lr_scheduler)
        num_members = positive_int(num_members, "num_members")
        converted = to_batch_ensemble(self.model, num_members, stochastic_module_names)
        self._setup(FoldedEnsemble(converted, num_members), num_members, burnin_epochs)
        self.save_hyperparameters(ignore=_IGNORED)


class BatchEnsembleRegression(RegressionTask, BatchEnsemble):
    """BatchEnsemble for regression (default: heteroscedastic Gaussian NLL per member)."""


class BatchEnsembleClassification(ClassificationTask, BatchEnsemble):
    """BatchEnsemble for classification (cross-entropy per member)."""


class Rank1BNN(_MembersInOneNetwork):
    """Rank-1 Bayesian neural network (Dusenberry et al. 2020) for any task mixin.

    The chosen layers become rank-1 Bayesian layers
    (:func:`uq_box.nn.efficient.to_rank1_bnn`): a deterministic shared weight and, per member, a
    mean-field Gaussian over the input and output factors ``r`` and ``s``, drawn afresh for every
    point. Training minimizes the negative ELBO per training point (see the module docstring).

    Args:
        model: the backbone (converted in place).
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        num_members: mixture components ``M``.
        stochastic_module_names: the rank-1 layers (``None`` = every supported layer).
        prior: prior of every factor; a number ``s`` means ``Normal(1, s)`` (default
            ``Normal(1, 1)``).
        posterior_rho_init: initial ``rho`` of the factors (``sigma = softplus(rho)``).
        num_mc_samples_train: factor samples per member and training step.
        num_mc_samples_test: factor samples per member at prediction (``S = M * K`` outputs).
        beta: weight of the KL term (1 is the ELBO).
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
        num_training_points: ``N`` of the ELBO; read from the training loader when ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_members: int = 4,
        stochastic_module_names: StochasticModuleNames = None,
        prior: Distribution | float | None = None,
        posterior_rho_init: float = -3.0,
        num_mc_samples_train: int = 1,
        num_mc_samples_test: int = 1,
        beta: float = 1.0,
        burnin_epochs: int = 0,
        num_training_points: int | None = None,
    ) -> None:
        super().__init__(model, criterion, optimizer, lr_scheduler)
        num_members = positive_int(num_members, "num_members")
        num_mc_samples_train = positive_int(num_mc_samples_train, "num_mc_samples_train")
        num_mc_samples_test = positive_int(num_mc_samples_test, "num_mc_samples_test")
        if not beta >= 0:
            raise ValueError(f"`beta` must be non-negative, got {beta}")
        if num_training_points is not None:
            positive_int(num_training_points, "num_training_points")
        converted = to_rank1_bnn(
            self.model,
            num_members,
            stochastic_module_names,
            prior=prior,
            posterior_rho_init=posterior_rho_init,
        )
        self._setup(FoldedEnsemble(converted, num_members), num_members, burnin_epochs)
        self.num_mc_samples_train = num_mc_samples_train
        self.num_mc_samples_test = num_mc_samples_test
        self.beta = float(beta)
        self._num_training_points_given = num_training_points
        self.save_hyperparameters(ignore=[*_IGNORED, "prior"])

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """``num_samples`` factor draws per member in one forward: ``[M * K, N, ...]``,
        member-major.
        """
        return self.model(x, num_samples)

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Negative ELBO per training point; the burn-in loss replaces the NLL in burn-in."""
        return variational_loss(self, x, target, lambda: rank1_kl(self.model))


class Rank1BNNRegression(RegressionTask, Rank1BNN):
    """Rank-1 BNN for regression (Gaussian mixture over members and factor samples)."""


class Rank1BNNClassification(ClassificationTask, Rank1BNN):
    """Rank-1 BNN for classification (mean softmax over members and factor samples)."""


class Masksembles(_MembersInOneNetwork):
    """Masksembles (Durasov et al. 2021) for any task mixin.

    A :class:`uq_box.nn.efficient.MasksembleLayer` with ``M`` fixed binary channel masks goes
    after each chosen layer (:func:`uq_box.nn.efficient.to_masksembles`); the network runs on the
    input repeated ``M`` times, member ``m``'s copy under mask ``m``.

    Args:
        model: the backbone (converted in place).
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        num_members: masks ``M``.
        scale: overlap control, ``>= 1`` (1: equal masks; larger: less overlap, fewer channels
            per mask).
        stochastic_module_names: the layers whose outputs are masked (``None``: every
            ``Linear``/``Conv`` layer but the output layer).
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_members: int = 4,
        scale: float = 2.0,
        stochastic_module_names: StochasticModuleNames = None,
        burnin_epochs: int = 0,
    ) -> None:
        super().__init__(model, criterion, optimizer, lr_scheduler)
        num_members = positive_int(num_members, "num_members")
        converted = to_masksembles(self.model, num_members, scale, stochastic_module_names)
        self._setup(FoldedEnsemble(converted, num_members), num_members, burnin_epochs)
        self.save_hyperparameters(ignore=_IGNORED)


class MasksemblesRegression(RegressionTask, Masksembles):
    """Masksembles for regression (default: heteroscedastic Gaussian NLL per member)."""


class MasksemblesClassification(ClassificationTask, Masksembles):
    """Masksembles for classification (cross-entropy per member)."""


class PackedEnsemble(_MembersInOneNetwork):
    """Packed-Ensembles (Laurent et al. 2023) for any task mixin.

    Every layer of the backbone becomes its packed version
    (:func:`uq_box.nn.efficient.to_packed_ensemble`): ``M`` independent members of width
    ``alpha * C / M`` (in ``gamma`` groups each) as grouped layers, re-initialized; one forward of
    the plain batch gives all members.

    Args:
        model: the backbone (converted in place; ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and
            BatchNorm layers).
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        num_members: ensemble size ``M``.
        alpha: width factor of the packed network.
        gamma: groups per member.
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_members: int = 4,
        alpha: int = 2,
        gamma: int = 1,
        burnin_epochs: int = 0,
    ) -> None:
        super().__init__(model, criterion, optimizer, lr_scheduler)
        num_members = positive_int(num_members, "num_members")
        converted = to_packed_ensemble(self.model, num_members, alpha, gamma)
        self._setup(MemberOutputs(converted, num_members), num_members, burnin_epochs)
        self.save_hyperparameters(ignore=_IGNORED)


class PackedEnsembleRegression(RegressionTask, PackedEnsemble):
    """Packed-Ensembles for regression (default: heteroscedastic Gaussian NLL per member)."""


class PackedEnsembleClassification(ClassificationTask, PackedEnsemble):
    """Packed-Ensembles for classification (cross-entropy per member)."""


class MIMO(_MembersInOneNetwork):
    """MIMO, multi-input multi-output (Havasi et al. 2021), for any task mixin.

    The backbone's first layer takes ``M`` inputs concatenated on dimension 1 and its last layer
    gives ``M`` outputs (:func:`uq_box.nn.efficient.to_mimo`); see the module docstring for the
    training batches.

    Args:
        model: the backbone (first and last layer widened in place).
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        num_members: ensemble size ``M``.
        input_repetition: share of each training batch given to every member unshuffled (``rho``
            of the paper), in ``[0, 1]``.
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_members: int = 3,
        input_repetition: float = 0.0,
        burnin_epochs: int = 0,
    ) -> None:
        super().__init__(model, criterion, optimizer, lr_scheduler)
        num_members = positive_int(num_members, "num_members")
        self.input_repetition = number_in(
            input_repetition, "input_repetition", 0.0, 1.0, closed="low high"
        )
        converted = to_mimo(self.model, num_members)
        self._setup(MIMOEnsemble(converted, num_members), num_members, burnin_epochs)
        self.save_hyperparameters(ignore=_IGNORED)

    def shuffled_outputs(self, x: Tensor) -> Tensor:
        """Outputs ``[M, B, ...]`` of member ``m`` fed its own shuffle of the batch, put back in
        batch order (row ``b`` of every member is its output for ``x[b]``).
        """
        m, b = self.num_members, x.shape[0]
        order = torch.arange(b, device=x.device).expand(m, b).clone()
        free = (torch.rand(b, device=x.device) >= self.input_repetition).nonzero().squeeze(1)
        order[:, free] = free[torch.rand(m, free.numel(), device=x.device).argsort(1)]
        outputs = self.model.forward_members(x[order])  # member m row j: input x[order[m, j]]
        back = order.argsort(1)
        return outputs[torch.arange(m, device=x.device).unsqueeze(1), back]

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Mean of the members' losses on their own shuffles (training) or the same input."""
        outputs = self.shuffled_outputs(x) if self.training else self.sample_outputs(x, 1)
        nll = self.data_loss(outputs, target)
        if self.in_burnin:
            return {"loss": self.burnin_loss(outputs, target), "nll": nll}, outputs
        return {"loss": nll, "nll": nll}, outputs


class MIMORegression(RegressionTask, MIMO):
    """MIMO for regression (default: heteroscedastic Gaussian NLL per member)."""


class MIMOClassification(ClassificationTask, MIMO):
    """MIMO for classification (cross-entropy per member)."""
