"""Conformal prediction sets for any fitted classifier: LAC, APS, RAPS, class-conditional.

Split conformal prediction (Vovk, Gammerman & Shafer 2005; Papadopoulos et al. 2002) on the
mean predictive probabilities ``p = pred`` ``[N, C]`` of a fitted classification method. On ``n``
calibration points the nonconformity scores ``s_i = s(x_i, y_i)`` of the true labels give the
threshold ``q`` = the ``ceil((n + 1)(1 - alpha))``-th smallest score
(:func:`~uq_box.methods.posthoc.conformal_quantile`), and the prediction set of a new input is
``{y : s(x, y) <= q}``. For exchangeable data it holds the label with probability at least
``1 - alpha``, and below ``1 - alpha + 1 / (n + 1)`` when the scores have no ties -- a
*marginal* guarantee, over calibration sets and inputs. The scores (``score``):

- ``"lac"``, least ambiguous set-valued classifier (Sadinle, Lei & Wasserman 2019, "Least
  Ambiguous Set-Valued Classifiers with Bounded Error Levels"; also called THR):
  ``s(x, y) = 1 - p_y``, i.e. the classes with ``p_y >= 1 - q``. The smallest sets on average;
  a set may be empty, and the sets adapt little to how hard an input is.
- ``"aps"``, adaptive prediction sets (Romano, Sesia & Candès 2020, "Classification with Valid
  and Adaptive Coverage"): ``s(x, y) = sum_{j ranked before y} p_j + u p_y``, the probability
  mass of the classes ranked above ``y`` (by decreasing ``p``) plus ``u`` times its own: the
  classes are added in order of probability until their mass reaches ``q``.
- ``"raps"``, regularized APS (Angelopoulos, Bates, Malik & Jordan 2021, "Uncertainty Sets for
  Image Classifiers using Conformal Prediction"): the APS score plus
  ``lam * max(0, rank(y) - k_reg)`` (``rank`` 1 for the most probable class), which stops the
  long tail of tiny probabilities from inflating the sets.

**Randomization** (``"aps"`` and ``"raps"``; LAC's scores need none). With ``randomized=True``
``u ~ U(0, 1)``, one draw per point shared by its classes (so a set is always the top classes in
order), both for the calibration scores and for the sets: the scores are continuous, so the
coverage lies in ``[1 - alpha, 1 - alpha + 1 / (n + 1))`` and the sets are as small as the
guarantee allows. A set may then be empty. With ``randomized=False`` the calibration scores take
``u = 1`` (the class's full mass) and the sets ``u = 0`` (a class is in the set as soon as the
mass ranked before it is at most ``q``): every set holds its top class (with ``k_reg >= 1``) and
contains the randomized set of the same ``q``, and the coverage is at least ``1 - alpha`` but
**conservative**, without the upper bound (Angelopoulos et al. 2021's non-randomized sets).
Randomized sets draw ``u`` from torch's global generator (``lightning.seed_everything`` makes
them reproducible).

**Class-conditional (Mondrian) sets** (Vovk 2012, "Conditional Validity of Inductive Conformal
Predictors"; Sadinle et al. 2019, section 4.3): with ``mondrian=True`` every class ``c`` gets
its own threshold ``q_c`` from the calibration points labelled ``c``, and ``y`` is in the set
when ``s(x, y) <= q_y``; then the coverage is at least ``1 - alpha`` *for every class*, at the
price of needing ``1 / alpha - 1`` calibration points per class.

Written here rather than taken from a library (MAPIE, torchcp, crepes) for the reasons of
:mod:`uq_box.methods.posthoc`: the scores are a few lines of torch, and the wrapper needs the
prediction contract of every method and Lightning's loops.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from uq_box.checks import non_negative_finite, non_negative_int
from uq_box.methods.base import ClassificationTask, UQMethod
from uq_box.methods.posthoc import (
    PostHocCalibration,
    _check_alpha,
    check_wrapped_model,
    conformal_quantile,
    conformal_rank,
)
from uq_box.metrics.sets import SetCoverage, SetSize

__all__ = [
    "CLASSIFICATION_SCORES",
    "ConformalClassification",
    "check_probabilities",
    "class_scores",
    "class_thresholds",
    "conformal_threshold",
    "label_scores",
    "minimum_calibration_points",
    "prediction_sets",
]

#: the nonconformity scores of :class:`ConformalClassification`.
CLASSIFICATION_SCORES = ("lac", "aps", "raps")


def check_probabilities(probs: Tensor, name: str = "probs") -> Tensor:
    """Check class probabilities ``[N, C]``: floating point, in ``[0, 1]``, rows summing to 1.

    The rows may miss 1 by ``1e-3`` (``1e-2`` in half precision): rounding, not a mistake.

    Args:
        probs: the probabilities to check.
        name: the argument's name in the error messages.

    Returns:
        ``probs`` unchanged.
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(probs).__name__}")
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(
            f"`{name}` must be class probabilities of shape [N, C], got {list(probs.shape)}"
        )
    if not probs.is_floating_point():
        raise ValueError(f"`{name}` must be floating point class probabilities, got {probs.dtype}")
    if probs.shape[0] == 0:
        raise ValueError(f"`{name}` is empty")
    if not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError(
            f"`{name}` must be probabilities in [0, 1], got values outside (or NaN); pass "
            f"`logits.softmax(-1)` (or a method's `pred`), not logits"
        )
    tolerance = 1e-2 if torch.finfo(probs.dtype).bits <= 16 else 1e-3
    error = (probs.double().sum(1) - 1.0).abs()
    worst = int(error.argmax())
    if float(error[worst]) > tolerance:
        raise ValueError(
            f"`{name}` rows must sum to 1 (class probabilities), but row {worst} sums to "
            f"{float(probs[worst].double().sum()):.6g}; pass `logits.softmax(-1)` (or a method's "
            f"`pred`)"
        )
    return probs


