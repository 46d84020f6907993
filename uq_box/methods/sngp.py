"""SNGP: Liu et al. 2020, "Simple and Principled Uncertainty Estimation with Deterministic Deep
Learning via Distance Awareness" (and Liu et al. 2023, JMLR).

One deterministic network, one forward pass: the hidden layers are spectral-normalized
(:func:`uq_box.nn.spectral.spectral_normalize`, so that distances in the input space survive into the
features) and the output layer is replaced by a Gaussian process with random Fourier features,
:class:`uq_box.nn.gp.RandomFeatureGP`. The network is trained as usual on the data loss plus the GP
prior's L2 penalty on the read-out weights, ``ridge_penalty * |beta|^2 / (2 N)`` per point (the
negative log posterior over ``N``); during every training epoch the GP's Laplace precision
``ridge_penalty I + sum_i w_i phi_i phi_i^T`` is accumulated from the random features of the
training batches, and reset at the start of the next epoch (the exact, momentum-free variant of
Liu et al.): after training it holds the last epoch. It is a buffer, so checkpoints carry it; under
DDP every step's increment is summed over the processes.

**The backbone** is any network whose output layer (``output_layer``, the last parameter-owning
layer by default) is an ``nn.Linear`` on flat features: that layer becomes a
``RandomFeatureGP`` with the same input and output widths, so the network you would train
deterministically (e.g. ``MLP(2, [64, 64], 2)``) is the SNGP backbone as it is.
``spectral_module_names`` chooses the layers to normalize like ``stochastic_module_names``
(``None``: every ``nn.Linear`` and ``nn.Conv*d`` before the output layer).

**Prediction** (``predict_step``) gives the GP posterior of the outputs at ``x``: the mean
``f(x)`` and the variance ``v(x) = phi(x)^T P^{-1} phi(x)``, the same for every output.

- Classification (:class:`SNGPClassification`): ``logits`` are ``S = num_mc_samples_test``
  draws from the Gaussian over the logits, ``N(f(x), v(x) I)``, and ``pred``, ``pred_uct``,
  ``aleatoric_uct`` and ``epistemic_uct`` come from them as for every method: ``epistemic_uct``
  is the mutual information of the draws, which grows with ``v(x)`` (far from the data).
  Two keys are added: ``pred_mean_field`` ``[N, C]``, the mean-field approximation of Liu et al.
  ``softmax(f(x) / sqrt(1 + lambda v(x)))`` with ``lambda = mean_field_factor`` (``pi / 8``), the
  paper's predictive probabilities without sampling, and ``logit_var`` ``[N]``, ``v(x)`` itself.
  The precision's curvature per point is ``p (1 - p)`` of the largest softmax probability.
- Regression (:class:`SNGPRegression`): a Gaussian predictive. ``pred`` is the GP mean of the
  mean output, ``epistemic_uct = sqrt(v(x))`` (the GP's uncertainty about the mean),
  ``aleatoric_uct`` the noise std: the network's scale output for the heteroscedastic ``NLL()``
  (the default; the scale output is a point estimate read out from the same random features),
  or the training RMSE for ``MSE()``; ``pred_uct`` the root of the sum of both variances;
  ``samples`` ``[S, N, T]`` draws of the mean. The precision's curvature per point is ``1 /
  sigma^2`` (the Gaussian likelihood's), so the covariance is that of Bayesian linear regression
  on the random features; ``v(x)`` tends to ``1 / ridge_penalty`` far from the data, in the
  units of the targets: standardize them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn

from uq_box.checks import non_negative_int, positive_finite, positive_int
from uq_box.losses import MSE, NLL
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
)
from uq_box.methods.predictive import criterion_mean_and_std
from uq_box.methods.predictive_classification import classification_predictive
from uq_box.metrics.functional_quantiles import gaussian_quantiles
from uq_box.nn.convert import parameter_layers
from uq_box.nn.gp import RandomFeatureGP
from uq_box.nn.spectral import SPECTRAL_TYPES, resolve_layer_names, spectral_normalize

__all__ = [
    "SNGP",
    "SNGPClassification",
    "SNGPRegression",
    "capture_input",
    "output_layer_name",
    "replace_output_layer",
    "spectral_normalize_backbone",
]


def output_layer_name(model: nn.Module, output_layer: int | str) -> str:
    """The dotted name of the layer ``output_layer`` picks (an index or a name)."""
    if isinstance(output_layer, bool) or not isinstance(output_layer, int | str):
        raise TypeError(
            f"`output_layer` must be a layer index (e.g. -1) or a module name, got {output_layer!r}"
        )
    (name,) = resolve_layer_names(model, [output_layer], "output_layer")
    return name


def spectral_normalize_backbone(
    model: nn.Module,
    spectral_module_names: Sequence[int] | Sequence[str] | None,
    head: str,
    coefficient: float,
    n_power_iterations: int,
) -> list[str]:
    """Spectral-normalize the chosen layers (``None``: every ``nn.Linear`` and ``nn.Conv*d``
    but the ``head``); the names are resolved before anything changes. Returns them.
    """
    if spectral_module_names is None:
        names = [
            name
            for name, module in parameter_layers(model)
            if type(module) in SPECTRAL_TYPES and name != head
        ]
    else:
        names = resolve_layer_names(model, spectral_module_names, "spectral_module_names")
        if head in names:
            raise ValueError(
                f"`spectral_module_names` names the output layer {head!r}; normalize the hidden "
                f"layers only"
            )
    if not names:
        return []
    try:
        return spectral_normalize(model, names, coefficient, n_power_iterations)
    except ValueError as error:
        message = str(error).replace("`module_names`", "`spectral_module_names`")
        raise ValueError(message) from None


def replace_output_layer(
    model: nn.Module,
    output_layer: int | str,
    spectral_module_names: Sequence[int] | Sequence[str] | None,
    coefficient: float,
    n_power_iterations: int,
    method: str,
    make_gp: Callable[[nn.Linear], nn.Module],
) -> str:
    """Spectral-normalize the backbone and put the GP layer ``make_gp(head)`` (on the head's
    device and dtype) in place of its ``nn.Linear`` output layer ``output_layer``, in place.

    Returns the output layer's dotted name; ``method`` names the caller in the errors.
    """
    head_name = output_layer_name(model, output_layer)
    head = model.get_submodule(head_name)
    if type(head) is not nn.Linear:
        raise ValueError(
            f"`output_layer` {head_name!r} is a {type(head).__name__}; {method} replaces an "
            f"nn.Linear output layer by its GP layer"
        )
    spectral_normalize_backbone(
        model, spectral_module_names, head_name, coefficient, n_power_iterations
    )
    gp = make_gp(head).to(head.weight.device, head.weight.dtype)
    parent, _, attribute = head_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, gp)
    return head_name


@contextmanager
def capture_input(module: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the first positional input of every call of ``module`` while the context is open."""
    captured: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


