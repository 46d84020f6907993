"""DDU: Mukhoti, van Amersfoort, Torr & Gal 2023, "Deep Deterministic Uncertainty: A New Simple
Baseline" (CVPR).

A deterministic classifier with spectral-normalized hidden layers
(:func:`uq_box.nn.spectral.spectral_normalize`, coefficient 3 as in the paper) is trained as usual on the
cross-entropy; when training ends (:meth:`DDU.on_train_done`) a Gaussian discriminant analysis
(:class:`uq_box.nn.gda.GaussianDiscriminant`: one Gaussian per class, per-class covariances with the
smallest jitter that makes them positive definite) is fitted to the features of the training
data, one pass over the training loader in eval mode (summed over the processes under DDP). The
feature layer is ``feature_layer``: by default the *input* of the last parameter-owning layer
(the classifier head), else the output of the named module.

**Prediction.** One forward pass. The contract's keys come from the softmax as for a
deterministic classifier: ``pred_uct`` and ``aleatoric_uct`` are the softmax entropy (the
paper's aleatoric measure) and ``epistemic_uct`` is 0 (one network: the contract's epistemic
part is the disagreement of samples). DDU's epistemic measure is the extra key
``density_score`` ``[N]``, **higher = more OOD**: ``-log q(f(x))``, the negative log density of
the features under the fitted class-conditional mixture (the paper thresholds ``log q``, higher
= in-distribution; it is negated here, as every OOD score of :mod:`uq_box.methods.ood`). It is a
log density of the feature space (not in nats of the labels, unbounded, comparable only within
one fitted model) and is present once the GDA is fitted (not during the validation of the fit).
:meth:`DDU.fit_density` refits it on other data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from uq_box.checks import non_negative_int, positive_int
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    UQMethod,
    eval_mode,
    unpack_batch,
)
from uq_box.methods.sngp import capture_input, output_layer_name, spectral_normalize_backbone
from uq_box.nn.gda import GaussianDiscriminant, class_statistics

__all__ = ["DDU", "DDUClassification"]


class DDU(UQMethod):
    """Spectral-normalized deterministic network plus a feature density fitted after training.

    Args:
        model: the classifier backbone (its last layer gives the logits).
        criterion: the data loss (cross-entropy when ``None``).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        spectral_module_names: the layers to spectral-normalize, as ``stochastic_module_names``
            (``None``: every ``nn.Linear`` and ``nn.Conv*d`` but the last parameter-owning
            layer).
        coefficient: the bound ``c`` on each normalized layer's spectral norm (3 in the paper).
        n_power_iterations: power iteration steps per training step and layer.
        feature_layer: the dotted name of the module whose output are the features; ``None``:
            the input of the last parameter-owning layer.
        burnin_epochs: epochs trained on the burn-in loss.
    """

    #: the fit assigns the density's own buffers (stacked runs: per run, stacked anew)
    stackable_hooks: ClassVar[frozenset[str]] = frozenset({"on_train_done"})

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        spectral_module_names: Sequence[int] | Sequence[str] | None = None,
        coefficient: float = 3.0,
        n_power_iterations: int = 1,
        feature_layer: str | None = None,
        burnin_epochs: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        positive_int(n_power_iterations, "n_power_iterations")
        head = output_layer_name(model, -1)
        modules = dict(model.named_modules())
        if feature_layer is not None and (
            not isinstance(feature_layer, str) or feature_layer not in modules or not feature_layer
        ):
            names = [name for name in modules if name]
            raise ValueError(
                f"`feature_layer` must name a submodule of the network, got {feature_layer!r}; "
                f"its modules are {names[:20]}{' ...' if len(names) > 20 else ''}"
            )
        spectral_normalize_backbone(
            model, spectral_module_names, head, coefficient, n_power_iterations
        )
        super().__init__(model, criterion, optimizer, lr_scheduler)
        self.burnin_epochs = burnin_epochs
        self.feature_module_name = head if feature_layer is None else feature_layer
        self.features_are_input = feature_layer is None
        self.density = GaussianDiscriminant()
        self.save_hyperparameters(ignore=["model", "criterion", "optimizer", "lr_scheduler"])

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """The single output as one sample: ``[1, N, C]``."""
        return self.model(x).unsqueeze(0)

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``[N, C]`` and the flattened features ``[N, D]`` of one forward pass."""
        module = self.model.get_submodule(self.feature_module_name)
        if self.features_are_input:
            with capture_input(module) as captured:
                logits = self.model(x)
        else:
            captured = []
            handle = module.register_forward_hook(
                lambda m, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
            )
            try:
                logits = self.model(x)
            finally:
                handle.remove()
        if len(captured) != 1:
            raise ValueError(
                f"`feature_layer` {self.feature_module_name!r} runs {len(captured)} times in one "
                f"forward pass; name a module that runs once"
            )
        return logits, captured[0].reshape(len(x), -1)

    @torch.no_grad()
    def fit_density(self, batches: Iterable[Any], num_classes: int | None = None) -> DDU:
        """Fit the feature density to labelled batches (dicts, tuples), in eval mode.

        Under DDP (inside a fit) the statistics are summed over the processes. Returns ``self``.
        """
        stats = None
        with eval_mode(self.model):
            for batch in batches:
                x, y = unpack_batch(batch)
                if y is None:
                    raise ValueError("fit_density needs labelled batches (inputs and targets)")
                x = self._as_network_dtype(x.to(self.device))
                logits, features = self.logits_and_features(x)
                classes = logits.shape[-1] if num_classes is None else num_classes
                batch_stats = class_statistics(features, y.to(self.device), classes)
                stats = (
                    batch_stats
                    if stats is None
                    else [a + b for a, b in zip(stats, batch_stats, strict=True)]
                )
        if stats is None:
            raise ValueError("fit_density got no batches")
        if self._trainer is not None and self.trainer.world_size > 1:
            reduce = self.trainer.strategy.reduce
            stats = [reduce(s, reduce_op="sum") for s in stats]
        self.density.fit(*stats)
        return self

    def on_train_done(self) -> None:
        """Fit the feature density on the training loader."""
        loader = self.trainer.train_dataloader
        if loader is None and self.trainer.datamodule is not None:
            loader = self.trainer.datamodule.train_dataloader()
        self.fit_density(loader)

    def predict_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """The softmax predictive, plus ``density_score`` (higher = more OOD) once fitted."""
        logits, features = self.logits_and_features(x)
        preds = self.predictive(logits.unsqueeze(0))
        if self.density.fitted:
            score = -self.density.log_density(features)
            preds["density_score"] = score.to(logits.dtype)
        return preds


class DDUClassification(ClassificationTask, DDU):
    """DDU classifier: softmax entropy (aleatoric) and the feature density score
    ``density_score`` (epistemic, higher = more OOD); see :mod:`uq_box.methods.ddu`.
    """
