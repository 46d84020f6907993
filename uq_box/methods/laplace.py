"""Laplace approximations: Daxberger, Kristiadi, Immer, Eschenhagen, Bauer & Hennig 2021,
"Laplace Redux -- Effortless Bayesian Deep Learning", through laplace-torch (an optional extra).

Training is ordinary MAP training of the network on the data loss (a Lightning ``fit``; the
regression network gives the mean only, trained on the MSE). When training ends
(:meth:`~uq_box.methods.base.UQMethod.on_train_done`, still on the training device) the Laplace
approximation is fitted around the trained weights on the data module's training split, then its
hyperparameters are tuned by maximizing the Laplace log marginal likelihood. :meth:`Laplace.fit_laplace` does the same for a
network trained elsewhere (post hoc).

Choices (see :class:`Laplace`):

- **Posterior.** ``subset_of_weights="last_layer"`` with ``hessian_structure="kron"`` (KFAC of
  the generalized Gauss-Newton) by default; ``"all"`` weights and ``"diag"``/``"full"`` structures
  by argument. ``"full"`` over all weights costs ``O(P^3)`` per marginal-likelihood step: keep it
  to tiny networks.
- **Hyperparameters.** ``optimize_prior_precision="marglik"`` runs Adam on the log of a scalar
  prior precision and, for regression, jointly on the log of the observation noise
  ``sigma_noise`` (laplace-torch's ``optimize_prior_precision`` tunes the prior only, with a fixed
  noise). The noise starts at the training RMSE of the MAP network; with
  ``optimize_prior_precision=None`` both stay at their starting values (``prior_precision`` and
  the training RMSE).
- **Regression predictive** (``pred_type="glm"``, the linearized network): ``f_mu``, ``f_var`` give
  ``pred = f_mu``, ``epistemic_uct = sqrt(f_var)``, ``aleatoric_uct = sigma_noise`` (homoscedastic)
  and ``pred_uct = sqrt(f_var + sigma_noise^2)``. ``samples`` ``[S, N, T]`` are draws from
  ``N(f_mu, f_var)`` standardized over ``S`` so that their mean and (population) variance are
  exactly ``f_mu`` and ``f_var``: the samples agree with the closed-form moments, as the
  prediction contract of the sampling methods has it. With ``pred_type="nn"`` (weights sampled
  from the posterior) the moments are those of the ``S`` samples.
- **Classification predictive.** ``S = num_mc_samples_test`` GLM predictive samples of the class
  probabilities (``la.predictive_samples``) give ``logits = log(probs)`` ``[S, N, C]``. With
  ``link_approx="mc"`` (the default) every key is
  :func:`uq_box.methods.predictive_classification.classification_predictive` of these logits:
  ``pred`` is the mean of the ``S`` sampled probabilities, and the entropy split is exact. With
  ``"probit"`` (laplace-torch's default), ``"bridge"`` or ``"bridge_norm"``, ``pred`` is that
  deterministic approximation of the predictive mean, ``pred_uct`` its entropy, and
  ``epistemic_uct = max(pred_uct - aleatoric_uct, 0)`` with the sampled expected entropy.
  Monte Carlo is the default because the probit approximation uses only the diagonal of the
  logits' covariance: with last-layer KFAC the direction that shifts all logits together (to
  which the softmax is blind) keeps the prior's large variance, so probit is underconfident on
  the data (two moons: test NLL 0.047 against 0.0075 for Monte Carlo and 0.0054 for the MAP
  network, all at accuracy 0.998).
- **Before the Laplace fit** (validation epochs during training, or a model loaded from a
  checkpoint saved before the fit) predictions are the MAP network's: no epistemic part;
  regression takes its aleatoric std from the training RMSE like
  :class:`uq_box.methods.DeterministicRegression`.
  A prediction outside training warns when no Laplace approximation is fitted.
- **State.** laplace-torch's object is not an ``nn.Module``; it lives in the attribute ``la`` with
  its own copy of the network on the device it was fitted on (laplace-torch copies the network
  for last-layer Laplace; this class copies it for ``"all"``, so the method's own network is never
  changed). Inputs are moved to that device and the predictions back, so a model fitted on a GPU
  predicts on CPU inputs and vice versa. Checkpoints carry ``la.state_dict()`` (tensors and
  plain values, so ``weights_only=True`` loading works) as the method's
  :meth:`~uq_box.methods.base.UQMethod.extra_checkpoint_state`, next to the base's resume state
  (random generators, running epoch sums): loading one rebuilds ``la`` around the checkpoint's
  weights, on the device the weights are loaded to, and a fit resumed from a mid-training
  checkpoint ends as the uninterrupted one. Training again (another ``fit``) drops ``la`` and
  fits a new one at the end.

laplace-torch is imported lazily, so this module imports without it; constructing a method
without it raises an ``ImportError`` naming the extra.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from enum import Enum
from typing import Any

import torch
from lightning import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from uq_box.checks import int_at_least, non_negative_int, positive_finite
from uq_box.losses import MSE
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
    eval_mode,
    unpack_batch,
)
from uq_box.methods.predictive import criterion_num_outputs
from uq_box.methods.predictive_classification import classification_predictive
from uq_box.metrics.functional_quantiles import gaussian_quantiles

SUBSETS_OF_WEIGHTS = ("last_layer", "all")
HESSIAN_STRUCTURES = ("kron", "diag", "full")
PRED_TYPES = ("glm", "nn")
LINK_APPROXIMATIONS = ("probit", "bridge", "bridge_norm", "mc")
PRIOR_TUNING = ("marglik", None)

FIT_BATCH_SIZE = 256
"""Points per batch of the curvature pass over the training data."""
PREDICT_CHUNK = 1024
"""Points per laplace-torch predictive call (bounds the Jacobians' memory)."""

INSTALL_HINT = (
    "install torch and torchvision first (laplace-torch needs torchvision), then "
    "`pip install 'uq_box[laplace]'`"
)


def import_laplace(owner: str = "Laplace") -> Any:
    """The ``laplace`` package (laplace-torch), or an ``ImportError`` naming the extra."""
    try:
        import laplace
    except ImportError as err:
        raise ImportError(
            f"{owner} needs laplace-torch, an optional extra of uq_box: {INSTALL_HINT}"
        ) from err
    return laplace


def _choice(value: Any, name: str, valid: tuple) -> Any:
    if value not in valid:
        raise ValueError(f"`{name}` must be one of {list(valid)}, got {value!r}")
    return value


def _materialize(batches: Iterable) -> tuple[Tensor, Tensor]:
    """Concatenate the ``(inputs, targets)`` of an iterable of batches (dicts or tuples)."""
    inputs, targets = [], []
    for batch in batches:
        x, y = unpack_batch(batch)
        if y is None:
            raise ValueError("the training batches carry no targets; expected (inputs, targets)")
        inputs.append(x)
        targets.append(y)
    if not inputs:
        raise ValueError("the training data is empty; expected at least one batch")
    return torch.cat(inputs), torch.cat(targets)


def tensor_loader(x: Tensor, y: Tensor, batch_size: int = FIT_BATCH_SIZE) -> DataLoader:
    """A ``DataLoader`` over ``TensorDataset(x, y)`` that slices whole batches (no collation).

    laplace-torch iterates ``(X, y)`` tuples and reads ``len(loader.dataset)``.
    """
    dataset = TensorDataset(x, y)
    sampler = BatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=False)
    return DataLoader(dataset, batch_size=None, sampler=sampler)


