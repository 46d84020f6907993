"""Stochastic-gradient MCMC: SGLD (Welling & Teh 2011), preconditioned SGLD (Li et al. 2016) and
scale-adapted SGHMC (Springenberg et al. 2016), for regression and classification.

The sampler is the ``optimizer`` (one name for one idea): a callable taking the parameters that
builds a :class:`uq_box.optim.SGMCMCOptimizer`, e.g. ``partial(SGLD, lr=1e-4)``,
``partial(SGLD, lr=1e-2, preconditioned=True)`` or ``partial(SGHMC, lr=1e-2)``. A plain optimizer
(Adam, SGD) is refused: it would find a mode, not sample the posterior.

The same methods with the sampler fixed, under the names users look for: :class:`SGLDRegression`
/ :class:`SGLDClassification` (plain SGLD), :class:`PSGLDRegression` /
:class:`PSGLDClassification` (preconditioned SGLD) and :class:`SGHMCRegression` /
:class:`SGHMCClassification` (scale-adapted SGHMC). They take the sampler's hyperparameters
(``lr``, ...) as their own arguments and every other argument of :class:`SGMCMC` by keyword;
``SGLDRegression(net, lr=1e-4, ...)`` is ``SGMCMCRegression(net, optimizer=partial(SGLD,
lr=1e-4), ...)``, number for number.

**The loss the sampler sees.** The samplers draw ``theta ~ exp(-U(theta))`` with ``U`` the loss
whose gradient is in ``p.grad`` (see :mod:`uq_box.optim.sgmcmc`). :meth:`SGMCMC.training_step`
returns exactly

``U(theta) = N * criterion(f_theta(x_B), y_B) - log p(theta)``,

the negative log posterior summed over the ``N`` training points, estimated from the minibatch
``B`` (the criterion is the *mean* per-point negative log-likelihood, e.g.
:class:`uq_box.losses.NLL` or ``nn.CrossEntropyLoss``; ``-log p(theta)`` is the log density of
``prior`` summed over every sampled parameter, constants included). ``N`` is
``num_training_points``, read from the training loader when not given (the training set size
across all processes). What is logged as ``loss`` is ``U / N``, per data point, as for the ELBO.
A mean-only criterion such as :class:`uq_box.losses.MSE` is read as a negative log-likelihood too:
``exp(-(y - f)^2)`` is a Gaussian likelihood of noise variance 1/2; for a known noise level use
``NLL(std=...)`` with a 1-output network, or a 2-output network with ``NLL()``.

**Samples.** From epoch ``burnin_epochs`` on, the sampled parameters are copied after every
``thinning``-th training step (sampler step) into the buffer ``sgmcmc_samples``
``[max_num_samples, P]``, a ring that keeps the last ``max_num_samples``; ``sgmcmc_num_collected``
counts them all and ``sgmcmc_num_steps`` the training steps since burn-in (so thinning keeps its
phase across a checkpoint resume). They are registered buffers: they follow the module's device
and go into checkpoints; nothing is read from disk to predict.

**Prediction** runs the stored samples as one vectorized call (``torch.func.vmap`` over
``torch.func.functional_call``) through :meth:`SGMCMC.sample_outputs`, as SWAG does: the sampled
parameters are stacked ``[S, ...]``, every other parameter and buffer is shared, and layers before
the first sampled one run once. Predicting changes no parameter.

Choices:

- ``stochastic_module_names`` (resolved by
  :func:`uq_box.methods.sampled.sampled_parameter_names`; any layer type) picks the sampled
  parameters; ``None`` samples all. Only they are given to the sampler and carry the prior:
  every other parameter *stays at its value* (its initial or pretrained value), which makes the
  sampled layers a Bayesian model on fixed features. Use a pretrained backbone (or ``None``) when
  the other layers should be fitted.
- The regression task's MSE burn-in loss does not apply (``in_burnin`` is always False): burn-in
  epochs run the same sampler on the same ``U``, only no sample is kept. An adaptive sampler (SGHMC,
  pSGLD with ``num_burn_in_steps``) should finish adapting within the burn-in epochs; a warning
  says when samples are collected while it still adapts.
- Buffers such as BatchNorm running statistics keep their current values in every sample.
- Before the first sample, validation metrics use the network as it is; prediction and testing
  fail with a clear error.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributions import Distribution

from uq_box.checks import non_negative_int, positive_int
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
)
from uq_box.methods.sampled import ParameterSampling
from uq_box.nn.convert import StochasticModuleNames
from uq_box.nn.priors import Prior
from uq_box.optim.sgmcmc import SGHMC, SGLD, SGMCMCOptimizer


class SGMCMC(ParameterSampling):
    """Posterior sampling by stochastic-gradient MCMC, for any task mixin.

    Args:
        model: the backbone.
        criterion: the mean per-point negative log-likelihood (task default when ``None``).
        optimizer: the sampler, a callable taking the parameters and returning a
            :class:`uq_box.optim.SGMCMCOptimizer` (default pSGLD,
            ``partial(SGLD, lr=1e-3, preconditioned=True)``; the step size depends on the
            problem, and shrinks as ``N`` grows).
        lr_scheduler: callable taking the sampler (e.g. to anneal the SGLD step size).
        stochastic_module_names: which parameters are sampled: ``None`` = all; ints index the
            parameter-owning layers (``[-1]`` = last layer); strings are dotted module names.
            The others stay at their values (see the module docstring).
        prior: prior of every sampled parameter, elementwise (default ``Normal(0, 1)``; a number
            ``s`` means ``Normal(0, s)``).
        burnin_epochs: epochs of sampling before the first sample is kept.
        thinning: keep the parameters after every ``thinning``-th training step after burn-in.
        max_num_samples: how many samples are kept (the last ones).
        num_mc_samples_test: samples per prediction, evenly spaced over the kept ones (oldest to
            newest); ``None`` uses all kept samples.
        num_training_points: ``N`` of ``U``; read from the training loader when ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        stochastic_module_names: StochasticModuleNames = None,
        prior: Distribution | float | None = None,
        burnin_epochs: int = 0,
        thinning: int = 1,
        max_num_samples: int = 50,
        num_mc_samples_test: int | None = None,
        num_training_points: int | None = None,
    ) -> None:
        super().__init__(model, criterion, optimizer, lr_scheduler)
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        self.thinning = positive_int(thinning, "thinning")
        self.max_num_samples = positive_int(max_num_samples, "max_num_samples")
        if num_mc_samples_test is not None:
            positive_int(num_mc_samples_test, "num_mc_samples_test")
        self.num_mc_samples_test = num_mc_samples_test
        if num_training_points is not None:
            positive_int(num_training_points, "num_training_points")
        self._num_training_points_given = num_training_points
        self.prior = Prior(prior)

        first = self.select_parameters(stochastic_module_names)
        like = {"dtype": first.dtype, "device": first.device}
        self.register_buffer(
            "sgmcmc_samples", torch.zeros(self.max_num_samples, self.num_sampled_parameters, **like)
        )
        long = {"dtype": torch.long, "device": first.device}
        self.register_buffer("sgmcmc_num_collected", torch.zeros((), **long))
        self.register_buffer("sgmcmc_num_steps", torch.zeros((), **long))
        self._warned_adapting = False
        self.save_hyperparameters(
            ignore=["model", "criterion", "optimizer", "lr_scheduler", "prior"]
        )

    #: The sampler when ``optimizer`` is ``None``: pSGLD.
    default_optimizer = partial(SGLD, lr=1e-3, preconditioned=True)

    # -- the sampled parameters ------------------------------------------------------------------

    def neg_log_prior(self) -> Tensor:
        """``-log p(theta)`` of the sampled parameters (summed, constants included)."""
        prior = self.prior.distribution()
        params = dict(self.model.named_parameters())
        return -sum(prior.log_prob(params[name]).sum() for name in self.parameter_names)

    # -- the samples -------------------------------------------------------------------------------
    @property
    def num_collected(self) -> int:
        """Samples collected so far (including those the ring has dropped)."""
        return int(self.sgmcmc_num_collected.item())

    @property
    def num_samples(self) -> int:
        """Samples kept: ``min(num_collected, max_num_samples)``."""
        return min(self.num_collected, self.max_num_samples)

    @property
    def samples(self) -> Tensor:
        """The kept samples ``[num_samples, P]``, oldest first."""
        count, start = self.num_samples, self.num_collected % self.max_num_samples
        if self.num_collected <= self.max_num_samples:
            return self.sgmcmc_samples[:count]
        return torch.cat([self.sgmcmc_samples[start:], self.sgmcmc_samples[:start]])

    @torch.no_grad()
    def collect_sample(self) -> None:
        """Keep the current sampled parameters (the oldest kept one drops out when full)."""
        slot = self.num_collected % self.max_num_samples
        self.sgmcmc_samples[slot].copy_(self.flat_parameters())
        self.sgmcmc_num_collected.add_(1)

    @property
    def has_samples(self) -> bool:
        """Whether a sample was kept."""
        return self.num_samples > 0

    def no_samples_message(self) -> str:
        return (
            f"SG-MCMC has no sample yet: samples are kept every `thinning`={self.thinning} "
            f"training steps from epoch `burnin_epochs`={self.burnin_epochs} on, so train for "
            f"more than `burnin_epochs` epochs (trainer `max_epochs`) before predicting"
        )

    def sample_parameters(self, num_samples: int | None = None) -> Tensor:
        """Kept samples ``[S, P]``: all of them (in storage order) when ``num_samples`` is
        ``None`` or at least ``num_samples``, else ``S = num_samples`` evenly spaced from the
        oldest to the newest.
        """
        self.check_samples()
        count = self.num_samples
        if num_samples is None or num_samples >= count:
            return self.sgmcmc_samples[:count]
        positive_int(num_samples, "num_samples")
        index = torch.linspace(0, count - 1, num_samples, device=self.sgmcmc_samples.device)
        return self.samples[index.round().long()]

    # -- method hooks --------------------------------------------------------------------------

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``U / N`` of the network as it is: mean NLL + ``-log p(theta) / N``."""
        outputs = self.model(x).unsqueeze(0)
        nll = self.data_loss(outputs, target)
        neg_log_prior = self.neg_log_prior()
        loss = nll + neg_log_prior / self.num_training_points
        return {"loss": loss, "nll": nll, "neg_log_prior": neg_log_prior}, outputs

    # -- uq_box hooks --------------------------------------------------------------------------
    def optimizer_parameters(self) -> list[nn.Parameter]:
        """Only the sampled parameters go to the sampler."""
        params = dict(self.model.named_parameters())
        return [params[name] for name in self.parameter_names]

    def check_optimizer(self, optimizer: Any) -> None:
        """The ``optimizer`` must build an SG-MCMC sampler."""
        if not isinstance(optimizer, SGMCMCOptimizer):
            raise TypeError(
                f"`optimizer` must build an SG-MCMC sampler (uq_box.optim.SGLD or SGHMC, or a "
                f"subclass of uq_box.optim.SGMCMCOptimizer), got {type(optimizer).__name__}: a "
                f"plain optimizer finds a mode instead of sampling the posterior"
            )

    def on_fit_begin(self) -> None:
        """Re-arm the adaptation warning for every fit."""
        self._warned_adapting = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Log ``U / N`` and return ``U`` (summed over the data), the sampler's target."""
        return super().training_step(batch, batch_idx) * self.num_training_points

    def after_optimizer_step(self) -> None:
        """After burn-in, keep the parameters after every ``thinning``-th sampler step.

        Collected right after the step rather than in ``on_train_batch_end``, which runs after
        the callbacks' (``ModelCheckpoint(every_n_train_steps=...)``): a checkpoint taken after a
        step holds that step's sample and step count, so a resumed run keeps the samples and
        their phase.
        """
        if self.current_epoch < self.burnin_epochs:
            return
        self.sgmcmc_num_steps.add_(1)
        if int(self.sgmcmc_num_steps.item()) % self.thinning:
            return
        self._warn_if_adapting()
        self.collect_sample()

    def on_train_done(self) -> None:
        """A ``fast_dev_run`` (smoke test) that ends before the first sample keeps one."""
        if self.trainer.fast_dev_run and not self.has_samples:
            rank_zero_info(
                f"fast_dev_run: {type(self).__name__} kept the current weights as its one sample "
                f"(`burnin_epochs`={self.burnin_epochs} were not reached) so that testing and "
                f"the report run; its predictions have no epistemic part"
            )
            self.collect_sample()

    def _warn_if_adapting(self) -> None:
        if self._warned_adapting or not any(
            getattr(opt, "adapting", False) for opt in self.trainer.optimizers
        ):
            return
        self._warned_adapting = True
        warnings.warn(
            f"samples are collected while the sampler still adapts its scales "
            f"(`num_burn_in_steps` of the sampler is more than the steps of "
            f"`burnin_epochs`={self.burnin_epochs}); such samples are biased: raise "
            f"`burnin_epochs` or lower the sampler's `num_burn_in_steps`",
            stacklevel=3,
        )


