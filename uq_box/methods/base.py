"""Base classes of the UQ methods.

A method is :class:`UQMethod` (optimizer set-up, the training/validation/test/predict loop,
logging, checkpoint and resume state) plus a *task* mixin (:class:`RegressionTask`,
:class:`ClassificationTask`) that says how outputs become a predictive distribution, which loss
and metrics apply, and what output width the network must have. A method family implements
:meth:`UQMethod.sample_outputs` (and the optional uq_box hooks it needs, listed on
:class:`UQMethod`), so ``XRegression`` and ``XClassification`` are thin subclasses that share one
constructor. The base owns Lightning's hooks; methods override the narrow uq_box hooks instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, ClassVar

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
from torchmetrics import MeanMetric, MeanSquaredError, Metric

from uq_box.checks import non_negative_int, positive_int
from uq_box.losses import NLL
from uq_box.methods.predictive import (
    QuantileLevels,
    criterion_mean_and_std,
    criterion_num_outputs,
    criterion_output_width,
    regression_predictive,
    regression_quantiles,
    update_regression_metrics,
)
from uq_box.methods.predictive_classification import classification_predictive
from uq_box.metrics import (
    CRPS,
    EnergyScore,
    GaussianNLL,
    IntervalCoverage,
    MiscalibrationArea,
    MixtureNLL,
)
from uq_box.metrics.classification import BrierScore, ExpectedCalibrationError, MulticlassNLL
from uq_box.nn.graph import in_functorch_transform

OptimizerCallable = Callable[[Iterable], Optimizer]
LRSchedulerCallable = Callable[[Optimizer], Any]
#: Checkpoint key of what a resumed fit needs beyond Lightning's state: the random generators'
#: states and the running epoch sums (see ``UQMethod.on_train_start``).
RESUME_STATE_KEY = "uq_box_resume_state"
#: Checkpoint key of a method's own state beyond its parameters, buffers and hyperparameters
#: (what :meth:`UQMethod.extra_checkpoint_state` returns).
METHOD_STATE_KEY = "uq_box_method_state"
#: Lightning hooks that :class:`UQMethod` implements and a subclass must not override, each with
#: the uq_box hook to override instead (overriding one is a ``TypeError`` at class creation).
OWNED_HOOKS = {
    "on_fit_start": "on_fit_begin",
    "on_train_start": "on_fit_begin",
    "on_train_batch_start": "on_train_batch_begin",
    "optimizer_step": "after_optimizer_step",
    "on_train_epoch_end": "on_train_epoch_done",
    "on_train_end": "on_train_done",
    "on_save_checkpoint": "extra_checkpoint_state",
    "on_load_checkpoint": "load_extra_checkpoint_state",
}


def optimizer_config(optimizer: Optimizer, lr_scheduler: LRSchedulerCallable | None) -> Any:
    """What ``configure_optimizers`` returns: ``optimizer``, with the scheduler built on it
    (a ``ReduceLROnPlateau`` watches ``val_loss``).
    """
    if lr_scheduler is None:
        return optimizer
    scheduler = lr_scheduler(optimizer)
    config = {"scheduler": scheduler}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = "val_loss"
    return {"optimizer": optimizer, "lr_scheduler": config}


class RunningMeans:
    """Running, batch-size weighted means of an epoch's per-batch terms, by stage.

    A step only appends the detached terms (no tensor op beyond ``detach``); the weighted means
    are reduced once, when the epoch's values are popped. Terms are tensors of any shape: one
    value, or one per stacked run.
    """

    def __init__(self) -> None:
        self._terms: dict[str, tuple[list[Tensor], list[int]]] = {}

    def add(self, stage: str, terms: dict[str, Tensor], weight: int) -> None:
        """Add a batch's ``terms``, weighted by its size ``weight``."""
        for name, value in terms.items():
            values, weights = self._terms.setdefault(f"{stage}_{name}", ([], []))
            values.append(value.detach())
            weights.append(weight)

    def _mean(self, key: str) -> Tensor:
        values, weights = self._terms[key]
        stacked = torch.stack(values)
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        w = w.reshape(-1, *([1] * (stacked.ndim - 1)))
        return (stacked * w).sum(0) / w.sum()

    def pop(self, stage: str, skip: Collection[str] = ()) -> dict[str, Tensor]:
        """The epoch means of ``stage``'s terms, removed; a mean squared error ``*_mse``
        becomes its root ``*_rmse``; names in ``skip`` are dropped.
        """
        values = {}
        for key in [k for k in self._terms if k.startswith(f"{stage}_")]:
            value = self._mean(key)
            del self._terms[key]
            if key.endswith("_mse"):
                key, value = key[: -len("mse")] + "rmse", value.sqrt()
            if key[len(stage) + 1 :] not in skip:
                values[key] = value
        return values

    def state(self) -> dict[str, list]:
        """``{key: [weighted sum, total weight]}``, for a checkpoint."""
        state = {}
        for key, (_, weights) in self._terms.items():
            total = sum(weights)
            state[key] = [self._mean(key) * total, total]
        return state

    def load_state(self, state: dict[str, list], device: torch.device | str) -> None:
        """Restore what :meth:`state` saved (an interrupted epoch's sums)."""
        for key, (total, weight) in state.items():
            self._terms[key] = ([total.to(device) / weight], [int(weight)])

    def clear(self) -> None:
        """Forget every stage's terms."""
        self._terms.clear()


