"""DUE: van Amersfoort, Smith, Jesson, Key & Gal 2021, "On Feature Collapse and Deep Kernel
Learning for Single Forward Pass Uncertainty".

A spectral-normalized feature extractor (:func:`uq_box.nn.spectral.spectral_normalize` of the
chosen hidden layers, by default every ``nn.Linear`` and ``nn.Conv*d`` but the output layer)
with a sparse variational GP as its output layer (:class:`uq_box.nn.svgp.SparseVariationalGP`,
native torch, no gpytorch): the network's output layer (an ``nn.Linear`` on flat features) is
replaced by ``out_features`` independent GPs on its input features, sharing ``num_inducing``
inducing points. Everything (the feature extractor, the inducing points, the variational
distribution, the kernel hyperparameters and the regression noise) is trained jointly on the
ELBO.

**The ELBO**, exactly scaled as everywhere in uq_box (:func:`uq_box.losses.elbo_loss`): the
minibatch mean of the expected negative log-likelihood ``-E_q[log p(y_i | f(x_i))]`` times the
training set size ``N``, plus ``KL(q || p)`` of the inducing values, reported per point
(divided by ``N``); the terms ``nll`` (per point, summed over the regression targets) and
``kl`` (divided by ``N``) are logged too.

- Classification (:class:`DUEClassification`): a softmax likelihood on the ``C`` GP outputs. The
  expected log-likelihood is estimated by Monte Carlo: ``num_mc_samples_train`` draws
  ``[S, B, C]`` of the marginals ``q(f(x))`` (a tensor dimension, one network pass), through
  the criterion (cross-entropy). The prediction's ``logits`` are ``num_mc_samples_test`` such
  draws ``[S, N, C]``, so ``pred`` is the mean of the sampled softmaxes and ``pred_uct =
  aleatoric_uct + epistemic_uct`` (entropy, expected entropy, mutual information) as for every
  method; ``logit_var`` ``[N]`` is the GP's marginal variance averaged over the classes.
- Regression (:class:`DUERegression`): a Gaussian likelihood with a learned noise variance per
  target (:class:`uq_box.nn.svgp.GaussianLikelihood`, the criterion; the network gives one output
  per target). The expected log-likelihood is in closed form. The prediction is the Gaussian
  ``N(mean, var_f + sigma^2)``: ``pred`` the GP mean, ``epistemic_uct = sqrt(var_f)`` (the GP's
  uncertainty about the function), ``aleatoric_uct = sigma``; ``samples`` ``[S, N, T]`` are draws
  of ``f``.

**Initialization.** At the start of the first fit (:meth:`DUE.on_fit_begin`) the features of up
to ``num_init_points`` training points (the trainer's training loader, or the data module's, read
in eval mode) place the inducing points at their k-means centres, and set the kernels' length
scale to their mean pairwise distance (unless ``lengthscale`` is given), as in DUE. Under DDP
rank 0's initialization is broadcast. A fit resumed from a checkpoint, or a second fit, keeps the
inducing points it has (the flag ``initialized`` is a buffer). Without a loader the first training
batch initializes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from uq_box.checks import positive_finite, positive_int
from uq_box.losses import elbo_loss
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
    eval_mode,
    unpack_batch,
)
from uq_box.methods.predictive_classification import classification_predictive
from uq_box.methods.sngp import replace_output_layer
from uq_box.metrics.functional_quantiles import gaussian_quantiles
from uq_box.nn.graph import in_functorch_transform
from uq_box.nn.svgp import GaussianLikelihood, SparseVariationalGP

__all__ = ["DUE", "DUEClassification", "DUERegression"]


class _FeaturesReadyError(Exception):
    """Stops a forward pass once the GP layer's input is known."""