class SGMCMCRegression(RegressionTask, SGMCMC):
    """SG-MCMC for regression (default criterion: heteroscedastic Gaussian NLL, 2 outputs).

    Prediction is the Gaussian mixture over the kept samples: ``pred_uct^2 = aleatoric^2 +
    epistemic^2`` (see :func:`uq_box.methods.predictive.regression_predictive`).
    """


class SGMCMCClassification(ClassificationTask, SGMCMC):
    """SG-MCMC for classification (default criterion: cross-entropy on the logits).

    The predictive is the mean of the sampled softmax probabilities; its entropy splits into the
    expected entropy (aleatoric) and the mutual information (epistemic).
    """


# -- the sampler fixed: SGLD, pSGLD, SGHMC ----------------------------------------------------
def _fixed_sampler(owner: SGMCMC, kwargs: dict[str, Any], make: Any) -> Any:
    """Check the sampler's hyperparameters now (on a stand-in parameter) and refuse ``optimizer``."""
    if "optimizer" in kwargs:
        raise TypeError(
            f"{type(owner).__name__} fixes its sampler, so it takes no `optimizer`; pass the "
            f"sampler's hyperparameters (`lr`, ...) or use SGMCMCRegression/SGMCMCClassification "
            f"with `optimizer` for another sampler"
        )
    make([nn.Parameter(torch.zeros(()))])
    return make


