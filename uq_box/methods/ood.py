"""Out-of-distribution (OOD) detection with a fitted classifier: scores and the protocol.

**Direction.** Every score here is oriented so that **a higher score means "more likely OOD"**,
the convention of :mod:`uq_box.metrics.functional_ood` and
:class:`~uq_box.metrics.OODDetection` (OOD inputs are the positive class). Scores that the
literature states as a confidence (higher = in-distribution) are negated here, as the table says:

| name | score, from the logits ``z_s`` ``[S, N, C]`` and ``pbar = mean_s softmax(z_s)`` | reference |
| --- | --- | --- |
| ``"msp"`` | ``1 - max_c pbar_c`` (one minus the maximum softmax probability) | Hendrycks & Gimpel 2017 |
| ``"entropy"`` | predictive entropy ``H[pbar]`` (the contract's ``pred_uct``) | |
| ``"mutual_information"`` | ``H[pbar] - mean_s H[p_s]`` (``epistemic_uct``; 0 for one sample) | Depeweg et al. 2018 |
| ``"max_logit"`` | ``-mean_s max_c z_sc`` (the negated maximum logit) | Hendrycks et al. 2022 |
| ``"energy"`` | ``mean_s -T logsumexp_c(z_sc / T)``, the free energy itself (the paper's detector uses ``-E``, higher = in-distribution) | Liu, Wang, Owens & Li 2020 |
| ``"mahalanobis"`` | ``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)`` on the features ``f`` of a named layer (the paper's confidence is its negation) | Lee, Lee, Lee & Shin 2018 |

The logit scores are pure functions (:func:`max_softmax_score`, :func:`entropy_score`,
:func:`mutual_information_score`, :func:`max_logit_score`, :func:`energy_score`);
:class:`MahalanobisScorer` is fitted on in-distribution training data; :func:`evaluate_ood`
runs the protocol on an in-distribution and an OOD data module and returns the table of AUROC,
AUPR-in, AUPR-out and FPR at 95% TPR per score (:func:`~uq_box.metrics.functional_ood.ood_detection_metrics`).

Mahalanobis here is the paper's score on one layer, without its input pre-processing (a small
gradient step on the input) or its ensemble of layers with a logistic regression on top, which
need OOD validation data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from uq_box.checks import positive_finite
from uq_box.methods.base import ClassificationTask, UQMethod, eval_mode
from uq_box.methods.predictive_classification import _check_samples, classification_predictive
from uq_box.metrics.functional_ood import ood_detection_metrics

__all__ = [
    "LOGIT_SCORES",
    "OOD_METRICS",
    "MahalanobisScorer",
    "energy_score",
    "entropy_score",
    "evaluate_ood",
    "max_logit_score",
    "max_softmax_score",
    "mutual_information_score",
    "ood_scores",
]

#: columns of the table of :func:`evaluate_ood`, all from ``ood_detection_metrics``.
OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")


def max_softmax_score(logits: Tensor) -> Tensor:
    """``1 - max_c pbar_c``: one minus the maximum softmax probability (higher = more OOD).

    The baseline of Hendrycks & Gimpel (2017), on the Bayesian model average ``pbar`` of the
    ``S`` samples. In ``[0, 1 - 1 / C]``.

    Args:
        logits: ``[S, N, C]``.

    Returns:
        ``[N]``.
    """
    return 1.0 - classification_predictive(logits)["pred"].max(-1).values


def entropy_score(logits: Tensor) -> Tensor:
    """Predictive entropy ``H[pbar]`` in nats (higher = more OOD); ``pred_uct`` of the contract.

    Args:
        logits: ``[S, N, C]``.

    Returns:
        ``[N]`` in ``[0, log C]``.
    """
    return classification_predictive(logits)["pred_uct"]


def mutual_information_score(logits: Tensor) -> Tensor:
    """Mutual information ``H[pbar] - mean_s H[p_s]`` (higher = more OOD); ``epistemic_uct``.

    The disagreement of the samples (Depeweg et al. 2018); 0 for a single network, which then
    ranks every input alike (AUROC 0.5).

    Args:
        logits: ``[S, N, C]``.

    Returns:
        ``[N]`` in ``[0, log C]``.
    """
    return classification_predictive(logits)["epistemic_uct"]


def max_logit_score(logits: Tensor) -> Tensor:
    """``-mean_s max_c z_sc``: the negated maximum logit (higher = more OOD).

    Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song (2022), "Scaling
    Out-of-Distribution Detection for Real-World Settings". Unlike the softmax scores it keeps
    the scale of the logits, which drops out of a softmax.

    Args:
        logits: ``[S, N, C]``.

    Returns:
        ``[N]``.
    """
    _check_samples(logits, "logits")
    return -logits.max(-1).values.mean(0)


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``E = -T logsumexp_c(z_c / T)``, averaged over samples (higher = more OOD).

    Liu, Wang, Owens & Li (2020), "Energy-based Out-of-distribution Detection": in-distribution
    inputs have lower energy; the paper's detector thresholds the negative energy ``-E``
    (higher = in-distribution), so ``E`` itself is the OOD score here. ``T = 1`` in the paper.

    Args:
        logits: ``[S, N, C]``.
        temperature: ``T > 0``.

    Returns:
        ``[N]``.
    """
    _check_samples(logits, "logits")
    temperature = positive_finite(temperature, "temperature")
    return (-temperature * torch.logsumexp(logits / temperature, dim=-1)).mean(0)


