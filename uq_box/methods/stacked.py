"""Stacked runs: ``K`` independent runs of one method trained as one vectorized model.

A benchmark repeats a method over splits, folds or seeds; a cross-validation fits it ``K``
times. :class:`StackedRuns` trains the ``K`` runs in one ``Trainer.fit``: their parameters and
buffers are stacked along a leading run dimension (:class:`uq_box.nn.ensemble.StackedEnsemble`)
and every step is one ``torch.func.vmap`` call of the method's own objective
(:meth:`UQMethod.loss`) over the runs, with ``randomness="different"``: each run draws its own
Monte Carlo noise (weight samples, dropout masks). Each run gets its own batches from a
:class:`~uq_box.datamodules.StackedDataModule` (``[K, B, ...]``), the summed loss keeps each
run's gradient its own, and with an elementwise optimizer (Adam, SGD, ...) the stacked fit equals
``K`` separate fits on the same batches and noise. Validation and test metrics are computed per
run; :meth:`StackedRuns.run` returns run ``k`` as a standalone method.

**Lifecycle hooks.** A method that overrides a stateful hook of :class:`UQMethod`
(:data:`_STATEFUL_HOOKS`) is refused unless it declares the hook in
:attr:`UQMethod.stackable_hooks`, saying that the hook acts on the method's own parameters and
buffers only; methods whose state lives elsewhere (snapshots, samples or a posterior collected by
their hooks: SWAG, SG-MCMC, Laplace, post-hoc calibration) stay refused. Declared hooks run for
every run, without gradients:

- per step (``on_train_batch_begin``, ``after_optimizer_step``, ``on_train_epoch_done``): in one
  vmap call for all runs (``on_train_batch_begin`` inside the objective's call, before it). Only
  in-place updates reach the stack; a hook that assigns a new tensor is an error.
- once per fit (``on_fit_begin``, ``on_train_done``): run by run, outside vmap
  (:meth:`~uq_box.nn.ensemble.StackedEnsemble.for_each_member`). The template holds views of run
  ``k``'s slices of the stacked tensors, so in-place writes land in the stack; an assigned tensor
  is copied into the slice, or, for a buffer that every run resizes alike (a fitted density), the
  buffer is stacked anew. The hook's ``self.trainer`` is the trainer, except that its
  ``train_dataloader`` (and its data module's loaders) yield run ``k``'s slices ``[B, ...]`` of
  the stacked batches; all runs replay one pass over the loader.

SNGP (the GP precision reset at every epoch's first batch), DUE (the inducing points and length
scale from each run's training features) and DDU (the feature density fitted after training)
stack this way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning import LightningDataModule, LightningModule
from torch import Tensor, nn

from uq_box.checks import positive_int
from uq_box.methods.base import (
    RESUME_STATE_KEY,
    FastHookBookkeeping,
    RunningMeans,
    UQMethod,
    eval_mode,
    optimizer_config,
    restore_resume_state,
    resume_state,
    unpack_batch,
)
from uq_box.nn.ensemble import StackedEnsemble, reinitialized

__all__ = ["StackedRuns"]

#: Hooks of :class:`UQMethod` that may keep state outside the parameters and buffers; a method
#: that overrides one is stacked only where it declares the hook in ``stackable_hooks``.
_STATEFUL_HOOKS = (
    "on_fit_begin",
    "on_train_batch_begin",
    "after_optimizer_step",
    "on_train_epoch_done",
    "on_train_done",
    "extra_checkpoint_state",
    "load_extra_checkpoint_state",
    "optimizer_parameters",
    "training_step",
    "validation_step",
)
#: Declarable hooks that run every step or epoch: one vectorized call for all runs.
_PER_STEP_HOOKS = ("on_train_batch_begin", "after_optimizer_step", "on_train_epoch_done")
#: Declarable hooks that run once per fit: run by run, outside vmap.
_PER_FIT_HOOKS = ("on_fit_begin", "on_train_done")


def _overrides(cls: type, hook: str) -> type | None:
    """The class below :class:`UQMethod` that defines ``hook`` for ``cls``, if any."""
    owner = next(c for c in cls.__mro__ if hook in vars(c))
    return None if owner is UQMethod or owner is LightningModule else owner


def _stackable_hooks(cls: type) -> frozenset[str]:
    """The hooks ``cls`` overrides that :class:`StackedRuns` runs per run; a ``TypeError`` for
    any other overridden stateful hook.

    A hook counts as declared only where the class declaring ``stackable_hooks`` is the hook's
    own class or a subclass of it (a subclass that overrides a declared hook anew must declare it
    again).
    """
    mro = cls.__mro__
    declarer = next((c for c in mro if "stackable_hooks" in vars(c)), UQMethod)
    declared = frozenset(declarer.stackable_hooks)
    unknown = declared - set(_PER_STEP_HOOKS + _PER_FIT_HOOKS)
    if unknown:
        raise TypeError(
            f"{declarer.__name__}.stackable_hooks: {sorted(unknown)} cannot run per stacked run; "
            f"declarable hooks are {sorted(_PER_STEP_HOOKS + _PER_FIT_HOOKS)}"
        )
    hooks = set()
    for hook in _STATEFUL_HOOKS:
        owner = _overrides(cls, hook)
        if owner is None:
            continue
        if hook not in declared or mro.index(declarer) > mro.index(owner):
            raise TypeError(
                f"StackedRuns cannot stack {cls.__name__}: it overrides `{hook}` "
                f"({owner.__name__}), so its state lives outside its parameters and buffers; fit "
                f"its runs one by one"
            )
        hooks.add(hook)
    return frozenset(hooks)


class _Call(nn.Module):
    """A method as a module whose forward calls one of its functions by name.

    :meth:`uq_box.nn.ensemble.StackedEnsemble.call_members` runs it with each run's parameters
    and buffers in place; the forward runs the method's declared per-step ``hooks`` (``(name,
    args)`` pairs, without gradients), then dispatches to its objective, prediction or epoch
    hook (``"hooks"``: the hooks alone).
    """

    def __init__(self, method: UQMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, name: str, hooks: tuple[tuple[str, tuple], ...], *args: Any) -> Any:
        method = self.method
        if hooks:
            with torch.no_grad():
                for hook, hook_args in hooks:
                    getattr(method, hook)(*hook_args)
        if name in ("loss", "loss_terms"):
            x, target = args
            terms, outputs = method.loss(x, target)
            if name == "loss":
                return terms["loss"]
            return {**terms, **method.running_terms(outputs, target)}
        if name == "predict":
            (x,) = args
            with eval_mode(method.model):
                return method.predict_inputs(x)
        if name == "epoch_means":
            stage, values = args
            method.on_epoch_means(stage, values)
            return torch.zeros(())
        if name == "hooks":
            return torch.zeros(())
        raise ValueError(f"unknown call {name!r}")


def _run_slice(batch: Any, index: int) -> Any:
    """Run ``index``'s slice of a stacked batch (a dict, tuple or list of tensors, or one)."""
    if isinstance(batch, Tensor):
        return batch[index]
    if isinstance(batch, dict):
        return {k: _run_slice(v, index) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_run_slice(v, index) for v in batch)
    return batch