class _SGLDMethod(SGMCMC):
    """SG-MCMC with plain SGLD (Welling & Teh 2011) as the sampler.

    Args:
        model: the backbone.
        lr: the SGLD step size (see :class:`uq_box.optim.SGLD`).
        **kwargs: any other argument of :class:`SGMCMC` (``criterion``, ``prior``,
            ``burnin_epochs``, ``thinning``, ``max_num_samples``, ...), except ``optimizer``.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, **kwargs: Any) -> None:
        sampler = _fixed_sampler(self, kwargs, partial(SGLD, lr=lr))
        super().__init__(model, optimizer=sampler, **kwargs)


class _PSGLDMethod(SGMCMC):
    """SG-MCMC with preconditioned SGLD (Li et al. 2016) as the sampler.

    Args:
        model: the backbone.
        lr: the step size; ``alpha``, ``eps``, ``num_burn_in_steps``: the preconditioner's
            (see :class:`uq_box.optim.SGLD` with ``preconditioned=True``).
        **kwargs: any other argument of :class:`SGMCMC`, except ``optimizer``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        alpha: float = 0.99,
        eps: float = 1e-5,
        num_burn_in_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        sampler = partial(
            SGLD,
            lr=lr,
            preconditioned=True,
            alpha=alpha,
            eps=eps,
            num_burn_in_steps=num_burn_in_steps,
        )
        super().__init__(model, optimizer=_fixed_sampler(self, kwargs, sampler), **kwargs)