class DUE(UQMethod):
    """Spectral-normalized feature extractor with a sparse variational GP output layer.

    :class:`~uq_box.methods.stacked.StackedRuns` runs ``on_fit_begin`` run by run, so each run's
    inducing points come from its own training data.

    Args:
        model: the backbone; its output layer (an ``nn.Linear`` on flat features) becomes the GP,
            and its output is the method's (anything the network does after it is skipped).
        criterion: the likelihood (classification: cross-entropy; regression:
            :class:`uq_box.nn.svgp.GaussianLikelihood` with a noise per target) when ``None``.
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        output_layer: the layer replaced by the GP, an index of the parameter-owning layers or a
            dotted module name (default: the last).
        spectral_module_names: the layers to spectral-normalize, as ``stochastic_module_names``
            (``None``: every ``nn.Linear`` and ``nn.Conv*d`` but the output layer).
        coefficient: the bound ``c`` on each normalized layer's spectral norm (0.95 in DUE).
        n_power_iterations: power iteration steps per training step and layer.
        num_inducing: inducing points ``M`` of the GP.
        kernel: ``"rbf"``, ``"matern12"``, ``"matern32"`` or ``"matern52"``.
        lengthscale: the kernels' initial length scale; ``None``: the mean pairwise distance of
            the training features at initialization.
        num_init_points: training points whose features initialize the inducing points.
        num_mc_samples_train: draws of ``q(f)`` per training step (classification; the
            regression's expectation is in closed form).
        num_mc_samples_test: draws of ``q(f)`` per prediction (one network pass: the draws cost
            only the noise).
        num_training_points: ``N`` of the ELBO (read from the training loader when ``None``).
    """

    #: the initialization writes the GP's own parameters in place (stacked runs: per run)
    stackable_hooks: ClassVar[frozenset[str]] = frozenset({"on_fit_begin"})

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
        num_inducing: int = 20,
        kernel: str = "rbf",
        lengthscale: float | None = None,
        num_init_points: int = 1000,
        num_mc_samples_train: int = 10,
        num_mc_samples_test: int = 100,
        num_training_points: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        num_mc_samples_train = positive_int(num_mc_samples_train, "num_mc_samples_train")
        num_mc_samples_test = positive_int(num_mc_samples_test, "num_mc_samples_test")
        num_init_points = positive_int(num_init_points, "num_init_points")
        if lengthscale is not None:
            lengthscale = positive_finite(lengthscale, "lengthscale")
        if num_training_points is not None:
            num_training_points = positive_int(num_training_points, "num_training_points")
        head_name = replace_output_layer(
            model,
            output_layer,
            spectral_module_names,
            coefficient,
            n_power_iterations,
            "DUE",
            lambda head: SparseVariationalGP(
                head.in_features,
                head.out_features,
                num_inducing=num_inducing,
                kernel=kernel,
                lengthscale=1.0 if lengthscale is None else lengthscale,
            ),
        )
        if criterion is None:
            criterion = self.default_likelihood(model.get_submodule(head_name).out_features)
        super().__init__(model, criterion, optimizer, lr_scheduler)
        self.output_layer_name = head_name
        self.num_mc_samples_train = num_mc_samples_train
        self.num_mc_samples_test = num_mc_samples_test
        self.num_init_points = num_init_points
        self.fixed_lengthscale = lengthscale is not None
        self._num_training_points_given = num_training_points
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    def default_likelihood(self, num_outputs: int) -> nn.Module:
        """The task's likelihood for a GP with ``num_outputs`` outputs."""
        raise NotImplementedError

    @property
    def gp(self) -> SparseVariationalGP:
        """The GP output layer inside ``model``."""
        return self.model.get_submodule(self.output_layer_name)

    # -- the GP's marginals ----------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """The GP layer's input features ``[N, D]`` (the network stops there)."""
        captured: list[Tensor] = []

        def stop(module: nn.Module, args: tuple) -> None:
            captured.append(args[0])
            raise _FeaturesReadyError

        handle = self.gp.register_forward_pre_hook(stop)
        try:
            self.model(x)
        except _FeaturesReadyError:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"the network's forward pass never reached its GP layer {self.output_layer_name!r}"
            )
        return captured[0]

    def marginals(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and variance ``[N, O]`` of the GP outputs ``q(f(x))`` at inputs ``x``."""
        return self.gp.marginals(self.features(x))

    @staticmethod
    def draws(mean: Tensor, variance: Tensor, num_samples: int) -> Tensor:
        """``num_samples`` draws ``[S, N, O]`` of the independent marginals."""
        noise = torch.randn((num_samples, *mean.shape), dtype=mean.dtype, device=mean.device)
        return mean + variance.clamp_min(1e-12).sqrt() * noise

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """Draws ``[S, N, O]`` of the GP outputs from ``q(f(x))``."""
        mean, variance = self.marginals(x)
        return self.draws(mean, variance, num_samples)

    # -- training: the ELBO ------------------------------------------------------------------------
    def expected_nll(self, mean: Tensor, variance: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The minibatch mean of ``-E_q[log p(y | f)]`` per point, and the outputs ``[S, B, O]``
        that the running terms read.
        """
        raise NotImplementedError

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The negative ELBO per training point (``nll`` and ``kl / N`` as terms)."""
        # no loader at on_fit_begin: the first batch initializes (stacked runs, inside vmap,
        # have run on_fit_begin per run on their own loaders)
        if self.training and not in_functorch_transform() and not bool(self.gp.initialized):
            self.initialize_inducing_points([x])
        mean, variance = self.marginals(x)
        nll, outputs = self.expected_nll(mean, variance, target)
        kl = self.gp.kl_divergence()
        n = self.num_training_points
        return {"loss": elbo_loss(nll, kl, n), "nll": nll, "kl": kl / n}, outputs

    # -- initialization --------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_inducing_points(self, inputs: Iterable[Any]) -> None:
        """DUE's initialization from the features of up to ``num_init_points`` inputs (batches,
        dicts or tuples as the loaders give them; see the module doc). Under DDP rank 0's result
        is broadcast.
        """
        features, count = [], 0
        with eval_mode(self.model):
            for batch in inputs:
                x, _ = unpack_batch(batch)
                x = self._as_network_dtype(x.to(self.device))
                features.append(self.features(x).detach())
                count += len(x)
                if count >= self.num_init_points:
                    break
        if not features:
            raise ValueError("initializing the inducing points got no batches")
        gp = self.gp
        gp.initialize(torch.cat(features)[: self.num_init_points], not self.fixed_lengthscale)
        if self._trainer is not None and self.trainer.world_size > 1:
            z, raw = self.trainer.strategy.broadcast(
                (gp.inducing_points.detach().clone(), gp.raw_lengthscale.detach().clone()), src=0
            )
            gp.inducing_points.copy_(z.to(gp.inducing_points))
            gp.raw_lengthscale.copy_(raw.to(gp.raw_lengthscale))

    def on_fit_begin(self) -> None:
        """Initialize the inducing points from the training data, unless they are already (a
        resumed fit has them from its checkpoint, a second fit from the first).
        """
        if bool(self.gp.initialized):
            return
        loader = self.trainer.train_dataloader
        if loader is None and self.trainer.datamodule is not None:
            loader = self.trainer.datamodule.train_dataloader()
        if loader is not None:
            self.initialize_inducing_points(loader)

    # -- prediction --------------------------------------------------------------------------------
    def predict_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """The GP predictive of network-ready inputs; see the module doc."""
        mean, variance = self.marginals(x)
        return self.gp_predictive(mean, variance)

    def gp_predictive(self, mean: Tensor, variance: Tensor) -> dict[str, Tensor]:
        """The prediction contract's dict from the GP marginals ``[N, O]``."""
        raise NotImplementedError