def laplace_train_loader(data: Any, batch_size: int = FIT_BATCH_SIZE) -> DataLoader:
    """The training data as laplace-torch wants it: a ``DataLoader`` of ``(X, y)`` tuples.

    Args:
        data: a data module with ``split("train")`` (e.g. :class:`uq_box.datamodules.ArrayDataModule`);
            any other ``LightningDataModule`` (its ``train_dataloader()``, set up already);
            a ``(X, y)`` pair of tensors; a ``DataLoader`` of ``(X, y)`` tuples (used as it is);
            or any iterable of batches (dicts ``{"input", "target"}`` or tuples), gathered in
            memory.
        batch_size: batch size of the loaders built here.
    """
    if callable(getattr(data, "split", None)) and not isinstance(data, Tensor):
        x, y = data.split("train")
        return tensor_loader(x, y, batch_size)
    if isinstance(data, LightningDataModule):
        return laplace_train_loader(data.train_dataloader(), batch_size)
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(d, Tensor) for d in data)
    ):
        if len(data[0]) != len(data[1]):
            raise ValueError(
                f"the inputs have {len(data[0])} rows but the targets {len(data[1])}; expected "
                f"the same"
            )
        return tensor_loader(data[0], data[1], batch_size)
    if isinstance(data, DataLoader):
        first = next(iter(data), None)
        if first is None:
            raise ValueError("the training DataLoader is empty; expected at least one batch")
        if isinstance(first, tuple | list) and len(first) >= 2 and hasattr(data, "dataset"):
            return data
        return tensor_loader(*_materialize(data), batch_size)
    if isinstance(data, Iterable):
        return tensor_loader(*_materialize(data), batch_size)
    raise TypeError(
        f"the Laplace training data must be a data module, a DataLoader, an iterable of "
        f"batches or an (X, y) pair of tensors, got {type(data).__name__}"
    )


