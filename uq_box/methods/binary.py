"""Binary and multilabel classification: sigmoid outputs, one independent logit per label.

:class:`BinaryClassificationTask` is the task mixin (as :class:`~uq_box.methods.base.ClassificationTask`
is for softmax classifiers):

- **binary**: the network gives 1 logit per point, targets ``[N]`` in ``{0, 1}``;
- **multilabel**: ``L`` logits per point, targets ``[N, L]`` in ``{0, 1}`` (each label its own
  binary problem, *binary relevance*; binary is ``L = 1``, targets ``[N]`` or ``[N, 1]``).

Targets may be integers, booleans or floats in ``{0, 1}``. The default loss is
``nn.BCEWithLogitsLoss()``; the data loss is its mean times ``L``, the binary cross-entropy
summed over the labels and averaged over points (the log-likelihood per point of independent
labels, what an ELBO needs). The prediction contract
(:func:`~uq_box.methods.predictive_binary.binary_predictive`): ``pred`` ``[N, L]`` the mean
probabilities of label 1; ``pred_uct = aleatoric_uct + epistemic_uct`` ``[N]``, the binary
entropy of ``pred``, the expected binary entropy and the mutual information, summed over the
labels; the same per label in ``pred_uct_per_label``, ``aleatoric_uct_per_label``,
``epistemic_uct_per_label`` ``[N, L]``; ``logits`` ``[S, N, L]``.

Metrics (``val_*``, ``test_*``), over all points and labels (each label a two-class problem;
per-label values with :func:`~uq_box.methods.predictive_binary.binary_metrics`): ``accuracy`` of
``pred > 0.5``, ``nll`` the binary cross-entropy of ``pred``, ``brier`` the binary Brier score
``(pred - y)^2``, ``ece`` the top-label ECE of the two-class probabilities ``(1 - p, p)``.

The thin classes cover the main families: :class:`DeterministicBinaryClassification`,
:class:`MCDropoutBinaryClassification`, :class:`DeepEnsembleBinaryClassification`,
:class:`BNNVIBinaryClassification`, :class:`MCBatchNormBinaryClassification` and
:class:`TTABinaryClassification`; each takes its family's constructor arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from uq_box.methods.bnn_vi import BNNVI
from uq_box.methods.deep_ensemble import DeepEnsemble
from uq_box.methods.deterministic import Deterministic
from uq_box.methods.mc_batchnorm import MCBatchNormMethod
from uq_box.methods.mc_dropout import MCDropoutMethod
from uq_box.methods.predictive_binary import binary_predictive, two_class_probabilities
from uq_box.methods.tta import TTAMethod
from uq_box.metrics.classification import ExpectedCalibrationError, MulticlassNLL
from uq_box.nn.graph import in_functorch_transform

__all__ = [
    "BNNVIBinaryClassification",
    "BinaryClassificationTask",
    "DeepEnsembleBinaryClassification",
    "DeterministicBinaryClassification",
    "MCBatchNormBinaryClassification",
    "MCDropoutBinaryClassification",
    "TTABinaryClassification",
]


class BinaryClassificationTask:
    """Binary and multilabel classification: sigmoid predictive with the per-label entropy split.

    Mix in before the method family (``class XBinaryClassification(BinaryClassificationTask,
    X)``). The network gives ``L`` logits ``[N, L]`` (``L = 1``: binary); targets ``[N]`` (binary)
    or ``[N, L]`` in ``{0, 1}``. See the module docstring for the contract and the metrics.
    """

    criterion: nn.Module
    #: Labels are checked (values in {0, 1}) and cast to the logits' dtype in the loss.
    cast_targets = False

    def default_criterion(self) -> nn.Module:
        """Binary cross-entropy on the logits (``nn.BCEWithLogitsLoss``)."""
        return nn.BCEWithLogitsLoss()

    def check_criterion(self, criterion: nn.Module) -> None:
        """The criterion must be a module taking ``(logits [..., L], float targets [..., L])``."""
        if not isinstance(criterion, nn.Module):
            raise TypeError(
                f"`criterion` must be an nn.Module such as nn.BCEWithLogitsLoss(), got "
                f"{type(criterion).__name__}"
            )

    def build_metrics(self) -> nn.ModuleDict:
        """Accuracy, NLL, Brier score and ECE over all points and labels."""
        return nn.ModuleDict(
            {
                "accuracy": MeanMetric(),
                "nll": MulticlassNLL(),
                "brier": MeanMetric(),
                "ece": ExpectedCalibrationError(),
            }
        )

    def predictive(self, outputs: Tensor) -> dict[str, Tensor]:
        """Mean probabilities and the per-label entropy split, see :func:`binary_predictive`."""
        return binary_predictive(outputs)

    def label_targets(self, outputs: Tensor, target: Tensor) -> Tensor:
        """The targets as ``[N, L]`` in the logits' dtype, checked against outputs ``[S, N, L]``."""
        width = outputs.shape[-1]
        if width == 1 and target.shape == outputs.shape[1:-1]:
            target = target.unsqueeze(-1)
        elif target.shape != outputs.shape[1:]:
            raise ValueError(
                f"the network gives {width} outputs (logits) per point but the targets have "
                f"shape {tuple(target.shape)}; binary classification needs 1 output (set the "
                f"network's `n_outputs` to 1) and targets [N] in {{0, 1}}, multilabel "
                f"classification L outputs (`n_outputs` = L) and targets [N, L]"
            )
        if target.numel() and not in_functorch_transform():
            if bool(((target != 0) & (target != 1)).any()):
                raise ValueError(
                    "binary and multilabel targets must be 0 or 1; class indices of more than "
                    "two classes need a softmax classifier (e.g. DeterministicClassification)"
                )
        return target.to(outputs.dtype)

    def data_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """The negative log-likelihood per point: the criterion's mean over samples, points and
        labels of the logits ``[S, B, L]``, times ``L`` (summed over the labels, so that an ELBO's
        data term per point is right for multilabel targets).
        """
        labels = self.label_targets(outputs, target)
        return self.criterion(outputs, labels.unsqueeze(0).expand_as(outputs)) * outputs.shape[-1]

    def running_terms(self, outputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Accuracy of the sample-mean probabilities over points and labels."""
        labels = self.label_targets(outputs, target)
        probs = outputs.sigmoid().mean(0)
        return {"accuracy": ((probs > 0.5) == (labels > 0.5)).float().mean()}

    def update_metrics(
        self, metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        """Feed every (point, label) pair to the metrics as a two-class prediction."""
        labels = self.label_targets(preds["logits"], target).reshape(-1)
        pred = preds["pred"].reshape(-1)
        for name, metric in metrics.items():
            if name == "accuracy":
                metric.update(((pred > 0.5) == (labels > 0.5)).to(pred.dtype))
            elif name == "brier":
                metric.update((pred - labels).square())
            else:
                metric.update(two_class_probabilities(pred), labels.to(torch.long))


class DeterministicBinaryClassification(BinaryClassificationTask, Deterministic):
    """Plain binary / multilabel classifier on the binary cross-entropy (no epistemic part)."""


class MCDropoutBinaryClassification(BinaryClassificationTask, MCDropoutMethod):
    """MC dropout for binary / multilabel classification (per-label entropy split)."""


class DeepEnsembleBinaryClassification(BinaryClassificationTask, DeepEnsemble):
    """Deep ensemble for binary / multilabel classification (binary cross-entropy per member)."""


class BNNVIBinaryClassification(BinaryClassificationTask, BNNVI):
    """Bayes by Backprop for binary / multilabel classification (ELBO with the binary
    cross-entropy as the data term).
    """


class MCBatchNormBinaryClassification(BinaryClassificationTask, MCBatchNormMethod):
    """MC BatchNorm for binary / multilabel classification."""


class TTABinaryClassification(BinaryClassificationTask, TTAMethod):
    """Test-time augmentation for binary / multilabel classification (augmentation spread)."""