def resume_state(running: RunningMeans) -> dict[str, Any]:
    """What a fit resumed from a checkpoint needs beyond Lightning's state: the random
    generators' states and the running epoch sums.
    """
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "running": running.state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_resume_state(
    state: dict[str, Any], running: RunningMeans, device: torch.device | str
) -> None:
    """Restore what :func:`resume_state` saved: the generators, and the sums into ``running``."""
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    running.load_state(state["running"], device)


class FastHookBookkeeping:
    """Set Lightning's hook bookkeeping attribute without ``nn.Module.__setattr__``.

    Lightning sets ``_current_fx_name`` on the module before and after every hook it calls,
    about 40 times per training step; ``nn.Module.__setattr__`` checks the parameters, buffers
    and submodules each time (1.5 us here), a plain attribute does not (0.2 us).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


def dataset_size(loader: object) -> int | None:
    """Number of training points a loader draws per epoch, all processes together, if it says.

    A ``DataLoader`` draws what its sampler yields (a ``SubsetRandomSampler`` covers part of the
    data set); under DDP the ``DistributedSampler`` wraps the data set (or the user's sampler) and
    ``len(sampler.dataset)`` is the global size.
    """
    if hasattr(loader, "num_samples"):
        return int(loader.num_samples)
    if not isinstance(loader, DataLoader):
        return None
    sampler = loader.sampler
    if isinstance(loader.dataset, IterableDataset):
        sized = loader.dataset
    elif isinstance(sampler, DistributedSampler):
        sized = sampler.dataset
    else:
        sized = sampler
    try:
        return len(sized)
    except TypeError:
        return None


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(inputs, targets)`` of a batch given as a dict, a tuple/list or a bare input tensor."""
    if isinstance(batch, dict):
        if "input" not in batch:
            raise KeyError(f"a batch dict needs the key 'input'; it has {sorted(batch)}")
        return batch["input"], batch.get("target")
    if isinstance(batch, list | tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Tensor):
        return batch, None
    raise TypeError(f"a batch must be a dict, tuple or tensor, got {type(batch).__name__}")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore each submodule's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class UQMethod(FastHookBookkeeping, LightningModule):
    """Training loop, logging, checkpoint state and prediction shared by every method.

    **The hooks contract.** A new method subclasses ``UQMethod`` (or a family base such as
    :class:`uq_box.methods.sampled.ParameterSampling`) and a task mixin, and implements:

    - :meth:`sample_outputs` (required): raw network outputs ``[S, N, ...]`` for ``S`` samples
      or members; training, validation, testing and prediction all go through it.

    The task mixin (:class:`RegressionTask` or :class:`ClassificationTask`, listed first in the
    bases) supplies ``default_criterion``, ``check_criterion``, ``build_metrics``,
    ``setup_task``, ``predictive``, ``data_loss``, ``burnin_loss``, ``running_terms``,
    ``update_metrics`` and ``on_epoch_means``; a method rarely touches them.

    Optional uq_box hooks, each a no-op (or the plain behaviour) unless overridden:

    - :meth:`loss`: the training objective (default: the data loss over
      ``num_mc_samples_train`` samples, the burn-in loss in the first ``burnin_epochs``);
    - :meth:`optimizer_parameters`, :meth:`check_optimizer` and :attr:`default_optimizer`: what
      the ``optimizer`` callable gets, what it may build, and what runs when none is given;
    - :meth:`on_fit_begin`: at the start of every fit (drop state that depends on the weights);
    - :meth:`on_train_batch_begin`: before every training step;
    - :meth:`after_optimizer_step`: after every optimizer step, before the callbacks see the
      batch end (a step checkpoint then holds what this hook stored);
    - :meth:`on_train_epoch_done`: after a training epoch's means are logged;
    - :meth:`on_train_done`: when training ends, still on the training device (post-training
      fits; methods that need snapshots take one here in a ``fast_dev_run`` smoke test);
    - :meth:`extra_checkpoint_state` / :meth:`load_extra_checkpoint_state`: state a checkpoint
      carries beyond the parameters, buffers and hyperparameters (which Lightning saves anyway:
      prefer registered buffers, and use these only for what cannot be one).

    :class:`~uq_box.methods.stacked.StackedRuns` stacks a method that overrides one of the
    lifecycle hooks only if the method lists the hook in :attr:`stackable_hooks`.

    Lightning's own hooks in :data:`OWNED_HOOKS` (``on_fit_start``, ``on_train_start``,
    ``on_train_batch_start``, ``optimizer_step``, ``on_train_epoch_end``, ``on_train_end``,
    ``on_save_checkpoint``, ``on_load_checkpoint``) belong to the base: it saves and restores the
    random generators and the running epoch sums there, so that a fit resumed from ``ckpt_path``
    equals the uninterrupted one. A subclass that overrides one of them is refused with a
    ``TypeError`` naming the uq_box hook to use. ``training_step``, ``validation_step``,
    ``predict_step`` and ``configure_optimizers`` may be extended (call ``super()``).

    Args:
        model: the backbone (any ``nn.Module``).
        criterion: the data loss; the task's default when ``None``.
        optimizer: callable taking the parameters, e.g. ``partial(torch.optim.Adam, lr=1e-3)``
            (:attr:`default_optimizer`, Adam with ``lr=1e-3``, when ``None``).
        lr_scheduler: callable taking the optimizer (``ReduceLROnPlateau`` watches ``val_loss``).
    """

    #: Monte Carlo samples (or members) per training step and per prediction.
    num_mc_samples_train: int = 1
    num_mc_samples_test: int = 1
    #: Epochs trained on the task's burn-in loss before the criterion takes over.
    burnin_epochs: int = 0
    #: ``N`` given at construction by methods whose objective needs it (``None``: read it).
    _num_training_points_given: int | None = None
    #: Whether floating point targets follow the inputs into the network's dtype (regression).
    cast_targets: bool = True
    #: The optimizer when ``optimizer`` is ``None``.
    default_optimizer: ClassVar[OptimizerCallable] = partial(torch.optim.Adam, lr=1e-3)
    #: The overridden lifecycle hooks that :class:`~uq_box.methods.stacked.StackedRuns` may run
    #: for each stacked run (it refuses a method overriding any other). Declare a hook only if
    #: it acts on the method's own parameters and buffers, in place or by assigning a buffer:
    #: ``on_train_batch_begin``, ``after_optimizer_step`` and ``on_train_epoch_done`` then run
    #: for all runs in one ``torch.func.vmap`` call (tensor ops only, in-place updates, no
    #: Python branch on a tensor's value); ``on_fit_begin`` and ``on_train_done`` run run by
    #: run, where ``self.trainer.train_dataloader`` gives the run's own batches. All run
    #: without gradients. A subclass that overrides a declared hook anew must declare it again.
    stackable_hooks: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a subclass that overrides one of the Lightning hooks the base owns."""
        super().__init_subclass__(**kwargs)
        for hook, instead in OWNED_HOOKS.items():
            if hook in vars(cls):
                raise TypeError(
                    f"{cls.__name__} overrides Lightning's `{hook}`, which UQMethod owns (it "
                    f"keeps the checkpoint and resume state there); override the uq_box hook "
                    f"`{instead}` instead (see the UQMethod docstring)"
                )

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not callable(optimizer):
            raise TypeError(
                f"`optimizer` must be a callable taking the parameters, e.g. "
                f"partial(torch.optim.Adam, lr=1e-3), got {type(optimizer).__name__}"
            )
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(
                f"`lr_scheduler` must be a callable taking the optimizer, got "
                f"{type(lr_scheduler).__name__}"
            )
        self.model = model
        self.criterion = self.default_criterion() if criterion is None else criterion
        self.check_criterion(self.criterion)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.val_metrics = self.build_metrics()
        self.test_metrics = self.build_metrics()
        self.setup_task()
        self._running = RunningMeans()
        # the first floating point parameter, in a tuple so that nn.Module does not register it
        self._dtype_reference: tuple[Tensor] | None = None

    # -- task hooks (RegressionTask, ClassificationTask) -------------------------------------
    def default_criterion(self) -> nn.Module:
        """The task's loss when none is given."""
        raise NotImplementedError

    def check_criterion(self, criterion: nn.Module) -> None:
        """Fail early on a criterion the task cannot use."""

    def build_metrics(self) -> nn.ModuleDict:
        """Fresh metrics for one stage."""
        return nn.ModuleDict()

    def setup_task(self) -> None:
        """Register the task's own state (buffers) at construction."""

    def on_epoch_means(self, stage: str, values: dict[str, Tensor]) -> None:
        """Use an epoch's mean running terms (after they are logged)."""

    def predictive(self, outputs: Tensor) -> dict[str, Tensor]:
        """The prediction contract's dict from raw outputs ``[S, N, ...]``."""
        raise NotImplementedError

    def data_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean data loss of outputs ``[S, B, ...]`` (checks the output width)."""
        raise NotImplementedError

    def update_metrics(
        self, metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        """Feed one batch of predictions to ``metrics``."""
        raise NotImplementedError

    def running_terms(self, outputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Cheap per-batch figures (e.g. squared error) averaged over each epoch."""
        return {}

    def burnin_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Loss of the burn-in epochs (the data loss unless the task has a simpler one)."""
        return self.data_loss(outputs, target)

    # -- method hooks: sample_outputs is required, the others are optional --------------------
    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """Raw network outputs ``[S, N, ...]`` for ``S = num_samples`` samples or members.

        Every method implements it (the only required method hook).
        """
        raise NotImplementedError

    @property
    def in_burnin(self) -> bool:
        """Whether this training step belongs to the burn-in epochs."""
        return self.training and self.current_epoch < self.burnin_epochs

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The training objective: (``{"loss": ..., other terms}``, raw outputs ``[S, B, ...]``).

        The data loss over ``num_mc_samples_train`` samples, or the burn-in loss during the first
        ``burnin_epochs``.
        """
        outputs = self.sample_outputs(x, self.num_mc_samples_train)
        nll = self.data_loss(outputs, target)
        if self.in_burnin:
            return {"loss": self.burnin_loss(outputs, target), "nll": nll}, outputs
        return {"loss": nll, "nll": nll}, outputs

    @property
    def num_training_points(self) -> int:
        """``N``: the training set size across all processes (for ELBO and posterior scaling).

        The ``num_training_points`` given at construction, else read from the training loader
        (or the data module's) once per fit.
        """
        if getattr(self, "_num_training_points", None) is None:
            size = self._num_training_points_given
            trainer = self._trainer
            if size is None and trainer is not None:
                size = dataset_size(trainer.train_dataloader)
                if size is None and trainer.datamodule is not None:
                    size = dataset_size(trainer.datamodule.train_dataloader())
            if size is None:
                raise ValueError(
                    "cannot tell the training set size from the training loader; pass "
                    "`num_training_points` (the number of training points, all processes together)"
                )
            self._num_training_points = size
        return self._num_training_points

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """The parameters the ``optimizer`` callable gets (default: all that require grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def check_optimizer(self, optimizer: Optimizer) -> None:
        """Fail early on an optimizer the method cannot train with (default: any is fine)."""

    # -- optional lifecycle hooks (the base calls them from Lightning's hooks) ---------------
    def on_fit_begin(self) -> None:
        """At the start of every fit (default: nothing).

        A resumed fit has loaded its checkpoint into the module by then; training (and the
        restoring of the optimizer and loop state) follows.
        """

    def on_train_batch_begin(self, batch_idx: int) -> None:
        """Before every training step (default: nothing)."""

    def after_optimizer_step(self) -> None:
        """After every optimizer step, before the callbacks' batch-end hooks (default: nothing)."""

    def on_train_epoch_done(self) -> None:
        """After a training epoch's means are logged (default: nothing)."""

    def on_train_done(self) -> None:
        """When training ends, still on the training device (default: nothing)."""

    def extra_checkpoint_state(self) -> dict[str, Any] | None:
        """A method's state beyond parameters, buffers and hyperparameters, for checkpoints.

        Tensors and plain containers only (``weights_only=True`` loading); ``None`` saves
        nothing (the default).
        """
        return None

    def load_extra_checkpoint_state(
        self, state: dict[str, Any] | None, weights: dict[str, Tensor]
    ) -> None:
        """Restore what :meth:`extra_checkpoint_state` saved (``None``: the checkpoint has none).

        Called when a checkpoint is loaded (``load_from_checkpoint`` or a resumed fit) *before*
        Lightning loads ``weights``, the checkpoint's ``state_dict``, into the module.
        """

    # -- Lightning hooks (owned by the base, see OWNED_HOOKS) ---------------------------------
    def on_fit_start(self) -> None:
        """Read ``N`` afresh for every fit (the same model may be fit on other data)."""
        self._num_training_points = None
        self.on_fit_begin()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the generators' states, the running epoch sums and the method's extra state."""
        checkpoint[RESUME_STATE_KEY] = resume_state(self._running)
        extra = self.extra_checkpoint_state()
        if extra is not None:
            checkpoint[METHOD_STATE_KEY] = extra

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the resume state for :meth:`on_train_start`; restore the method's own state."""
        self._resume_state = checkpoint.get(RESUME_STATE_KEY)
        self.load_extra_checkpoint_state(
            checkpoint.get(METHOD_STATE_KEY), checkpoint.get("state_dict", {})
        )

    def on_train_start(self) -> None:
        """When resuming a fit (``ckpt_path``), restore the state saved with the checkpoint.

        The random generators come back as they were when saved, so a resumed run draws the same
        Monte Carlo noise (weight samples, dropout masks) as the uninterrupted run, and the running
        sums of an epoch interrupted mid-way, so its logged means (and a mean-only network's noise
        estimate, the training RMSE) cover the whole epoch. ``load_from_checkpoint`` alone, or a
        new fit of a loaded model, leaves the generators alone.
        """
        state = getattr(self, "_resume_state", None)
        self._resume_state = None
        if state is not None and self._trainer is not None and self.trainer.ckpt_path is not None:
            restore_resume_state(state, self._running, self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Call :meth:`on_train_batch_begin`."""
        self.on_train_batch_begin(batch_idx)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Lightning's optimizer step, then :meth:`after_optimizer_step`."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.after_optimizer_step()

    def on_train_epoch_end(self) -> None:
        """Log the epoch means of the training terms, then :meth:`on_train_epoch_done`."""
        self._log_running("train")
        self.on_train_epoch_done()

    def on_train_end(self) -> None:
        """Call :meth:`on_train_done`."""
        self.on_train_done()

    def forward(self, x: Tensor) -> Tensor:
        """The backbone's output (one sample for a stochastic network)."""
        return self.model(x)

    def configure_optimizers(self) -> Any:
        """The optimizer (and scheduler) from the callables given at construction.

        ``optimizer`` (or :attr:`default_optimizer`) gets :meth:`optimizer_parameters`; the
        result goes through :meth:`check_optimizer`.
        """
        optimizer = (self.optimizer or self.default_optimizer)(self.optimizer_parameters())
        self.check_optimizer(optimizer)
        return optimizer_config(optimizer, self.lr_scheduler)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One optimization step on the method's objective."""
        x, target = self._inputs_and_targets(batch, "train")
        terms, outputs = self.loss(x, target)
        loss = terms["loss"]
        value = loss.item()  # one op (torch.isfinite is four) and the same device sync
        if not math.isfinite(value):
            raise FloatingPointError(
                f"non-finite training loss ({value}) at epoch {self.current_epoch}, step "
                f"{self.global_step} (batch {batch_idx}); check the data for outliers, lower the "
                f"learning rate, or raise the criterion's `min_std`"
            )
        with torch.no_grad():
            running = self.running_terms(outputs, target)
        self._accumulate("train", {**terms, **running}, len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Objective and predictive metrics on validation data."""
        x, target = self._inputs_and_targets(batch, "val")
        terms, outputs = self.loss(x, target)
        with torch.no_grad():
            running = self.running_terms(outputs, target)
        self._accumulate("val", {**terms, **running}, len(x))
        self.update_metrics(self.val_metrics, self.predict_step(x), target)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Predictive metrics on test data."""
        x, target = self._inputs_and_targets(batch, "test")
        self.update_metrics(self.test_metrics, self.predict_step(x), target)

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """Predictive distribution of a batch (or a bare input tensor).

        The dict of the prediction contract, see
        [docs/architecture.md](../architecture.md#the-prediction-contract).
        """
        x, _ = unpack_batch(batch)
        with torch.no_grad(), eval_mode(self.model):
            return self.predict_inputs(self._as_network_dtype(x.to(self.device)))

    def predict_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """The prediction contract's dict of inputs already on the device and in the network's
        dtype; ``predict_step`` calls it without gradients, the network in eval mode.
        """
        return self.predictive(self.sample_outputs(x, self.num_mc_samples_test))

    def on_validation_epoch_end(self) -> None:
        """Log the validation terms and metrics (a metric's name wins over a term's)."""
        self._log_running("val", skip=set(self.val_metrics))
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        """Log the test metrics."""
        self._log_metrics(self.test_metrics, "test")

    # -- helpers ------------------------------------------------------------------------------
    def _inputs_and_targets(self, batch: Any, stage: str) -> tuple[Tensor, Tensor]:
        x, target = unpack_batch(batch)
        if target is None:
            raise ValueError(
                f"the {stage} batches carry no targets; expected {{'input', 'target'}}"
            )
        x = self._as_network_dtype(x)
        return x, self._as_network_dtype(target) if self.cast_targets else target

    def _as_network_dtype(self, tensor: Tensor) -> Tensor:
        """Floating point data in the network's floating point dtype (float64 data, float32 net).

        Integer data (class labels, token ids) are left as they are.
        """
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            return tensor
        if self._dtype_reference is None:  # found once; `_apply` (.to, .double, ...) forgets it
            param = next((p for p in self.parameters() if p.is_floating_point()), None)
            if param is None:
                return tensor
            self._dtype_reference = (param,)
        return tensor.to(self._dtype_reference[0].dtype)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> UQMethod:
        self._dtype_reference = None
        return super()._apply(fn, *args, **kwargs)

    def _accumulate(self, stage: str, terms: dict[str, Tensor], weight: int) -> None:
        self._running.add(stage, terms, weight)

    def _log_running(self, stage: str, skip: Collection[str] = ()) -> None:
        # `skip`: names the stage's metrics log (e.g. `val_nll` is the predictive NLL, not the
        # loss term); logging a name twice in one hook averages the two values, and under DDP
        # (different `sync_dist`) it is an error
        values = self._running.pop(stage, skip)
        if values:
            if self._trainer is not None and self.trainer.world_size > 1:
                # the means over all processes, for the log and `on_epoch_means` alike (a
                # mean-only network's noise estimate must be the same on every process)
                reduce = self.trainer.strategy.reduce
                values = {k: reduce(v, reduce_op="mean") for k, v in values.items()}
            # one call: every self.log at epoch end costs a pass over Lightning's results
            self.log_dict(values)
            self.on_epoch_means(stage, values)

    def _log_metrics(self, metrics: nn.ModuleDict, stage: str) -> None:
        for name, metric in metrics.items():
            if metric.update_called:
                self.log(f"{stage}_{name}", metric.compute())
            metric.reset()


class RegressionTask:
    """Regression: Gaussian predictive, NLL/RMSE/CRPS/coverage/calibration metrics.

    Mix in before the method family (``class XRegression(RegressionTask, X)``).
    """

    criterion: nn.Module
    #: levels at which ``predict_step`` adds ``quantiles`` ``[N, T, Q]`` (``None``: none), see
    #: :class:`~uq_box.methods.predictive.QuantileLevels`; e.g. ``method.quantile_levels = (0.05,
    #: 0.95)``.
    quantile_levels = QuantileLevels()

    def default_criterion(self) -> nn.Module:
        """Heteroscedastic Gaussian NLL (2 outputs per target)."""
        return NLL()

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must be a module taking ``(outputs, target)``."""
        if not isinstance(criterion, nn.Module):
            raise TypeError(
                f"`criterion` must be an nn.Module such as uq_box.losses.NLL(), got "
                f"{type(criterion).__name__}"
            )

    def build_metrics(self) -> nn.ModuleDict:
        """NLL, moment-matched Gaussian NLL, RMSE, CRPS, 95% coverage, miscalibration area.

        ``nll`` scores the real predictive density (the criterion's ``log_prob``, mixed over
        the samples or members: :class:`~uq_box.metrics.MixtureNLL`); ``nll_gaussian`` the
        Gaussian with the predictive mean and std (the same for one Gaussian network). A
        criterion with a full covariance (:class:`~uq_box.losses.MultivariateNLL`) adds
        ``energy_score``, the multivariate score of draws of the predictive.
        """
        metrics: dict[str, Metric] = {
            "nll": MixtureNLL(),
            "nll_gaussian": GaussianNLL(),
            "rmse": MeanSquaredError(squared=False),
            "crps": CRPS(),
            "coverage_95": IntervalCoverage(level=0.95),
            "miscalibration_area": MiscalibrationArea(),
        }
        if hasattr(self.criterion, "covariance"):
            metrics["energy_score"] = EnergyScore()
        return nn.ModuleDict(metrics)

    def setup_task(self) -> None:
        """A mean-only criterion gets a homoscedastic noise estimate, the training RMSE.

        It is 1 until the first training epoch ends.
        """
        if criterion_num_outputs(self.criterion) == 1 and not hasattr(self.criterion, "std"):
            self.register_buffer("noise_std", torch.ones(()))

    def on_epoch_means(self, stage: str, values: dict[str, Tensor]) -> None:
        """Keep the last training epoch's RMSE as the noise estimate of a mean-only network."""
        if stage == "train" and hasattr(self, "noise_std") and "train_rmse" in values:
            self.noise_std.copy_(values["train_rmse"])

    def predictive(self, outputs: Tensor) -> dict[str, Tensor]:
        """Gaussian mixture moments, see :func:`regression_predictive`.

        A mean-only network (MSE) takes its aleatoric std from the training RMSE, a homoscedastic
        Gaussian noise model, so that its NLL, CRPS and coverage are defined. With
        ``quantile_levels`` set, ``quantiles`` ``[N, T, Q]`` too (:func:`regression_quantiles`).
        """
        noise_std = getattr(self, "noise_std", None)
        preds = regression_predictive(outputs, self.criterion, noise_std)
        if self.quantile_levels is not None:
            levels = self.quantile_levels
            preds["quantiles"] = regression_quantiles(outputs, self.criterion, levels, noise_std)
        return preds

    def check_outputs(self, outputs: Tensor, target: Tensor) -> None:
        """The network must give ``criterion.num_outputs`` outputs per target (a full covariance
        head: its ``output_width(T)``).
        """
        expected = criterion_output_width(self.criterion, target.shape[-1])
        if outputs.shape[-1] != expected:
            raise ValueError(
                f"the network gives {outputs.shape[-1]} outputs per point but the criterion "
                f"{type(self.criterion).__name__} needs {expected} for {target.shape[-1]} "
                f"target(s); set the network's `n_outputs` to {expected} or change `criterion`"
            )

    def data_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Criterion over all samples and points."""
        self.check_outputs(outputs, target)
        return self.criterion(outputs, target)

    def burnin_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """MSE of each sample's mean output: fit the mean before the noise level."""
        self.check_outputs(outputs, target)
        means, _ = criterion_mean_and_std(self.criterion, outputs)
        return ((means - target) ** 2).mean()

    def running_terms(self, outputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Squared error of the sample-mean prediction (logged as ``rmse``)."""
        means, _ = criterion_mean_and_std(self.criterion, outputs)
        return {"mse": ((means.mean(0) - target) ** 2).mean()}

    def update_metrics(
        self, metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        """Feed the predictions to the metrics, see :func:`update_regression_metrics`."""
        update_regression_metrics(metrics, preds, target, self.criterion, self.quantile_levels)


class ClassificationTask:
    """Classification: softmax predictive with entropy / mutual-information split.

    Mix in before the method family (``class XClassification(ClassificationTask, X)``). Targets
    are class indices ``[N]``; the network gives logits ``[N, C]``.
    """

    criterion: nn.Module
    #: Class labels are checked, not cast (a float target is an error).
    cast_targets = False

    def default_criterion(self) -> nn.Module:
        """Cross-entropy on the logits."""
        return nn.CrossEntropyLoss()

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must be a module taking ``(logits [N, C], target [N])``."""
        if not isinstance(criterion, nn.Module):
            raise TypeError(
                f"`criterion` must be an nn.Module such as nn.CrossEntropyLoss(), got "
                f"{type(criterion).__name__}"
            )

    def build_metrics(self) -> nn.ModuleDict:
        """Accuracy, NLL, Brier score and expected calibration error."""
        return nn.ModuleDict(
            {
                "accuracy": MeanMetric(),
                "nll": MulticlassNLL(),
                "brier": BrierScore(),
                "ece": ExpectedCalibrationError(),
            }
        )

    def predictive(self, outputs: Tensor) -> dict[str, Tensor]:
        """Mean probabilities, entropy split, see :func:`classification_predictive`."""
        return classification_predictive(outputs)

    def _check_target(self, outputs: Tensor, target: Tensor) -> None:
        if target.is_floating_point() or target.shape != outputs.shape[1:-1]:
            raise ValueError(
                f"classification targets must be integer class indices of shape "
                f"{tuple(outputs.shape[1:-1])}, got {target.dtype} of shape {tuple(target.shape)}"
            )
        num_classes = outputs.shape[-1]
        # inside torch.func.vmap (stacked runs) a value check is data-dependent control flow;
        # cross-entropy still refuses an index out of range there
        if target.numel() and target.dtype != torch.bool and not in_functorch_transform():
            low, high = (int(v) for v in torch.aminmax(target))
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"the network gives {num_classes} outputs (class logits) per point but the "
                    f"targets hold class index {low if low < 0 else high}; expected class indices "
                    f"in [0, {num_classes}): set the network's `n_outputs` (a CNN's `n_classes`) "
                    f"to the number of classes"
                )

    def data_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Criterion on the logits of all samples ``[S, B, C]``."""
        self._check_target(outputs, target)
        num_samples = outputs.shape[0]
        flat_target = target.unsqueeze(0).expand(num_samples, *target.shape).reshape(-1)
        return self.criterion(outputs.reshape(-1, outputs.shape[-1]), flat_target)

    def running_terms(self, outputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Accuracy of the sample-mean probabilities."""
        probs = outputs.softmax(-1).mean(0)
        return {"accuracy": (probs.argmax(-1) == target).float().mean()}

    def update_metrics(
        self, metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        """Feed the mean probabilities to the metrics."""
        self._check_target(preds["logits"], target)
        for name, metric in metrics.items():
            if name == "accuracy":
                metric.update((preds["pred"].argmax(-1) == target).float())
            else:
                metric.update(preds["pred"], target)


__all__ = [
    "METHOD_STATE_KEY",
    "OWNED_HOOKS",
    "ClassificationTask",
    "RegressionTask",
    "UQMethod",
    "dataset_size",
    "eval_mode",
    "non_negative_int",
    "positive_int",
    "unpack_batch",
]