class SNGP(UQMethod):
    """Spectral-normalized network with a random-feature GP output layer (the family base).

    Args:
        model: the backbone; its output layer (an ``nn.Linear`` on flat features) becomes the GP.
        criterion: the data loss (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        output_layer: the layer replaced by the GP, an index of the parameter-owning layers or a
            dotted module name (default: the last).
        spectral_module_names: the layers to spectral-normalize, as ``stochastic_module_names``
            (``None``: every ``nn.Linear`` and ``nn.Conv*d`` but the output layer).
        coefficient: the bound ``c`` on each normalized layer's spectral norm.
        n_power_iterations: power iteration steps per training step and layer.
        num_features: random Fourier features ``D`` of the GP.
        lengthscale: the GP's RBF length scale on the hidden features.
        ridge_penalty: prior precision of the GP's read-out weights.
        mean_field_factor: ``lambda`` of the mean-field logits ``f / sqrt(1 + lambda v)``
            (classification).
        num_mc_samples_test: draws from the Gaussian over the outputs per prediction (one
            network pass: the draws cost only the noise).
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
        num_training_points: ``N`` of the L2 penalty (read from the training loader when
            ``None``).
    """

    #: the precision reset acts on the GP's own buffer (stacked runs: one vmap call)
    stackable_hooks: ClassVar[frozenset[str]] = frozenset({"on_train_batch_begin"})

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        output_layer: int | str = -1,
        spectral_module_names: Sequence[int] | Sequence[str] | None = None,
        coefficient: float = 0.95,
        n_power_iterations: int = 1,
        num_features: int = 1024,
        lengthscale: float = 1.0,
        ridge_penalty: float = 1.0,
        mean_field_factor: float = math.pi / 8,
        num_mc_samples_test: int = 100,
        burnin_epochs: int = 0,
        num_training_points: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        num_mc_samples_test = positive_int(num_mc_samples_test, "num_mc_samples_test")
        burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        mean_field_factor = positive_finite(mean_field_factor, "mean_field_factor")
        if num_training_points is not None:
            num_training_points = positive_int(num_training_points, "num_training_points")
        head_name = replace_output_layer(
            model,
            output_layer,
            spectral_module_names,
            coefficient,
            n_power_iterations,
            "SNGP",
            lambda head: RandomFeatureGP(
                head.in_features,
                head.out_features,
                num_features=num_features,
                lengthscale=lengthscale,
                ridge_penalty=ridge_penalty,
                bias=head.bias is not None,
            ),
        )
        super().__init__(model, criterion, optimizer, lr_scheduler)
        self.output_layer_name = head_name
        self.num_mc_samples_test = num_mc_samples_test
        self.burnin_epochs = burnin_epochs
        self.mean_field_factor = mean_field_factor
        self._num_training_points_given = num_training_points
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    @property
    def gp(self) -> RandomFeatureGP:
        """The GP output layer inside ``model``."""
        return self.model.get_submodule(self.output_layer_name)

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """The GP's posterior mean outputs as one sample: ``[1, N, ...]`` (training's outputs)."""
        return self.model(x).unsqueeze(0)

    # -- training: the L2 prior of the read-out weights, the precision of the last epoch --------
    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The data loss plus ``ridge_penalty |beta|^2 / (2 N)``; in training, the batch's
        random features join the GP precision.
        """
        with capture_input(self.gp) as hidden:
            terms, outputs = super().loss(x, target)
        beta = self.gp.output.weight
        penalty = self.gp.ridge_penalty * beta.square().sum() / (2 * self.num_training_points)
        terms = {**terms, "loss": terms["loss"] + penalty}
        if self.training:
            self._update_precision(hidden[-1], outputs[0])
        return terms, outputs

    def precision_weights(self, outputs: Tensor) -> Tensor:
        """The loss's curvature ``w_i`` per point ``[N]`` of the outputs ``[N, ...]``."""
        raise NotImplementedError

    @torch.no_grad()
    def _update_precision(self, hidden: Tensor, outputs: Tensor) -> None:
        gp = self.gp
        increment = gp.precision_increment(
            gp.random_features(hidden.detach()), self.precision_weights(outputs.detach())
        )
        if self._trainer is not None and self.trainer.world_size > 1:
            increment = self.trainer.strategy.reduce(increment, reduce_op="sum")
        gp.precision.add_(increment)

    def on_train_batch_begin(self, batch_idx: int) -> None:
        """Reset the GP precision at the start of every training epoch."""
        if batch_idx == 0:
            self.gp.reset_precision()

    # -- prediction: the GP posterior at x ---------------------------------------------------------
    def gp_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The GP's mean outputs ``[N, O]`` and predictive variance ``[N]`` at inputs ``x``."""
        with capture_input(self.gp) as hidden:
            outputs = self.model(x)
        features = self.gp.random_features(hidden[-1])
        return outputs, self.gp.predictive_variance(features)

    def predict_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """The GP predictive of network-ready inputs; see the module doc."""
        outputs, variance = self.gp_outputs(x)
        return self.gp_predictive(outputs, variance)

    def gp_predictive(self, outputs: Tensor, variance: Tensor) -> dict[str, Tensor]:
        """The prediction contract's dict from the GP mean outputs and variance."""
        raise NotImplementedError