#: the scores of the logits, by name; each maps ``[S, N, C]`` to ``[N]``, higher = more OOD.
LOGIT_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "msp": max_softmax_score,
    "entropy": entropy_score,
    "mutual_information": mutual_information_score,
    "max_logit": max_logit_score,
    "energy": energy_score,
}


def ood_scores(logits: Tensor, scores: Iterable[str] = tuple(LOGIT_SCORES)) -> dict[str, Tensor]:
    """The named logit scores of ``logits`` ``[S, N, C]``, each ``[N]``, higher = more OOD.

    Args:
        logits: ``[S, N, C]``, e.g. ``method.predict_step(x)["logits"]``.
        scores: names in :data:`LOGIT_SCORES`.
    """
    scores = list(scores)
    unknown = [s for s in scores if s not in LOGIT_SCORES]
    if unknown:
        raise ValueError(
            f"`scores` holds unknown names {unknown}; the logit scores are {list(LOGIT_SCORES)}"
        )
    return {name: LOGIT_SCORES[name](logits) for name in scores}


def _network(model: nn.Module) -> nn.Module:
    """The network of a method (``method.model``, through any wrappers), or ``model`` itself."""
    while isinstance(model, UQMethod):
        model = model.model
    return model


class MahalanobisScorer:
    """Mahalanobis distance to the nearest class on a chosen layer's features (Lee et al. 2018).

    Fitted on in-distribution training data: the features ``f`` (a forward hook on the layer
    named ``layer``, its output flattened to ``[N, D]``) give class means ``mu_c`` and one
    covariance shared by the classes, ``Sigma = 1 / N sum_i (f_i - mu_{y_i})(f_i -
    mu_{y_i})^T`` (the tied covariance of Lee et al., "A Simple Unified Framework for Detecting
    Out-of-Distribution Samples and Adversarial Attacks", 2018). The score of an input is
    ``min_c (f - mu_c)^T Sigma^+ (f - mu_c)``, higher = more OOD (the paper's confidence score is
    its negation), with ``Sigma^+`` the pseudo-inverse (features that never vary, such as the
    always-blank corner pixels of the digits, add nothing). Computed in float64.

    The network runs once per batch in eval mode (a plain forward of ``method.model``): for a
    stochastic network, one sample of its features.

    Args:
        model: a method (its network ``model.model`` is hooked; a post-hoc wrapper's is that of
            the method it wraps) or a plain ``nn.Module``.
        layer: the name of a submodule of the network, as in ``network.named_modules()``
            (``"0"``, ``"layers.2"``, ``"fc"``).
        batch_size: inputs per forward pass.
    """

    def __init__(self, model: nn.Module, layer: str, batch_size: int = 1024) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a method or an nn.Module, got {type(model).__name__}")
        self.network = _network(model)
        modules = dict(self.network.named_modules())
        if not isinstance(layer, str) or layer not in modules or layer == "":
            names = [name for name in modules if name]
            shown = ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")
            raise ValueError(
                f"`layer` must name a submodule of the network, got {layer!r}; its modules are "
                f"{shown}"
            )
        self.layer = layer
        self.module = modules[layer]
        self.batch_size = int(batch_size)
        self.classes: Tensor | None = None
        self.means: Tensor | None = None
        self.precision: Tensor | None = None

    def features(self, x: Tensor) -> Tensor:
        """The layer's output for inputs ``x``, flattened to ``[N, D]`` (float64)."""
        captured: list[Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            value = output[0] if isinstance(output, tuple | list) else output
            captured.append(value.detach().reshape(value.shape[0], -1))

        handle = self.module.register_forward_hook(hook)
        try:
            parameter = next(self.network.parameters(), None)
            with torch.no_grad(), eval_mode(self.network):
                for start in range(0, len(x), self.batch_size):
                    batch = x[start : start + self.batch_size]
                    if parameter is not None:
                        batch = batch.to(parameter.device)
                        if batch.is_floating_point():
                            batch = batch.to(parameter.dtype)
                    before = len(captured)
                    self.network(batch)
                    calls = len(captured) - before
                    if calls != 1:
                        raise ValueError(
                            f"`layer` {self.layer!r} runs {calls} times in one forward pass "
                            f"(a module shared between places, such as one activation reused); "
                            f"name a layer that runs once"
                        )
        finally:
            handle.remove()
        return torch.cat(captured).double()

    def fit(self, x: Tensor, y: Tensor) -> MahalanobisScorer:
        """Class means and the shared covariance of in-distribution training data; returns self.

        Args:
            x: inputs ``[N, ...]``.
            y: integer class labels ``[N]``.
        """
        if not isinstance(y, Tensor) or y.is_floating_point() or y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"`y` must hold an integer class label per input, shape [{len(x)}], got "
                f"{getattr(y, 'dtype', type(y).__name__)} of shape {list(getattr(y, 'shape', []))}"
            )
        features = self.features(x)
        y = y.to(features.device)
        classes, index = torch.unique(y, return_inverse=True)
        counts = torch.bincount(index, minlength=len(classes)).to(features.dtype)
        sums = features.new_zeros(len(classes), features.shape[1]).index_add_(0, index, features)
        means = sums / counts[:, None]
        centred = features - means[index]
        covariance = centred.T @ centred / len(features)
        self.classes, self.means = classes, means
        self.precision = torch.linalg.pinv(covariance, hermitian=True)
        return self

    def score(self, x: Tensor) -> Tensor:
        """``min_c`` Mahalanobis distance (squared) of ``x``'s features, ``[N]``, float64."""
        if self.precision is None:
            raise RuntimeError(
                "MahalanobisScorer is not fitted: call `.fit(x_train, y_train)` first"
            )
        features = self.features(x)
        projected = features @ self.precision  # [N, D]
        cross = projected @ self.means.T  # [N, C]
        quad_means = ((self.means @ self.precision) * self.means).sum(-1)  # [C]
        quad = (projected * features).sum(-1, keepdim=True)  # [N, 1]
        return (quad - 2.0 * cross + quad_means).min(-1).values.clamp_min(0.0)


