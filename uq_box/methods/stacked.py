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

Methods whose state lives outside their parameters and buffers (snapshots, samples or a
posterior collected by lifecycle hooks: SWAG, SG-MCMC, Laplace, post-hoc calibration) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning import LightningModule
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

#: Hooks of :class:`UQMethod` that keep state outside the parameters and buffers; a method that
#: overrides one cannot be stacked by vectorizing its objective alone.
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


class _Call(nn.Module):
    """A method as a module whose forward calls one of its functions by name.

    :meth:`uq_box.nn.ensemble.StackedEnsemble.call_members` runs it with each run's parameters
    and buffers in place; the forward dispatches to the method's objective, prediction or epoch
    hook.
    """

    def __init__(self, method: UQMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, name: str, *args: Any) -> Any:
        method = self.method
        if name in ("loss", "loss_terms"):
            x, target = args
            terms, outputs = method.loss(x, target)
            if name == "loss":
                return terms["loss"]
            return {**terms, **method.running_terms(outputs, target)}
        if name == "predict":
            (x,) = args
            with eval_mode(method.model):
                return method.predictive(method.sample_outputs(x, method.num_mc_samples_test))
        if name == "epoch_means":
            stage, values = args
            method.on_epoch_means(stage, values)
            return torch.zeros(())
        raise ValueError(f"unknown call {name!r}")


def _dispatch(template: _Call, name: str, *args: Any) -> Any:
    return template(name, *args)


def _first(value: Any) -> Any:
    """Run 0's slice of a batched argument (a tensor or a dict of tensors)."""
    if isinstance(value, dict):
        return {k: v[0] for k, v in value.items()}
    return value[0]


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
    """

    def __init__(
        self,
        method: UQMethod | Sequence[UQMethod] | Callable[[], UQMethod],
        num_runs: int | None = None,
    ) -> None:
        super().__init__()
        methods = _methods(method, num_runs)
        for hook in _STATEFUL_HOOKS:
            owner = next(c for c in type(methods[0]).__mro__ if hook in vars(c))
            if owner is not UQMethod and owner is not LightningModule:
                raise TypeError(
                    f"StackedRuns cannot stack {type(methods[0]).__name__}: it overrides "
                    f"`{hook}` ({owner.__name__}), so its state lives outside its parameters and "
                    f"buffers; fit its runs one by one"
                )
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
    def _vmap(self, name: str, *args: Any, in_dims: tuple = ()) -> Any:
        """The template's call ``name`` for every run at once (see :class:`_Call`)."""
        dims = in_dims or (0,) * len(args)
        if (name, self.training) not in self._warm:
            self._warm_up(name, args, dims)
            self._warm.add((name, self.training))
        return self.runs.call_members(_dispatch, name, *args, in_dims=(None, *dims))

    def _warm_up(self, name: str, args: tuple, dims: tuple) -> None:
        """Run the call once on run 0 outside vmap, and undo it: what the network's first call
        prepares (the checked Monte Carlo plan of :mod:`uq_box.nn.graph`) cannot be prepared
        inside vmap. Random generators and buffers are left as they were.
        """
        first = [_first(a) if d == 0 else a for a, d in zip(args, dims, strict=True)]
        tensors = self.runs._tensors()
        buffers = tensors[len(self.runs._param_names) :]
        saved = [b.clone() for b in buffers]
        template = self.runs._template
        if template.training != self.training:
            template.train(self.training)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            with self.runs._swapped(tuple(t[0] for t in tensors)) as call:
                call(name, *first)
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)

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
        """Give the template the trainer (epoch count for burn-in, ``N`` from the loader)."""
        template = self.method
        template._trainer = self.trainer
        template._num_training_points = None

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
        """The sum of the runs' objectives (each run's gradient is its own)."""
        x, target = self._batch(batch, "train")
        # the epoch means of the terms are logged, and feed a mean-only network's noise
        # estimate; without either (Trainer(barebones=True)) the objective alone is computed
        keep_terms = not self.trainer.barebones or hasattr(self.method, "noise_std")
        terms = self._vmap("loss_terms" if keep_terms else "loss", x, target)
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
