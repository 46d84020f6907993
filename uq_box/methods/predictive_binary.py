"""Predictive distributions of binary and multilabel classifiers (sigmoid outputs; pure functions).

``S`` samples (Monte Carlo weight samples, ensemble members, augmentations) of ``L`` independent
logits ``[S, N, L]`` give, per label, the Bayesian model average ``pbar = mean_s sigmoid(z_s)``,
the probability that the label is 1. Binary classification is ``L = 1``.

Per label the entropy decomposition of Depeweg et al. 2018 holds for the Bernoulli predictive,
with the binary entropy ``h(p) = -p log p - (1 - p) log(1 - p)`` in nats (in ``[0, log 2]``):

- total ``h(pbar)``, aleatoric ``mean_s h(p_s)``, epistemic (mutual information between the label
  and the sample) ``h(pbar) - mean_s h(p_s) >= 0``.

The contract's ``pred_uct``, ``aleatoric_uct`` and ``epistemic_uct`` ``[N]`` are these summed
over the labels (for independent labels, the sum of the labels' entropies is the entropy of the
product of their Bernoulli predictives); the per-label values are the ``*_per_label`` keys
``[N, L]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional

from uq_box.metrics.functional_classification import expected_calibration_error, multiclass_nll
from uq_box.nn.graph import in_functorch_transform

__all__ = ["binary_entropy", "binary_metrics", "binary_predictive", "two_class_probabilities"]


def _neg_plogp(log_p: Tensor) -> Tensor:
    """``-p log p`` from ``log p`` (``0 log 0 = 0``)."""
    p = log_p.exp()
    positive = p > 0
    safe = torch.where(positive, log_p, torch.zeros_like(log_p))
    return torch.where(positive, -p * safe, torch.zeros_like(log_p))


def binary_entropy(p: Tensor) -> Tensor:
    """``h(p) = -p log p - (1 - p) log(1 - p)`` in nats, elementwise (``0 log 0 = 0``)."""
    p = p.clamp(0.0, 1.0)
    return torch.special.entr(p) + torch.special.entr(1.0 - p)


def binary_predictive(logits: Tensor) -> dict[str, Tensor]:
    """Bayesian model average of ``S`` sigmoid predictions per label, with the entropy split.

    Computed from ``logsigmoid`` (``log pbar`` and ``log(1 - pbar)`` by a ``logsumexp`` over the
    samples), so saturated logits give no NaN.

    Args:
        logits: sampled logits ``[S, N, L]`` (``L = 1`` for binary classification).

    Returns:
        ``pred``: mean probabilities of label 1 ``[N, L]``;
        ``pred_uct``, ``aleatoric_uct``, ``epistemic_uct``: total (binary entropy of ``pred``),
        expected binary entropy and mutual information ``[N]``, summed over the labels;
        ``pred_uct_per_label``, ``aleatoric_uct_per_label``, ``epistemic_uct_per_label``: the
        same per label ``[N, L]``;
        ``logits``: the input ``[S, N, L]``. In nats; ``epistemic = total - aleatoric`` (clamped
        at 0 against round-off).

    Raises:
        ValueError: if ``logits`` is not ``[S, N, L]`` or holds NaN.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"`logits` must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 3 or logits.shape[0] == 0 or logits.shape[2] == 0:
        raise ValueError(
            f"`logits` must have shape [S, N, L] with S, L >= 1, got {list(logits.shape)}"
        )
    if not in_functorch_transform() and bool(logits.isnan().any()):
        raise ValueError("`logits` holds NaN")
    log_p, log_q = (
        functional.logsigmoid(logits),
        functional.logsigmoid(-logits),
    )  # log p, log(1 - p)
    log_s = math.log(logits.shape[0])
    log_pbar = torch.logsumexp(log_p, dim=0) - log_s
    log_qbar = torch.logsumexp(log_q, dim=0) - log_s
    total = _neg_plogp(log_pbar) + _neg_plogp(log_qbar)
    aleatoric = (_neg_plogp(log_p) + _neg_plogp(log_q)).mean(0)
    epistemic = (total - aleatoric).clamp_min(0.0)
    return {
        "pred": log_p.exp().mean(0),
        "pred_uct": total.sum(-1),
        "aleatoric_uct": aleatoric.sum(-1),
        "epistemic_uct": epistemic.sum(-1),
        "pred_uct_per_label": total,
        "aleatoric_uct_per_label": aleatoric,
        "epistemic_uct_per_label": epistemic,
        "logits": logits,
    }


def two_class_probabilities(pred: Tensor) -> Tensor:
    """``[N, L]`` label-1 probabilities as ``[N, L, 2]`` two-class probabilities ``(1 - p, p)``."""
    return torch.stack([1.0 - pred, pred], dim=-1)


def binary_metrics(pred: Tensor, target: Tensor, num_bins: int = 15) -> dict[str, Tensor]:
    """Accuracy, NLL, Brier score and ECE of each label ``[L]``.

    Every label is a two-class problem: accuracy of ``pred > 0.5``, the mean negative
    log-likelihood (binary cross-entropy of ``pred``), the binary Brier score ``(p - y)^2`` and
    the top-label ECE of the two-class probabilities ``(1 - p, p)`` with ``num_bins`` bins.

    Args:
        pred: probabilities of label 1 ``[N, L]`` (or ``[N]``).
        target: labels in ``{0, 1}`` of the same shape.

    Returns:
        ``{"accuracy", "nll", "brier", "ece"}``, each ``[L]``.
    """
    pred = pred.unsqueeze(-1) if pred.ndim == 1 else pred
    target = target.reshape(pred.shape)
    labels = target.long()
    probs = two_class_probabilities(pred)
    values: dict[str, list[Tensor]] = {"accuracy": [], "nll": [], "brier": [], "ece": []}
    for k in range(pred.shape[1]):
        values["accuracy"].append(((pred[:, k] > 0.5).long() == labels[:, k]).to(pred.dtype).mean())
        values["nll"].append(multiclass_nll(probs[:, k], labels[:, k]))
        values["brier"].append((pred[:, k] - labels[:, k].to(pred.dtype)).square().mean())
        values["ece"].append(expected_calibration_error(probs[:, k], labels[:, k], num_bins))
    return {name: torch.stack(v) for name, v in values.items()}