def _plain_state(value: Any) -> Any:
    """laplace-torch's state as tensors and plain containers (``weights_only`` loading).

    Enum members (laplace-torch's ``Likelihood``) become their values; tensors are detached.
    """
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {key: _plain_state(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_plain_state(item) for item in value)
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_to_device(item, device) for item in value)
    return value


class Laplace(UQMethod):
    """MAP training, then a Laplace approximation fitted with laplace-torch (see the module doc).

    Args:
        model: the backbone (regression: one output per target; classification: the logits).
        criterion: the data loss of the MAP training (task default when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        subset_of_weights: ``"last_layer"`` (default) or ``"all"``.
        hessian_structure: ``"kron"`` (KFAC, default), ``"diag"`` or ``"full"``.
        prior_precision: the Gaussian prior's precision, the start of its tuning (``> 0``).
        optimize_prior_precision: ``"marglik"`` tunes the prior precision (and the regression
            noise) by the log marginal likelihood after the fit; ``None`` keeps them.
        pred_type: ``"glm"`` (linearized network, default) or ``"nn"`` (sampled weights).
        link_approx: classification: how ``pred`` approximates the predictive mean: ``"mc"``
            (the mean of the ``S`` samples, default), ``"probit"``, ``"bridge"`` or
            ``"bridge_norm"``.
        num_mc_samples_test: predictive samples ``S`` (classification logits; regression
            ``samples``), at least 2.
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE, the same loss).

    Attributes:
        la: laplace-torch's fitted approximation, ``None`` before :meth:`fit_laplace`.
    """

    #: Adam steps and learning rate of the marginal-likelihood tuning (on log hyperparameters).
    marglik_steps: int = 100
    marglik_lr: float = 0.1
    #: laplace-torch's likelihood name, set by the task subclasses.
    likelihood: str = ""

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        subset_of_weights: str = "last_layer",
        hessian_structure: str = "kron",
        prior_precision: float = 1.0,
        optimize_prior_precision: str | None = "marglik",
        pred_type: str = "glm",
        link_approx: str = "mc",
        num_mc_samples_test: int = 50,
        burnin_epochs: int = 0,
    ) -> None:
        import_laplace(type(self).__name__)
        super().__init__(model, criterion, optimizer, lr_scheduler)
        self.subset_of_weights = _choice(subset_of_weights, "subset_of_weights", SUBSETS_OF_WEIGHTS)
        self.hessian_structure = _choice(hessian_structure, "hessian_structure", HESSIAN_STRUCTURES)
        self.prior_precision = positive_finite(prior_precision, "prior_precision")
        self.optimize_prior_precision = _choice(
            optimize_prior_precision, "optimize_prior_precision", PRIOR_TUNING
        )
        self.pred_type = _choice(pred_type, "pred_type", PRED_TYPES)
        self.link_approx = _choice(link_approx, "link_approx", LINK_APPROXIMATIONS)
        self.check_prediction_settings()
        self.num_mc_samples_test = int_at_least(num_mc_samples_test, "num_mc_samples_test", 2)
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        self.la: Any = None
        self._warned_unfitted = False
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    # -- task hooks -----------------------------------------------------------------------------
    def check_prediction_settings(self) -> None:
        """Fail early on a ``pred_type``/``link_approx`` pair the task cannot use."""

    def check_fit_batch(self, outputs: Tensor, target: Tensor) -> None:
        """Fail early on network outputs ``[1, B, ...]`` or targets the likelihood cannot use."""
        raise NotImplementedError

    def init_hyperparameters(self, la: Any) -> None:
        """Set the likelihood's hyperparameters of a freshly fitted ``la``."""

    def laplace_predictive(self, x: Tensor) -> dict[str, Tensor]:
        """The prediction contract's dict from the fitted ``la`` on inputs on its device."""
        raise NotImplementedError

    # -- the method -----------------------------------------------------------------------------
    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """The MAP network's output as one sample ``[1, N, ...]`` (training, validation)."""
        return self.model(x).unsqueeze(0)

    def on_fit_begin(self) -> None:
        """Drop a previous Laplace approximation: the weights are about to change."""
        self.la = None

    def on_train_done(self) -> None:
        """Fit the Laplace approximation on the training data, still on the training device."""
        trainer = self.trainer
        data = trainer.datamodule
        if data is None:
            data = trainer.train_dataloader
        if data is None:
            raise ValueError(
                "Laplace needs the training data after training: fit with a data module or "
                "train_dataloaders"
            )
        self.fit_laplace(data)

    def fit_laplace(self, data: Any) -> Any:
        """Fit the Laplace approximation around the current weights, then tune it.

        Use it directly for a network trained elsewhere (post hoc); ``trainer.fit`` calls it
        when training ends.

        Args:
            data: the training data, see :func:`laplace_train_loader` (a data module with a
                ``"train"`` split, a ``DataLoader``, batches, or an ``(X, y)`` pair).

        Returns:
            The fitted laplace-torch object, also kept as ``self.la``.
        """
        laplace = import_laplace(type(self).__name__)
        loader = laplace_train_loader(data)
        if isinstance(loader.dataset, TensorDataset):  # float64 data into a float32 network
            x, y = loader.dataset.tensors
            y = self._as_network_dtype(y) if self.cast_targets else y
            size = getattr(loader.sampler, "batch_size", None) or loader.batch_size
            loader = tensor_loader(self._as_network_dtype(x), y, size or FIT_BATCH_SIZE)
        device = next(self.model.parameters()).device
        x, y = next(iter(loader))[:2]
        with torch.no_grad(), eval_mode(self.model):
            outputs = self.model(x[:2].to(device)).unsqueeze(0)
        self.check_fit_batch(outputs, y[:2].to(device))
        with eval_mode(self.model), torch.inference_mode(False), torch.enable_grad():
            la = self.new_laplace(laplace)
            la.fit(loader)
        self.la = la
        self._warned_unfitted = False
        self.init_hyperparameters(la)
        if self.optimize_prior_precision == "marglik":
            self.tune_prior_precision()
        return la

    def new_laplace(self, laplace: Any) -> Any:
        """laplace-torch's (unfitted) approximation around the current network.

        laplace-torch copies the network for last-layer Laplace; for all weights we copy it, so
        that sampled weights never touch ours and ``la`` keeps its own device.
        """
        network = (
            self.model if self.subset_of_weights == "last_layer" else copy.deepcopy(self.model)
        )
        return laplace.Laplace(
            network,
            self.likelihood,
            subset_of_weights=self.subset_of_weights,
            hessian_structure=self.hessian_structure,
            prior_precision=self.prior_precision,
        )

    def extra_checkpoint_state(self) -> dict[str, Any] | None:
        """The fitted approximation (``la.state_dict()``, tensors and plain values), if any."""
        if self.la is None:
            return None
        state = _plain_state(self.la.state_dict())
        data = state.get("data")
        if isinstance(data, tuple | list):
            # last-layer Laplace keeps a training batch only to find the last layer (on 1 row)
            state["data"] = type(data)(d[:1] if isinstance(d, Tensor) else d for d in data)
        return state

    def load_extra_checkpoint_state(
        self, state: dict[str, Any] | None, weights: dict[str, Tensor]
    ) -> None:
        """Rebuild ``la`` around the checkpoint's weights and load its saved state."""
        self.la = None
        self._warned_unfitted = False
        if state is None:
            return
        laplace = import_laplace(type(self).__name__)
        # Lightning loads the weights only after this hook; `la` copies the network now
        self.load_state_dict(weights, strict=False)
        device = next(self.model.parameters()).device
        state = _to_device(state, device)
        with eval_mode(self.model), torch.inference_mode(False), torch.enable_grad():
            la = self.new_laplace(laplace)
            la.load_state_dict(state)
        self.la = la

    def _require_la(self) -> Any:
        if self.la is None:
            raise RuntimeError(
                f"{type(self).__name__} has no Laplace approximation yet: train it with "
                f"trainer.fit or call fit_laplace(train_data) first"
            )
        return self.la

    def tune_prior_precision(self) -> None:
        """Maximize the log marginal likelihood over the prior precision (and regression noise).

        Adam (``marglik_steps`` steps, ``marglik_lr``) on the log of a scalar prior precision
        and, for regression, of ``sigma_noise``, from their current values.
        """
        la = self._require_la()
        with torch.inference_mode(False), torch.enable_grad():
            log_prior = la.prior_precision.detach().mean().log().reshape(1).requires_grad_(True)
            hyper = [log_prior]
            log_sigma = None
            if self.likelihood == "regression":
                log_sigma = la.sigma_noise.detach().log().reshape(1).requires_grad_(True)
                hyper.append(log_sigma)
            optimizer = torch.optim.Adam(hyper, lr=self.marglik_lr)
            for _ in range(self.marglik_steps):
                optimizer.zero_grad()
                sigma = None if log_sigma is None else log_sigma.exp()
                (-la.log_marginal_likelihood(log_prior.exp(), sigma)).backward()
                optimizer.step()
        la.prior_precision = log_prior.detach().exp()
        if log_sigma is not None:
            la.sigma_noise = log_sigma.detach().exp()
        if not bool(torch.isfinite(la.log_marginal_likelihood().detach())):
            raise FloatingPointError(
                "the tuned Laplace log marginal likelihood is not finite; try a larger "
                "`prior_precision` or optimize_prior_precision=None"
            )

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The Laplace predictive of a batch (the MAP network's before the Laplace fit)."""
        x, _ = unpack_batch(batch)
        if self.la is None:
            self._warn_unfitted()
            return super().predict_step(x)
        la_device = next(self.la.model.parameters()).device
        with torch.inference_mode(False), torch.enable_grad():
            # a fresh (non-inference) tensor: Lightning's test/predict loops run in inference mode
            x = self._as_network_dtype(x.detach().to(la_device)).clone()
            chunks = [self.laplace_predictive(chunk) for chunk in x.split(PREDICT_CHUNK)]
        sample_keys = ("samples", "logits")
        preds = {
            key: torch.cat([c[key] for c in chunks], dim=1 if key in sample_keys else 0)
            .detach()
            .to(self.device)
            for key in chunks[0]
        }
        levels = getattr(self, "quantile_levels", None)
        if levels is not None:  # the Gaussian predictive (exact for the GLM one)
            preds["quantiles"] = gaussian_quantiles(preds["pred"], preds["pred_uct"], levels)
        return preds

    def _warn_unfitted(self) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if not fitting and not self._warned_unfitted:
            self._warned_unfitted = True
            warnings.warn(
                f"{type(self).__name__} has no Laplace approximation (call "
                f"fit_laplace(train_data)); predicting with the MAP network, "
                f"without epistemic uncertainty",
                stacklevel=3,
            )


class LaplaceRegression(RegressionTask, Laplace):
    """Laplace regression: a mean-only network (MSE), homoscedastic Gaussian noise ``sigma_noise``."""

    likelihood = "regression"

    def default_criterion(self) -> nn.Module:
        """Mean squared error (1 output per target)."""
        return MSE()

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must train a mean-only network (1 output per target)."""
        super().check_criterion(criterion)
        if criterion_num_outputs(criterion) != 1:
            raise ValueError(
                f"`criterion` of LaplaceRegression must train a mean-only network (1 output per "
                f"target, e.g. uq_box.losses.MSE(), the default): laplace-torch's regression "
                f"likelihood is a homoscedastic Gaussian whose noise sigma_noise is tuned "
                f"after training; got {criterion!r} with {criterion_num_outputs(criterion)} "
                f"outputs per target"
            )

    def check_outputs(self, outputs: Tensor, target: Tensor) -> None:
        """One network output per target."""
        if target.ndim < 2:
            raise ValueError(
                f"regression targets must have shape [N, T], got {tuple(target.shape)}"
            )
        expected = target.shape[-1]
        if outputs.shape[-1] != expected:
            raise ValueError(
                f"LaplaceRegression needs a mean-only network with 1 output per target: it gives "
                f"{outputs.shape[-1]} outputs per point for {expected} target(s); set the "
                f"network's `n_outputs` to {expected} (laplace-torch's regression likelihood is "
                f"homoscedastic; a (mean, scale) network with an NLL `criterion` is not "
                f"supported)"
            )

    def check_fit_batch(self, outputs: Tensor, target: Tensor) -> None:
        """One output per target, floating point targets ``[N, T]``."""
        if not target.is_floating_point():
            raise ValueError(f"regression targets must be floating point, got {target.dtype}")
        self.check_outputs(outputs, target)

    def init_hyperparameters(self, la: Any) -> None:
        """Start ``sigma_noise`` at the training RMSE of the MAP network."""
        mse = 2.0 * torch.as_tensor(la.loss).detach() / (la.n_data * la.n_outputs)
        la.sigma_noise = mse.sqrt().clamp_min(1e-6).to(la.sigma_noise.device)

    @property
    def sigma_noise(self) -> Tensor:
        """The fitted homoscedastic noise std (the aleatoric std)."""
        return self._require_la().sigma_noise

    def laplace_predictive(self, x: Tensor) -> dict[str, Tensor]:
        """GLM (or sampled) mean and variance, homoscedastic noise; see the module doc."""
        la, num_samples = self.la, self.num_mc_samples_test
        if self.pred_type == "glm":
            f_mu, f_var = la(x, pred_type="glm")
            f_var = f_var.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
            z = torch.randn(num_samples, *f_mu.shape, device=f_mu.device, dtype=f_mu.dtype)
            z = z - z.mean(0)
            z = z / z.pow(2).mean(0).sqrt().clamp_min(torch.finfo(z.dtype).tiny)
            samples = f_mu + f_var.sqrt() * z
        else:
            samples = la.predictive_samples(x, pred_type="nn", n_samples=num_samples)
            f_mu, f_var = samples.mean(0), samples.var(0, unbiased=False)
        aleatoric_var = (la.sigma_noise.detach() ** 2).to(f_mu).expand_as(f_mu)
        return {
            "pred": f_mu,
            "pred_uct": (f_var + aleatoric_var).sqrt(),
            "epistemic_uct": f_var.sqrt(),
            "aleatoric_uct": aleatoric_var.sqrt(),
            "samples": samples,
        }


class LaplaceClassification(ClassificationTask, Laplace):
    """Laplace classification: softmax likelihood, GLM predictive samples of the probabilities."""

    likelihood = "classification"

    def check_prediction_settings(self) -> None:
        """The sampled-weights predictive has no closed-form link approximation."""
        if self.pred_type == "nn" and self.link_approx != "mc":
            raise ValueError(
                f"`link_approx` must be 'mc' with pred_type='nn', got {self.link_approx!r}"
            )

    def check_fit_batch(self, outputs: Tensor, target: Tensor) -> None:
        """Logits ``[N, C]`` and integer class targets ``[N]``."""
        if outputs.ndim != 3:
            raise ValueError(
                f"the network must give logits of shape [N, C], got {tuple(outputs.shape[1:])}"
            )
        self._check_target(outputs, target)

    def laplace_predictive(self, x: Tensor) -> dict[str, Tensor]:
        """Sampled probabilities -> logits and entropy split; ``pred`` by ``link_approx``."""
        la = self.la
        probs = la.predictive_samples(
            x, pred_type=self.pred_type, n_samples=self.num_mc_samples_test
        )
        logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        preds = classification_predictive(logits)
        if self.link_approx != "mc":
            pred = la(x, pred_type="glm", link_approx=self.link_approx)
            total = torch.special.entr(pred).sum(-1)
            preds["pred"] = pred
            preds["pred_uct"] = total
            preds["epistemic_uct"] = (total - preds["aleatoric_uct"]).clamp_min(0.0)
        return preds


__all__ = [
    "HESSIAN_STRUCTURES",
    "SUBSETS_OF_WEIGHTS",
    "Laplace",
    "LaplaceClassification",
    "LaplaceRegression",
    "laplace_train_loader",
]