def _inputs(datamodule: Any, name: str, split: str) -> Tensor:
    if not (hasattr(datamodule, "has_split") and hasattr(datamodule, "split")):
        raise TypeError(
            f"`{name}` must be a data module with splits (e.g. DigitsDatamodule, "
            f"OODDatamodule), got {type(datamodule).__name__}"
        )
    if not datamodule.has_split(split):
        raise ValueError(
            f"`{name}` ({type(datamodule).__name__}) has no '{split}' split; pass `split`"
        )
    return datamodule.split(split)[0]


def _method_logits(method: UQMethod, x: Tensor, batch_size: int) -> Tensor:
    parts = [
        method.predict_step(x[start : start + batch_size])["logits"]
        for start in range(0, len(x), batch_size)
    ]
    return torch.cat(parts, dim=1)


def evaluate_ood(
    method: UQMethod,
    id_datamodule: Any,
    ood_datamodule: Any,
    scores: Sequence[str] | None = None,
    layer: str | None = None,
    split: str = "test",
    batch_size: int = 1024,
    return_scores: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, Tensor], dict[str, Tensor]]:
    """The OOD protocol: score an in-distribution and an OOD data set, one row per score.

    The ``split`` inputs of ``id_datamodule`` are the in-distribution (negative) inputs, those of
    ``ood_datamodule`` the OOD (positive) ones; both must have the same input shape. Each score
    is computed with the direction of the module doc (**higher = more OOD**) and gives AUROC,
    AUPR-in, AUPR-out and the FPR at 95% TPR. ``"mahalanobis"`` needs ``layer`` and is fitted on
    the ``"train"`` split of ``id_datamodule``.

    Args:
        method: a fitted classification method (or a calibrated wrapper of one).
        id_datamodule: in-distribution data (e.g. ``DigitsDatamodule``).
        ood_datamodule: OOD data of the same input shape (e.g. ``RotatedDigitsDatamodule``).
        scores: names from :data:`LOGIT_SCORES` and ``"mahalanobis"``; default: every logit
            score, plus ``"mahalanobis"`` when ``layer`` is given.
        layer: the network's layer of the Mahalanobis features (see :class:`MahalanobisScorer`).
        split: the split of both data modules to score.
        batch_size: inputs per prediction.
        return_scores: also return the scores, ``{name: [N_in]}`` and ``{name: [N_out]}``.

    Returns:
        A DataFrame indexed by score name with the columns :data:`OOD_METRICS` (floats); with
        ``return_scores``, ``(table, scores_in, scores_out)``.
    """
    if not isinstance(method, UQMethod) or not isinstance(method, ClassificationTask):
        raise TypeError(
            f"`method` must be a fitted classification method (a ClassificationTask UQMethod), "
            f"got {type(method).__name__}"
        )
    if scores is None:
        scores = list(LOGIT_SCORES) + (["mahalanobis"] if layer is not None else [])
    if isinstance(scores, str):
        scores = [scores]
    scores = list(scores)
    known = [*LOGIT_SCORES, "mahalanobis"]
    unknown = [s for s in scores if s not in known]
    if unknown or not scores:
        raise ValueError(f"`scores` must be a non-empty list of {known}, got {scores}")
    if "mahalanobis" in scores and layer is None:
        raise ValueError(
            "`scores` asks for 'mahalanobis' but no `layer` is given: name the network's layer "
            "whose features it uses"
        )
    x_in = _inputs(id_datamodule, "id_datamodule", split)
    x_out = _inputs(ood_datamodule, "ood_datamodule", split)
    if x_in.shape[1:] != x_out.shape[1:]:
        raise ValueError(
            f"`ood_datamodule` ({type(ood_datamodule).__name__}) gives inputs of shape "
            f"{list(x_out.shape[1:])} per point but `id_datamodule` "
            f"({type(id_datamodule).__name__}) gives {list(x_in.shape[1:])}; an OOD pair must "
            f"have the same input shape (e.g. both flattened or both images)"
        )
    logit_names = [s for s in scores if s in LOGIT_SCORES]
    scores_in = ood_scores(_method_logits(method, x_in, batch_size), logit_names)
    scores_out = ood_scores(_method_logits(method, x_out, batch_size), logit_names)
    if "mahalanobis" in scores:
        scorer = MahalanobisScorer(method, layer, batch_size)
        scorer.fit(*id_datamodule.split("train"))
        scores_in["mahalanobis"], scores_out["mahalanobis"] = (
            scorer.score(x_in),
            scorer.score(x_out),
        )
    rows = {
        name: {
            key: float(value)
            for key, value in ood_detection_metrics(scores_in[name], scores_out[name]).items()
        }
        for name in scores
    }
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(OOD_METRICS))
    table.index.name = "score"
    if return_scores:
        return table, {n: scores_in[n] for n in scores}, {n: scores_out[n] for n in scores}
    return table