class SNGPClassification(ClassificationTask, SNGP):
    """SNGP classifier: logits drawn from the GP posterior, plus the mean-field probabilities
    (``pred_mean_field``) and the logit variance (``logit_var``); see :mod:`uq_box.methods.sngp`.
    """

    def precision_weights(self, outputs: Tensor) -> Tensor:
        """``p (1 - p)`` of the largest softmax probability (Liu et al.'s implementation)."""
        p = outputs.softmax(-1).max(-1).values
        return p * (1 - p)

    def gp_predictive(self, outputs: Tensor, variance: Tensor) -> dict[str, Tensor]:
        """Draws ``N(f, v I)`` of the logits through the contract, plus the mean field."""
        std = variance.clamp_min(0).sqrt()[:, None]
        noise = torch.randn(
            (self.num_mc_samples_test, *outputs.shape), dtype=outputs.dtype, device=outputs.device
        )
        preds = classification_predictive(outputs + std * noise)
        scale = (1 + self.mean_field_factor * variance).sqrt()[:, None]
        preds["pred_mean_field"] = (outputs / scale).softmax(-1)
        preds["logit_var"] = variance
        return preds


class SNGPRegression(RegressionTask, SNGP):
    """SNGP regression: Gaussian predictive, GP variance of the mean as the epistemic part and
    the noise head (``NLL()``) or the training RMSE (``MSE()``) as the aleatoric part; see
    :mod:`uq_box.methods.sngp`.
    """

    def check_criterion(self, criterion: nn.Module) -> None:
        """A Gaussian likelihood: ``uq_box.losses.NLL`` or ``MSE`` (raw mean outputs)."""
        if not isinstance(criterion, NLL | MSE):
            raise ValueError(
                f"`criterion` of SNGPRegression must be uq_box.losses.NLL() or MSE() (a Gaussian "
                f"likelihood of the GP's mean output), got {criterion!r}"
            )

    def _noise_std(self, outputs: Tensor) -> Tensor:
        means, stds = criterion_mean_and_std(self.criterion, outputs)
        if stds is None:
            return self.noise_std.to(means.dtype).expand_as(means)
        return stds

    def precision_weights(self, outputs: Tensor) -> Tensor:
        """``1 / sigma^2`` of the Gaussian likelihood, averaged over the targets."""
        return self._noise_std(outputs).square().reciprocal().mean(-1)

    def gp_predictive(self, outputs: Tensor, variance: Tensor) -> dict[str, Tensor]:
        """Gaussian: GP mean, GP std of the mean (epistemic), noise std (aleatoric)."""
        means, _ = criterion_mean_and_std(self.criterion, outputs)
        aleatoric_var = self._noise_std(outputs).square()
        epistemic_var = variance.clamp_min(0)[:, None].expand_as(means)
        noise = torch.randn(
            (self.num_mc_samples_test, *means.shape), dtype=means.dtype, device=means.device
        )
        preds = {
            "pred": means,
            "pred_uct": (aleatoric_var + epistemic_var).sqrt(),
            "epistemic_uct": epistemic_var.sqrt(),
            "aleatoric_uct": aleatoric_var.sqrt(),
            "samples": means + epistemic_var.sqrt() * noise,
        }
        if self.quantile_levels is not None:  # the Gaussian predictive's quantiles
            preds["quantiles"] = gaussian_quantiles(means, preds["pred_uct"], self.quantile_levels)
        return preds
