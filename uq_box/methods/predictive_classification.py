"""Predictive distributions of classifiers from Monte Carlo samples of logits (pure functions).

``S`` samples (Monte Carlo weight samples or ensemble members) of logits ``[S, N, C]`` give the
Bayesian model average ``pbar = mean_s softmax(logits_s)``. Two decompositions of its uncertainty
are offered:

- **Entropy** (Depeweg et al. 2018, "Decomposition of uncertainty in Bayesian deep learning"; the
  prediction contract, see [docs/architecture.md](../architecture.md#the-prediction-contract)):
  total = predictive entropy ``H[pbar]``, aleatoric = expected entropy ``E_s H[p_s]``, epistemic =
  mutual information ``H[pbar] - E_s H[p_s]``, in nats.
- **Variance** (Kendall & Gal 2017; Kwon et al. 2020, "Uncertainty quantification using Bayesian
  neural networks in classification"): aleatoric = ``mean_s(diag(p_s) - p_s p_s^T)``, epistemic =
  ``mean_s((p_s - pbar)(p_s - pbar)^T)``; their sum is ``diag(pbar) - pbar pbar^T``, the covariance
  of the one-hot label under ``pbar``. :func:`confidence_score` maps the total variance of the
  predicted class to a score in ``[0, 1]`` (Deodato et al. 2020).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uq_box.nn.graph import in_functorch_transform

__all__ = ["classification_predictive", "confidence_score", "variance_decomposition"]


def _check_samples(value: Tensor, name: str) -> None:
    """Raise if ``value`` is not a ``[S, N, C]`` tensor with at least one sample and class."""
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 3:
        raise ValueError(f"`{name}` must have shape [S, N, C], got {list(value.shape)}")
    if value.shape[0] == 0 or value.shape[2] == 0:
        raise ValueError(
            f"`{name}` needs at least one sample and one class, got shape {list(value.shape)}"
        )


def _neg_plogp(log_p: Tensor) -> Tensor:
    """``-p log p`` from ``log p``, with ``0 log 0 = 0`` (also for ``log p = -inf``)."""
    p = log_p.exp()
    # Mask log p before the product too, so gradients stay finite where log p = -inf.
    positive = p > 0
    safe_log_p = torch.where(positive, log_p, torch.zeros_like(log_p))
    return torch.where(positive, -p * safe_log_p, torch.zeros_like(log_p))


def classification_predictive(logits: Tensor) -> dict[str, Tensor]:
    """Bayesian model average of ``S`` softmax predictions with the entropy decomposition.

    Computed from ``log_softmax`` (``log pbar`` by a ``logsumexp`` over samples); terms
    ``p log p`` with ``p = 0`` (underflow, or a logit of ``-inf``) count as 0, so saturated logits
    such as ``±1e4`` give no NaN, and gradients stay finite.

    Args:
        logits: sampled logits ``[S, N, C]`` (``S`` Monte Carlo samples or ensemble members).

    Returns:
        ``pred``: mean class probabilities ``[N, C]`` (rows sum to 1);
        ``pred_uct``: predictive entropy ``H[pbar]`` ``[N]``;
        ``aleatoric_uct``: expected entropy ``E_s H[p_s]`` ``[N]``;
        ``epistemic_uct``: mutual information ``pred_uct - aleatoric_uct``, clamped at 0 against
        round-off, ``[N]``;
        ``logits``: the input ``[S, N, C]``.
        Entropies are in nats, in ``[0, log C]``.

    Raises:
        ValueError: if ``logits`` is not ``[S, N, C]``, holds NaN or ``+inf``, or gives a sample
            ``-inf`` for every class.
    """
    _check_samples(logits, "logits")
    if not in_functorch_transform():  # a value check is data-dependent control flow in vmap
        bad = (logits.isnan() | logits.isposinf()).any() | logits.isneginf().all(-1).any()
        if bool(bad):
            raise ValueError("`logits` holds NaN, +inf, or a row of only -inf values")
    log_p = torch.log_softmax(logits, dim=-1)  # [S, N, C]
    pred = log_p.exp().mean(0)  # [N, C]
    # log(pbar) by logsumexp over samples; -inf (masked classes) clamped to the lowest finite
    # value so that its backward stays finite.
    finite_log_p = log_p.clamp_min(torch.finfo(log_p.dtype).min)
    log_pred = torch.logsumexp(finite_log_p, dim=0) - math.log(logits.shape[0])
    total = _neg_plogp(log_pred).sum(-1)
    aleatoric = _neg_plogp(log_p).sum(-1).mean(0)
    epistemic = (total - aleatoric).clamp_min(0.0)
    return {
        "pred": pred,
        "pred_uct": total,
        "aleatoric_uct": aleatoric,
        "epistemic_uct": epistemic,
        "logits": logits,
    }


def variance_decomposition(probs: Tensor, full: bool = False) -> tuple[Tensor, Tensor]:
    """Aleatoric and epistemic variance of sampled class probabilities (Kendall & Gal 2017).

    With ``pbar = mean_s p_s`` (Kwon et al. 2020, eq. 4; as in the vinn package's
    ``confidence_score``):

    - aleatoric ``= mean_s(diag(p_s) - p_s p_s^T)``, whose diagonal is ``mean_s(p_s - p_s^2)``;
    - epistemic ``= mean_s((p_s - pbar)(p_s - pbar)^T)``, whose diagonal is
      ``mean_s((p_s - pbar)^2)`` (population variance over samples).

    Their sum is ``diag(pbar) - pbar pbar^T`` (diagonal ``pbar (1 - pbar)``), the total
    predictive covariance of the one-hot label.

    Args:
        probs: sampled class probabilities ``[S, N, C]`` (e.g. ``logits.softmax(-1)``).
        full: return the full ``[N, C, C]`` matrices instead of their diagonals.

    Returns:
        ``(aleatoric, epistemic)``, each ``[N, C]`` (per-class variances, the default) or
        ``[N, C, C]`` with ``full=True``.
    """
    _check_samples(probs, "probs")
    pbar = probs.mean(0)
    centred = probs - pbar
    if not full:
        return (probs - probs.square()).mean(0), centred.square().mean(0)
    num_samples = probs.shape[0]
    second_moment = torch.einsum("snc,snd->ncd", probs, probs) / num_samples
    aleatoric = torch.diag_embed(pbar) - second_moment
    epistemic = torch.einsum("snc,snd->ncd", centred, centred) / num_samples
    return aleatoric, epistemic


def confidence_score(uncertainty: Tensor) -> Tensor:
    """Confidence ``c = 1 - 2 sqrt(u)`` of Deodato et al. (2020), elementwise.

    As defined in the vinn package, ``u`` is the total variance (aleatoric + epistemic, from
    :func:`variance_decomposition`) of the predicted class ``argmax_c pbar_c``, which equals
    ``pbar_k (1 - pbar_k)`` for that class ``k``; so ``u`` is in ``[0, 1/4]`` and ``c`` in
    ``[0, 1]``, with ``c = 1`` for a certain prediction::

        aleatoric, epistemic = variance_decomposition(probs)
        k = probs.mean(0).argmax(-1, keepdim=True)
        c = confidence_score((aleatoric + epistemic).gather(-1, k).squeeze(-1))

    Args:
        uncertainty: variances ``u`` of any shape, non-negative.

    Returns:
        Confidence scores, same shape as ``uncertainty``.

    Raises:
        ValueError: if ``uncertainty`` holds negative values or NaN.
    """
    if not isinstance(uncertainty, Tensor):
        raise TypeError(f"`uncertainty` must be a torch.Tensor, got {type(uncertainty).__name__}")
    if not bool((uncertainty >= 0).all()):
        raise ValueError("`uncertainty` must be a non-negative variance (got negative or NaN)")
    return 1.0 - 2.0 * uncertainty.sqrt()