class _SharedPass:
    """One pass over a stacked loader that every run's view replays (a loader may count its
    passes, or draw a new order in each: the runs of one hook call must see the same batches).
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._iterator: Any = None
        self._batches: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        for index in itertools.count():
            if index == len(self._batches):
                if self._iterator is None:
                    self._iterator = iter(self.loader)
                try:
                    self._batches.append(next(self._iterator))
                except StopIteration:
                    return
            yield self._batches[index]


class _RunLoader:
    """Run ``index``'s batches of a shared pass over a stacked loader; other attributes (such as
    ``num_samples``, one run's training set size) are the loader's.
    """

    def __init__(self, shared: _SharedPass, index: int) -> None:
        self._shared = shared
        self._index = index

    def __iter__(self) -> Iterator[Any]:
        return (_run_slice(batch, self._index) for batch in self._shared)

    def __len__(self) -> int:
        return len(self._shared.loader)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._shared.loader, name)


class _RunDataModule:
    """A data module as run ``index`` sees it: its ``*_dataloader()`` give run ``index``'s
    batches; everything else is the data module's.
    """

    def __init__(self, datamodule: Any, index: int, passes: dict[str, _SharedPass]) -> None:
        self._datamodule = datamodule
        self._index = index
        self._passes = passes

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._datamodule, name)
        if not (name.endswith("_dataloader") and callable(value)):
            return value

        def loader() -> _RunLoader:
            key = f"datamodule.{name}"
            if key not in self._passes:
                self._passes[key] = _SharedPass(value())
            return _RunLoader(self._passes[key], self._index)

        return loader


class _RunTrainer:
    """The trainer as run ``index`` sees it in a once-per-fit hook: its training loader and its
    data module's loaders give run ``index``'s slices of the stacked batches; everything else
    (``world_size``, ``strategy``, ``current_epoch``, ...) is the trainer's.
    """

    def __init__(self, trainer: Any, index: int, passes: dict[str, _SharedPass]) -> None:
        self._trainer = trainer
        self._index = index
        self._passes = passes

    @property
    def train_dataloader(self) -> _RunLoader | None:
        """Run ``index``'s training batches (also before the fit loop has set its loader up)."""
        loader = self._trainer.train_dataloader
        if loader is None:  # on_fit_begin, with loaders given to `fit` (not a data module)
            source = getattr(self._trainer.fit_loop, "_data_source", None)
            instance = getattr(source, "instance", None)
            if not isinstance(instance, LightningModule | LightningDataModule):
                loader = instance
        if loader is None:
            return None
        if "train_dataloader" not in self._passes:
            self._passes["train_dataloader"] = _SharedPass(loader)
        return _RunLoader(self._passes["train_dataloader"], self._index)

    @property
    def datamodule(self) -> _RunDataModule | None:
        """The data module, its loaders giving run ``index``'s batches."""
        datamodule = self._trainer.datamodule
        return None if datamodule is None else _RunDataModule(datamodule, self._index, self._passes)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._trainer, name)