class _SGHMCMethod(SGMCMC):
    """SG-MCMC with scale-adapted SGHMC (Springenberg et al. 2016) as the sampler.

    Args:
        model: the backbone.
        lr: the step size; ``mdecay``: the momentum decay; ``num_burn_in_steps``: the steps of
            scale adaptation, to finish within ``burnin_epochs`` (see :class:`uq_box.optim.SGHMC`).
        **kwargs: any other argument of :class:`SGMCMC`, except ``optimizer``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        mdecay: float = 0.05,
        num_burn_in_steps: int = 3000,
        **kwargs: Any,
    ) -> None:
        sampler = partial(SGHMC, lr=lr, mdecay=mdecay, num_burn_in_steps=num_burn_in_steps)
        super().__init__(model, optimizer=_fixed_sampler(self, kwargs, sampler), **kwargs)


class SGLDRegression(RegressionTask, _SGLDMethod):
    """:class:`SGMCMCRegression` with plain SGLD: ``SGLDRegression(model, lr=1e-4, **kwargs)``.

    ``lr`` is the SGLD step; the other keyword arguments are :class:`SGMCMC`'s (no
    ``optimizer``).
    """


class SGLDClassification(ClassificationTask, _SGLDMethod):
    """:class:`SGMCMCClassification` with plain SGLD (``lr``, then :class:`SGMCMC`'s keywords)."""


class PSGLDRegression(RegressionTask, _PSGLDMethod):
    """:class:`SGMCMCRegression` with preconditioned SGLD (pSGLD).

    ``lr``, ``alpha``, ``eps`` and ``num_burn_in_steps`` are the sampler's (see
    :class:`uq_box.optim.SGLD`); the other keyword arguments are :class:`SGMCMC`'s.
    """


class PSGLDClassification(ClassificationTask, _PSGLDMethod):
    """:class:`SGMCMCClassification` with pSGLD; arguments as :class:`PSGLDRegression`."""


class SGHMCRegression(RegressionTask, _SGHMCMethod):
    """:class:`SGMCMCRegression` with scale-adapted SGHMC.

    ``lr``, ``mdecay`` and ``num_burn_in_steps`` are the sampler's (see
    :class:`uq_box.optim.SGHMC`); the other keyword arguments are :class:`SGMCMC`'s. Keep
    ``num_burn_in_steps`` below the steps of ``burnin_epochs``.
    """


class SGHMCClassification(ClassificationTask, _SGHMCMethod):
    """:class:`SGMCMCClassification` with SGHMC; arguments as :class:`SGHMCRegression`."""


__all__ = [
    "SGMCMC",
    "PSGLDClassification",
    "PSGLDRegression",
    "SGHMCClassification",
    "SGHMCRegression",
    "SGLDClassification",
    "SGLDRegression",
    "SGMCMCClassification",
    "SGMCMCRegression",
]