class DUEClassification(ClassificationTask, DUE):
    """DUE classifier: a softmax likelihood on independent GPs per class; ``logits`` are draws
    from the GP posterior, ``logit_var`` the mean marginal variance; see
    :mod:`uq_box.methods.due`.
    """

    def default_likelihood(self, num_outputs: int) -> nn.Module:
        """Cross-entropy (the softmax likelihood)."""
        return nn.CrossEntropyLoss()

    def expected_nll(self, mean: Tensor, variance: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Monte Carlo over ``num_mc_samples_train`` draws of the logits, through the criterion."""
        draws = self.draws(mean, variance, self.num_mc_samples_train)
        return self.data_loss(draws, target), draws

    def gp_predictive(self, mean: Tensor, variance: Tensor) -> dict[str, Tensor]:
        """The contract from ``num_mc_samples_test`` draws, plus ``logit_var`` ``[N]``."""
        preds = classification_predictive(self.draws(mean, variance, self.num_mc_samples_test))
        preds["logit_var"] = variance.mean(-1)
        return preds


class DUERegression(RegressionTask, DUE):
    """DUE regression: independent GPs per target with a learned Gaussian noise; epistemic the
    GP's standard deviation, aleatoric the noise's; see :mod:`uq_box.methods.due`.
    """

    def default_likelihood(self, num_outputs: int) -> nn.Module:
        """:class:`~uq_box.nn.svgp.GaussianLikelihood` with a noise variance per target."""
        return GaussianLikelihood(num_targets=num_outputs)

    def check_criterion(self, criterion: nn.Module) -> None:
        """The likelihood must be a :class:`~uq_box.nn.svgp.GaussianLikelihood`."""
        if not isinstance(criterion, GaussianLikelihood):
            raise ValueError(
                f"`criterion` of DUERegression must be uq_box.nn.svgp.GaussianLikelihood (a "
                f"Gaussian likelihood with a learned noise, whose expectation under the GP is "
                f"in closed form), got {criterion!r}"
            )

    def expected_nll(self, mean: Tensor, variance: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Closed form, summed over the targets; the outputs are the means ``[1, B, T]``."""
        self.check_outputs(mean, target)
        expected = self.criterion.expected_log_prob(mean, variance, target)
        return -expected.sum(-1).mean(), mean.unsqueeze(0)

    def gp_predictive(self, mean: Tensor, variance: Tensor) -> dict[str, Tensor]:
        """Gaussian: GP mean, GP std (epistemic), noise std (aleatoric), draws of ``f``."""
        aleatoric_var = self.criterion.noise.to(mean.dtype).expand_as(mean)
        preds = {
            "pred": mean,
            "pred_uct": (aleatoric_var + variance).sqrt(),
            "epistemic_uct": variance.sqrt(),
            "aleatoric_uct": aleatoric_var.sqrt(),
            "samples": self.draws(mean, variance, self.num_mc_samples_test),
        }
        if self.quantile_levels is not None:  # the Gaussian predictive's quantiles
            preds["quantiles"] = gaussian_quantiles(mean, preds["pred_uct"], self.quantile_levels)
        return preds