def _dispatch(template: _Call, name: str, *args: Any) -> Any:
    return template(name, *args)


def _methods(
    method: UQMethod | Sequence[UQMethod] | Callable[[], UQMethod], num_runs: int | None
) -> list[UQMethod]:
    if isinstance(method, UQMethod):
        num_runs = positive_int(num_runs, "num_runs") if num_runs is not None else None
        if num_runs is None:
            raise ValueError("`num_runs` is required when `method` is one method")
        return [method] + [reinitialized(method) for _ in range(num_runs - 1)]
    if callable(method) and not isinstance(method, nn.Module):
        if num_runs is None:
            raise ValueError("`num_runs` is required when `method` is a factory")
        methods = [method() for _ in range(positive_int(num_runs, "num_runs"))]
    else:
        methods = list(method)
        if num_runs is not None and num_runs != len(methods):
            raise ValueError(
                f"`num_runs`={num_runs} but {len(methods)} methods were given; pass None"
            )
    bad = [type(m).__name__ for m in methods if not isinstance(m, UQMethod)]
    if not methods or bad:
        raise TypeError(
            f"`method` must be a UQMethod, a list of them or a factory returning one; got {bad}"
        )
    return methods


class StackedRuns(FastHookBookkeeping, LightningModule):
    """``K`` independent runs of a method as one model; train it with any ``lightning.Trainer``.

    Args:
        method: one method (copied ``num_runs`` times: run 0 is the method itself, the others
            get a fresh random init with ``reset_parameters``), a list of ``K`` methods of one
            architecture (e.g. each seeded on its own), or a factory called ``num_runs`` times.
        num_runs: ``K`` (with one method or a factory).

    Feed it a :class:`~uq_box.datamodules.StackedDataModule`: batches ``{"input": [K, B, ...],
    "target": [K, B, ...]}``. The optimizer and learning-rate scheduler are the method's own
    (``optimizer``, ``lr_scheduler``), over the stacked parameters. Logged values are the means
    over runs (``train_loss``, ``val_nll``, ...); the test stage also logs each run's metrics
    (``test_nll/run_3``), and :attr:`run_metrics` keeps the last epoch's per-run values
    ``[K]`` of every stage.

    :meth:`predict_step` gives the method's prediction contract with a leading run dimension
    (``pred`` ``[K, N, ...]``), for per-run inputs ``[K, N, ...]`` or for inputs ``[N, ...]``
    that every run sees (``shared_inputs=True``).

    The method's lifecycle hooks run per run where it declares them in ``stackable_hooks``; a
    method overriding another stateful hook is a ``TypeError`` (see the module doc).
    """

    def __init__(
        self,
        method: UQMethod | Sequence[UQMethod] | Callable[[], UQMethod],
        num_runs: int | None = None,
    ) -> None:
        super().__init__()
        methods = _methods(method, num_runs)
        #: the method's hooks that run per run (see the module doc)
        self._run_hooks = _stackable_hooks(type(methods[0]))
        if len({type(m) for m in methods}) > 1:
            raise TypeError(
                f"`method`: all runs must be one method class, got "
                f"{sorted({type(m).__name__ for m in methods})}"
            )
        self.num_runs = len(methods)
        self.runs = StackedEnsemble([_Call(m) for m in methods])
        first = methods[0]
        self.optimizer_fn = first.optimizer or first.default_optimizer
        self.lr_scheduler_fn = first.lr_scheduler
        self._check_optimizer = first.check_optimizer
        self.val_metrics = nn.ModuleList([first.build_metrics() for _ in methods])
        self.test_metrics = nn.ModuleList([first.build_metrics() for _ in methods])
        #: The last epoch's per-run values ``[K]`` by stage (``"train"``, ``"val"``, ``"test"``).
        self.run_metrics: dict[str, dict[str, Tensor]] = {}
        self._running = RunningMeans()
        self._warm: set[tuple[str, bool]] = set()
        # one backward and optimizer step per training step, called here: Lightning's automatic
        # optimization (closure, hooks per step) costs as much as a small stacked step
        self.automatic_optimization = False

    @property
    def method(self) -> UQMethod:
        """The method's template (parameters on the meta device; :meth:`run` gives real ones)."""
        return self.runs._template.method

    def run(self, index: int) -> UQMethod:
        """Run ``index`` as a standalone method with its current parameters and buffers."""
        if not -self.num_runs <= index < self.num_runs:
            raise IndexError(f"`index` must be in [0, {self.num_runs}), got {index}")
        method = self.runs.member(index % self.num_runs).method
        method._device = next(iter(self.runs.params.values())).device
        return method

    # -- the vectorized calls -----------------------------------------------------------------
    def _vmap(
        self, name: str, *args: Any, in_dims: tuple = (), hooks: tuple[tuple[str, tuple], ...] = ()
    ) -> Any:
        """The template's call ``name`` for every run at once, after the per-step ``hooks``
        (see :class:`_Call`).
        """
        args = (hooks, *args)
        dims = (None, *(in_dims or (0,) * (len(args) - 1)))
        key = (name, self.training, tuple(hook for hook, _ in hooks))
        if key not in self._warm:
            self._warm_up(name, args, dims)
            self._warm.add(key)
        # an assignment (not an in-place update) would be lost inside vmap: refused
        in_place = bool(hooks) or name == "epoch_means"
        return self.runs.call_members(
            _dispatch, name, *args, in_dims=(None, *dims), in_place=in_place
        )

    def _warm_up(self, name: str, args: tuple, dims: tuple) -> None:
        """Run the call once on run 0 outside vmap, and undo it: what the network's first call
        prepares (the checked Monte Carlo plan of :mod:`uq_box.nn.graph`) cannot be prepared
        inside vmap. Random generators, parameters and buffers are left as they were.
        """
        first = [_run_slice(a, 0) if d == 0 else a for a, d in zip(args, dims, strict=True)]
        kept = self.runs._tensors()
        saved = [t.detach().clone() for t in kept]
        template = self.runs._template
        if template.training != self.training:
            template.train(self.training)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            with self.runs._swapped(tuple(t[0] for t in kept)) as call:
                call(name, *first)
        with torch.no_grad():
            for tensor, value in zip(kept, saved, strict=True):
                tensor.copy_(value)
        self.method._dtype_reference = None  # may hold run 0's view: found again when needed

    def _step_hooks(self, hook: str, *args: Any) -> tuple[tuple[str, tuple], ...]:
        """``hook`` with its ``args`` for :meth:`_vmap`, if the method declares it."""
        return ((hook, args),) if hook in self._run_hooks else ()

    def _per_step_hook(self, hook: str) -> None:
        """A declared per-step hook for every run at once: one vmap call, without gradients."""
        hooks = self._step_hooks(hook)
        if hooks:
            with torch.no_grad():
                self._vmap("hooks", hooks=hooks)

    def _per_fit_hook(self, hook: str) -> None:
        """A declared once-per-fit hook run by run, outside vmap and without gradients: the
        template holds run ``k``'s slices of the stacked tensors (in-place writes land in the
        stack, assigned tensors are copied or stacked, see
        :meth:`~uq_box.nn.ensemble.StackedEnsemble.for_each_member`) and sees the trainer
        through :class:`_RunTrainer` (run ``k``'s training batches).
        """
        if hook not in self._run_hooks:
            return
        template = self.method
        passes: dict[str, _SharedPass] = {}
        device = getattr(template, "_device", None)
        template._device = self.device

        def call(index: int, member: _Call) -> None:
            member.method._trainer = _RunTrainer(self.trainer, index, passes)
            getattr(member.method, hook)()

        try:
            self.runs.for_each_member(call)
        finally:
            template._trainer = self.trainer
            template._device = device
            template._dtype_reference = None  # may hold a run's view: found again when needed

    def _as_network_dtype(self, tensor: Tensor) -> Tensor:
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            return tensor
        return tensor.to(self._param_dtype)

    def _batch(self, batch: Any, stage: str) -> tuple[Tensor, Tensor]:
        x, target = unpack_batch(batch)
        if target is None:
            raise ValueError(
                f"the {stage} batches carry no targets; expected {{'input', 'target'}}"
            )
        if x.ndim < 2 or x.shape[0] != self.num_runs or target.shape[0] != self.num_runs:
            raise ValueError(
                f"StackedRuns of {self.num_runs} runs needs per-run batches [K={self.num_runs}, "
                f"B, ...]; got inputs {tuple(x.shape)} and targets {tuple(target.shape)} (feed a "
                f"StackedDataModule)"
            )
        x = self._as_network_dtype(x)
        cast = self.method.cast_targets
        return x, self._as_network_dtype(target) if cast else target

    @property
    def _param_dtype(self) -> torch.dtype:
        return next(iter(self.runs.params.values())).dtype

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Give the template the trainer (epoch count for burn-in, ``N`` from the loader), then
        the method's ``on_fit_begin`` run by run (where declared).
        """
        template = self.method
        template._trainer = self.trainer
        template._num_training_points = None
        self._per_fit_hook("on_fit_begin")

    def on_train_end(self) -> None:
        """The method's ``on_train_done`` run by run (where declared)."""
        self._per_fit_hook("on_train_done")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the generators' states and the running epoch sums, as a method does."""
        checkpoint[RESUME_STATE_KEY] = resume_state(self._running)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the resume state for :meth:`on_train_start`."""
        self._resume_state = checkpoint.get(RESUME_STATE_KEY)

    def on_train_start(self) -> None:
        """A fit resumed from ``ckpt_path`` draws the uninterrupted fit's noise and logs the
        means over its whole interrupted epoch (see :meth:`UQMethod.on_train_start`).
        """
        state = getattr(self, "_resume_state", None)
        self._resume_state = None
        if state is not None and self.trainer.ckpt_path is not None:
            restore_resume_state(state, self._running, self.device)

    def configure_optimizers(self) -> Any:
        """The method's optimizer (and scheduler) over the stacked parameters."""
        optimizer = self.optimizer_fn([p for p in self.parameters() if p.requires_grad])
        self._check_optimizer(optimizer)
        return optimizer_config(optimizer, self.lr_scheduler_fn)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The sum of the runs' objectives (each run's gradient is its own).

        The method's ``on_train_batch_begin`` (where declared) runs in the objective's vmap call,
        before it: nothing happens in between (Lightning's ``on_train_batch_start``), and a vmap
        call of its own would cost as much as a tenth of a small step.
        """
        x, target = self._batch(batch, "train")
        # the epoch means of the terms are logged, and feed a mean-only network's noise
        # estimate; without either (Trainer(barebones=True)) the objective alone is computed
        keep_terms = not self.trainer.barebones or hasattr(self.method, "noise_std")
        hooks = self._step_hooks("on_train_batch_begin", batch_idx)
        terms = self._vmap("loss_terms" if keep_terms else "loss", x, target, hooks=hooks)
        losses = terms["loss"] if keep_terms else terms
        loss = losses.sum()
        if not torch.isfinite(loss):
            bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
            raise FloatingPointError(
                f"non-finite training loss in runs {bad} at epoch {self.current_epoch}, step "
                f"{self.global_step}; check the data for outliers, lower the learning rate, or "
                f"raise the criterion's `min_std`"
            )
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        self._per_step_hook("after_optimizer_step")
        if keep_terms:
            self._accumulate("train", terms, x.shape[1])
        return loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Each run's objective and predictive metrics on its validation data."""
        x, target = self._batch(batch, "val")
        self._accumulate("val", self._vmap("loss_terms", x, target), x.shape[1])
        self._update_metrics(self.val_metrics, self._predict(x), target)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Each run's predictive metrics on its test data."""
        x, target = self._batch(batch, "test")
        self._update_metrics(self.test_metrics, self._predict(x), target)

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0, shared_inputs: bool = False
    ) -> dict[str, Tensor]:
        """Every run's prediction contract, ``[K, N, ...]`` (see :class:`StackedRuns`)."""
        x, _ = unpack_batch(batch)
        x = self._as_network_dtype(x.to(self.device))
        return self._predict(x, shared_inputs)

    def _predict(self, x: Tensor, shared_inputs: bool = False) -> dict[str, Tensor]:
        with torch.no_grad():
            return self._vmap("predict", x, in_dims=(None,) if shared_inputs else (0,))

    def on_train_epoch_end(self) -> None:
        """Log the means over runs of the training terms; epoch hooks of the task per run."""
        values = self._log_running("train")
        scheduler = self.lr_schedulers()
        if scheduler is not None and not isinstance(
            scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
        ):
            scheduler.step()
        if values:
            with torch.no_grad():
                self._vmap("epoch_means", "train", values, in_dims=(None, 0))
        self._per_step_hook("on_train_epoch_done")

    def on_validation_epoch_end(self) -> None:
        """Log the validation terms and metrics (means over runs)."""
        values = self._log_running("val", skip=set(self.val_metrics[0]))
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and values:
            if not self.trainer.sanity_checking:
                scheduler.step(values["val_loss"].mean())
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        """Log the test metrics: means over runs and each run's."""
        self._log_metrics(self.test_metrics, "test", per_run=True)

    # -- helpers ------------------------------------------------------------------------------
    def _update_metrics(
        self, metrics: nn.ModuleList, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        method = self.method
        for k, run_metrics in enumerate(metrics):
            method.update_metrics(run_metrics, {key: v[k] for key, v in preds.items()}, target[k])

    def _accumulate(self, stage: str, terms: dict[str, Tensor], weight: int) -> None:
        self._running.add(stage, terms, weight)

    def _log_running(self, stage: str, skip: set[str] | frozenset = frozenset()) -> dict:
        values = self._running.pop(stage, skip)
        if values:
            self.run_metrics.setdefault(stage, {}).update(
                {k[len(stage) + 1 :]: v for k, v in values.items()}
            )
            self._log({k: v.mean() for k, v in values.items()})
        return values

    def _log(self, values: dict[str, Tensor]) -> None:
        """One ``log_dict`` call (none under ``Trainer(barebones=True)``, which forbids it)."""
        if not self.trainer.barebones:
            self.log_dict(values)

    def _log_metrics(self, metrics: nn.ModuleList, stage: str, per_run: bool = False) -> None:
        results = {}
        for name in metrics[0]:
            if not metrics[0][name].update_called:
                continue
            results[name] = torch.stack([m[name].compute() for m in metrics]).float()
            for m in metrics:
                m[name].reset()
        if not results:
            return
        self.run_metrics.setdefault(stage, {}).update(results)
        logged = {f"{stage}_{name}": value.mean() for name, value in results.items()}
        if per_run:
            for name, value in results.items():
                logged.update({f"{stage}_{name}/run_{k}": v for k, v in enumerate(value)})
        self._log(logged)