def _check_score(score: str) -> str:
    if score not in CLASSIFICATION_SCORES:
        raise ValueError(f"`score` must be one of {CLASSIFICATION_SCORES}, got {score!r}")
    return score


def _check_lam(lam: float) -> float:
    return non_negative_finite(lam, "lam")


def class_scores(
    probs: Tensor,
    score: str = "aps",
    u: Tensor | float = 1.0,
    k_reg: int = 1,
    lam: float = 0.01,
) -> Tensor:
    """Nonconformity score of every class of every point, ``[N, C]``: ``s(x_n, c)``.

    See the module docstring for the scores. Classes of equal probability are ranked by their
    index (a stable sort), so equal inputs give equal scores.

    Args:
        probs: class probabilities ``[N, C]`` (rows summing to 1).
        score: ``"lac"``, ``"aps"`` or ``"raps"``.
        u: for APS and RAPS, the weight of a class's own probability in its score: a tensor
            ``[N]`` (one uniform draw per point for randomized scores) or a number in ``[0, 1]``
            (1: the calibration score of non-randomized sets, 0: their sets). Ignored by LAC.
        k_reg: RAPS: the number of top classes without a penalty.
        lam: RAPS: the penalty per class ranked below ``k_reg``.

    Returns:
        ``[N, C]`` scores in the dtype of ``probs``; lower means more conforming.
    """
    check_probabilities(probs)
    score = _check_score(score)
    k_reg, lam = non_negative_int(k_reg, "k_reg"), _check_lam(lam)
    if score == "lac":
        return 1.0 - probs
    if isinstance(u, Tensor):
        if u.shape != probs.shape[:1]:
            raise ValueError(
                f"`u` must have shape [N] = [{probs.shape[0]}] (one draw per point), got "
                f"{list(u.shape)}"
            )
        weight = u.to(probs.dtype)[:, None]
    elif isinstance(u, numbers.Real) and not isinstance(u, bool) and 0.0 <= u <= 1.0:
        weight = float(u)
    else:
        raise ValueError(f"`u` must be a tensor [N] or a number in [0, 1], got {u!r}")
    sorted_probs, order = probs.sort(dim=1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=1) - sorted_probs
    sorted_scores = mass_before + weight * sorted_probs
    if score == "raps":
        rank = torch.arange(1, probs.shape[1] + 1, device=probs.device, dtype=probs.dtype)
        sorted_scores = sorted_scores + lam * (rank - k_reg).clamp_min(0.0)
    return torch.empty_like(sorted_scores).scatter_(1, order, sorted_scores)


def label_scores(
    probs: Tensor,
    target: Tensor,
    score: str = "aps",
    u: Tensor | float = 1.0,
    k_reg: int = 1,
    lam: float = 0.01,
) -> Tensor:
    """Nonconformity scores of the true labels, ``[N]``: the calibration scores ``s(x_n, y_n)``.

    Args:
        probs: class probabilities ``[N, C]``.
        target: integer labels ``[N]`` in ``[0, C)``.
        score: ``"lac"``, ``"aps"`` or ``"raps"``.
        u: see :func:`class_scores`.
        k_reg: RAPS: the number of top classes without a penalty.
        lam: RAPS: the penalty per class ranked below ``k_reg``.

    Returns:
        ``[N]`` scores in the dtype of ``probs``.
    """
    scores = class_scores(probs, score, u, k_reg, lam)
    if not isinstance(target, Tensor) or target.shape != probs.shape[:1]:
        raise ValueError(
            f"`target` must be a tensor of shape [N] = [{probs.shape[0]}] to match `probs`, got "
            f"{list(target.shape) if isinstance(target, Tensor) else type(target).__name__}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"`target` must hold integer class labels, got {target.dtype}")
    num_classes = probs.shape[1]
    if not bool(((target >= 0) & (target < num_classes)).all()):
        raise ValueError(f"`target` must hold class labels in [0, {num_classes}), got others")
    return scores.gather(1, target.long()[:, None]).squeeze(1)


def minimum_calibration_points(alpha: float) -> int:
    """Fewest calibration points with a finite conformal threshold at level ``alpha``.

    The smallest ``n`` with ``ceil((n + 1)(1 - alpha)) <= n``, i.e. ``n >= 1 / alpha - 1`` (in
    exact arithmetic on the float ``alpha``): 9 for ``alpha = 0.1``, 19 for 0.05.
    """
    alpha = _check_alpha(alpha)
    return max(1, math.ceil(1 / Fraction(alpha) - 1))


def conformal_threshold(scores: Tensor, alpha: float) -> Tensor:
    """The conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest of ``n`` scores.

    :func:`~uq_box.methods.posthoc.conformal_quantile`, but too few scores for ``alpha`` (fewer
    than :func:`minimum_calibration_points`, where the threshold would be infinite and every set
    would hold every class) are an error.

    Args:
        scores: ``[n]`` nonconformity scores of the calibration points' labels.
        alpha: miscoverage level in ``(0, 1)``.

    Returns:
        Scalar tensor in the dtype of ``scores``.
    """
    alpha = _check_alpha(alpha)
    if not isinstance(scores, Tensor) or scores.ndim != 1:
        raise ValueError(
            f"`scores` must be a tensor [n] of calibration scores, got "
            f"{list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
        )
    needed = minimum_calibration_points(alpha)
    if scores.shape[0] < needed:
        raise ValueError(
            f"{scores.shape[0]} calibration points are too few for `alpha`={alpha}: the "
            f"conformal rank ceil((n + 1)(1 - alpha)) = {conformal_rank(scores.shape[0], alpha)} "
            f"exceeds them, so every set would hold every class; use at least {needed} "
            f"calibration points or a larger `alpha`"
        )
    return conformal_quantile(scores, alpha)


def class_thresholds(scores: Tensor, target: Tensor, num_classes: int, alpha: float) -> Tensor:
    """Class-conditional (Mondrian) thresholds ``[C]``: :func:`conformal_threshold` per class.

    Args:
        scores: ``[n]`` nonconformity scores of the calibration points' labels.
        target: ``[n]`` their labels in ``[0, C)``.
        num_classes: ``C``.
        alpha: miscoverage level in ``(0, 1)``, guaranteed for every class.

    Returns:
        ``[C]`` thresholds in the dtype of ``scores``.
    """
    alpha = _check_alpha(alpha)
    if not isinstance(target, Tensor) or not isinstance(scores, Tensor):
        raise TypeError("`scores` and `target` must be torch tensors")
    if target.shape != scores.shape or scores.ndim != 1:
        raise ValueError(
            f"`scores` and `target` must both have shape [n], got {list(scores.shape)} and "
            f"{list(target.shape)}"
        )
    num_classes = non_negative_int(num_classes, "num_classes")
    if target.is_floating_point() or not bool(((target >= 0) & (target < num_classes)).all()):
        raise ValueError(f"`target` must hold integer class labels in [0, {num_classes})")
    counts = torch.bincount(target.long().cpu(), minlength=num_classes)
    needed = minimum_calibration_points(alpha)
    short = [c for c in range(num_classes) if int(counts[c]) < needed]
    if short:
        listed = ", ".join(f"class {c}: {int(counts[c])}" for c in short[:5])
        raise ValueError(
            f"class-conditional (`mondrian`=True) sets need at least {needed} calibration points "
            f"of every class for `alpha`={alpha}, but {len(short)} classes have fewer ({listed}"
            f"{', ...' if len(short) > 5 else ''}); use more calibration data, a larger `alpha` "
            f"or `mondrian`=False"
        )
    return torch.stack([conformal_quantile(scores[target == c], alpha) for c in range(num_classes)])


def prediction_sets(
    probs: Tensor,
    threshold: Tensor | float,
    score: str = "aps",
    randomized: bool = True,
    k_reg: int = 1,
    lam: float = 0.01,
    u: Tensor | None = None,
) -> Tensor:
    """Prediction sets ``{y : s(x, y) <= q}`` as booleans ``[N, C]``.

    Args:
        probs: class probabilities ``[N, C]``.
        threshold: the conformal threshold: a number, a scalar tensor, or ``[C]`` per-class
            thresholds (Mondrian: ``y`` is in the set when ``s(x, y) <= q_y``).
        score: ``"lac"``, ``"aps"`` or ``"raps"``; the score the threshold was calibrated on.
        randomized: APS/RAPS: draw ``u ~ U(0, 1)`` per point (calibrate with random ``u`` too);
            otherwise ``u = 0``, the conservative sets of scores calibrated with ``u = 1``.
        k_reg: RAPS: the number of top classes without a penalty.
        lam: RAPS: the penalty per class ranked below ``k_reg``.
        u: APS/RAPS with ``randomized``: the draws ``[N]`` to use instead of fresh ones from the
            global generator.

    Returns:
        ``[N, C]`` booleans, ``True`` for the classes in each set.
    """
    check_probabilities(probs)
    if score != "lac" and (u is None or not randomized):
        if randomized:
            u = torch.rand(probs.shape[0], dtype=probs.dtype, device=probs.device)
        else:
            u = 0.0
    scores = class_scores(probs, score, 1.0 if u is None else u, k_reg, lam)
    threshold = torch.as_tensor(threshold, device=probs.device)
    if threshold.ndim > 1 or threshold.numel() not in (1, probs.shape[1]):
        raise ValueError(
            f"`threshold` must be a number or [C] = [{probs.shape[1]}] per-class thresholds, got "
            f"shape {list(threshold.shape)}"
        )
    if bool(threshold.isnan().any()):
        raise ValueError("`threshold` is NaN: calibrate first")
    return scores <= threshold.to(scores.dtype).reshape(-1)


class ConformalClassification(ClassificationTask, PostHocCalibration):
    """Conformal prediction sets around a fitted classification method (any of them).

    Calibrated on held-out data, from the wrapped method's mean predictive probabilities
    ``pred``: the ``"val"`` split by default, as the other classification wrappers (the
    classification data modules hold out a validation split); ``calibrate(dm, split="calib")``
    reads an ``ArrayDataModule``'s ``X_calib``/``y_calib``, and an ``(inputs, targets)`` pair
    works too. The guarantee needs calibration data that neither training nor model selection
    saw: if the validation split chose the epoch or the hyperparameters, calibrate on a split of
    its own. See the module :mod:`uq_box.methods.conformal_classification` for the scores, the
    randomization and the guarantee. Too few calibration points for ``alpha`` (fewer than
    ``1 / alpha - 1``, or per class with ``mondrian``) is an error.

    ``predict_step`` returns the wrapped method's classification contract unchanged plus
    ``pred_set``, booleans ``[N, C]`` (``True`` for the classes in each point's set; randomized
    sets draw from torch's global generator). Test metrics: the classification ones of ``pred``
    plus ``set_coverage`` (share of labels in their sets, nominally at least ``1 - alpha``) and
    ``set_size`` (mean classes per set).

    Args:
        model: a fitted classification method (a ``ClassificationTask`` ``UQMethod``, also a
            post-hoc one such as :class:`~uq_box.methods.posthoc.TemperatureScaling`).
        alpha: miscoverage level in ``(0, 1)``; the sets cover ``1 - alpha``.
        score: ``"lac"`` (Sadinle et al. 2019), ``"aps"`` (Romano et al. 2020) or ``"raps"``
            (Angelopoulos et al. 2021).
        randomized: APS/RAPS: randomized scores (coverage in ``[1 - alpha, 1 - alpha +
            1 / (n + 1))``) or the conservative non-randomized sets. No effect on LAC.
        k_reg: RAPS: classes ranked ``<= k_reg`` carry no penalty.
        lam: RAPS: penalty per class ranked below ``k_reg``.
        mondrian: class-conditional thresholds, coverage ``>= 1 - alpha`` for every class.
    """

    default_split = "val"
    concat_dims = {"scores": 0, "target": 0, "num_classes": 0}
    # one threshold, or one per class (Mondrian)
    fitted_buffers = ("threshold",)
    # the threshold is the mean over classes with ``mondrian``
    summary_buffers = {
        "conformal_threshold": "threshold",
        "calibration_points": "num_calibration_points",
    }

    def __init__(
        self,
        model: UQMethod,
        alpha: float = 0.1,
        score: str = "aps",
        randomized: bool = True,
        k_reg: int = 1,
        lam: float = 0.01,
        mondrian: bool = False,
    ) -> None:
        check_wrapped_model(
            model, ClassificationTask, "classification", "DeterministicClassification"
        )
        alpha = _check_alpha(alpha)
        score = _check_score(score)
        for name, flag in (("randomized", randomized), ("mondrian", mondrian)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be True or False, got {flag!r}")
        k_reg, lam = non_negative_int(k_reg, "k_reg"), _check_lam(lam)
        super().__init__(model)
        self.alpha, self.score, self.randomized = alpha, score, randomized
        self.k_reg, self.lam, self.mondrian = k_reg, lam, mondrian
        # one threshold, or one per class (Mondrian); float64 whatever the network's dtype
        self.register_buffer("threshold", torch.full((1,), math.nan, dtype=torch.float64))
        self.register_buffer("num_calibration_points", torch.zeros((), dtype=torch.long))
        self.save_hyperparameters(ignore=["model"])

    def build_metrics(self) -> nn.ModuleDict:
        """The classification metrics plus ``set_coverage`` and ``set_size``."""
        metrics = super().build_metrics()
        metrics["set_coverage"] = SetCoverage()
        metrics["set_size"] = SetSize()
        return metrics

    @property
    def is_calibrated(self) -> bool:
        """Whether a threshold has been computed."""
        return not bool(self.threshold.isnan().any())

    def _scores_of(self, probs: Tensor, target: Tensor) -> Tensor:
        """Calibration scores: random ``u`` when randomized, else the full mass ``u = 1``."""
        u: Tensor | float = 1.0
        if self.randomized:
            u = torch.rand(probs.shape[0], dtype=probs.dtype, device=probs.device)
        return label_scores(probs, target, self.score, u, self.k_reg, self.lam)

    def collect(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The nonconformity scores of one batch's labels, the labels and the class count."""
        preds = self.model.predict_step(x)
        target = target.to(preds["pred"].device)
        self._check_target(preds["logits"], target)
        probs = preds["pred"]
        return {
            "scores": self._scores_of(probs, target),
            "target": target,
            "num_classes": torch.tensor([probs.shape[1]], device=probs.device),
        }

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """Set the threshold (one per class with ``mondrian``) of the calibration scores."""
        scores, target = collected["scores"], collected["target"]
        if self.mondrian:
            num_classes = int(collected["num_classes"].max())
            threshold = class_thresholds(scores, target, num_classes, self.alpha)
        else:
            threshold = conformal_threshold(scores, self.alpha)
        self.threshold = threshold.detach().double().reshape(-1).to(self.threshold.device)
        self.num_calibration_points = torch.tensor(scores.shape[0], device=self.threshold.device)

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The wrapped method's prediction plus the prediction sets ``pred_set`` ``[N, C]``."""
        preds = self.wrapped_predictions(batch)
        with torch.no_grad():
            probs = preds["pred"]
            if self.mondrian and self.threshold.numel() != probs.shape[1]:
                raise ValueError(
                    f"the class-conditional thresholds are for {self.threshold.numel()} classes "
                    f"but {type(self.model).__name__} predicts {probs.shape[1]}"
                )
            preds["pred_set"] = prediction_sets(
                probs,
                self.threshold,
                self.score,
                self.randomized,
                self.k_reg,
                self.lam,
            )
        return preds

    def update_metrics(
        self, metrics: nn.ModuleDict, preds: dict[str, Tensor], target: Tensor
    ) -> None:
        """The classification metrics on ``pred``; coverage and size of ``pred_set``."""
        self._check_target(preds["logits"], target)
        for name, metric in metrics.items():
            if name == "accuracy":
                metric.update((preds["pred"].argmax(-1) == target).float())
            elif name == "set_coverage":
                metric.update(preds["pred_set"], target)
            elif name == "set_size":
                metric.update(preds["pred_set"])
            else:
                metric.update(preds["pred"], target)
