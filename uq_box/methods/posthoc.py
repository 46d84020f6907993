"""Post-hoc calibration of a fitted method: split conformal regression and temperature scaling.

Both wrap a *fitted* :class:`~uq_box.methods.base.UQMethod` and never train its network: they fit
a few numbers on held-out data that the network was not trained on, then correct its predictions.
Each wrapper is itself a ``LightningModule`` following the prediction contract, so
``trainer.test(wrapper, datamodule)`` logs the usual test metrics and ``trainer.predict`` works.

Calibration runs either directly, ``wrapper.calibrate(datamodule)`` (on the data module's
``"calib"`` split for conformal prediction, ``"val"`` for temperature scaling; an
``(inputs, targets)`` pair works too), or through Lightning: *validating* a wrapper calibrates it on
the batches of that loop, e.g. ``trainer.validate(conformal, dataloaders=dm.calib_dataloader())``
or ``trainer.validate(temperature_scaling, datamodule=dm)`` (the val split). ``trainer.fit`` of a
wrapper is an error: there is nothing to train.

- :class:`ConformalRegression`: split conformal prediction (Vovk, Gammerman & Shafer 2005,
  "Algorithmic Learning in a Random World"; Lei, G'Sell, Rinaldo, Tibshirani & Wasserman 2018,
  "Distribution-Free Predictive Inference for Regression"), with the normalized score
  ``|y - pred| / pred_uct`` for Gaussian methods and the conformalized quantile regression score
  ``max(lower - y, y - upper)`` (Romano, Patterson & Candes 2019, "Conformalized Quantile
  Regression") for :class:`~uq_box.methods.quantile.QuantileRegression`.
- :class:`TemperatureScaling`: one temperature for the logits of a classifier (Guo, Pleiss, Sun &
  Weinberger 2017, "On Calibration of Modern Neural Networks").

Written here rather than taken from a library (e.g. MAPIE, torchcp): the scores and the
finite-sample quantile are a few lines of torch, and the wrappers need the prediction contract of
every method and Lightning's loops, which those libraries do not know.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from fractions import Fraction
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from uq_box.checks import number_in, positive_int
from uq_box.datamodules.base import as_tensor
from uq_box.methods.base import ClassificationTask, RegressionTask, UQMethod, unpack_batch
from uq_box.methods.predictive_classification import classification_predictive
from uq_box.methods.quantile import QuantileRegression
from uq_box.metrics.functional_quantiles import gaussian_quantiles

__all__ = [
    "ConformalRegression",
    "LogitCalibration",
    "PostHocCalibration",
    "TemperatureScaling",
    "check_wrapped_model",
    "conformal_quantile",
    "conformal_rank",
    "tempered_nll",
]

#: floor of a Gaussian-equivalent std (an empty conformal interval would give 0).
MIN_STD = 1e-6
#: splits an ArrayDataModule may hold, listed in errors.
KNOWN_SPLITS = ("train", "val", "test", "calib")
SCORES = ("auto", "normalized", "absolute", "cqr")


def conformal_rank(num_points: int, alpha: float) -> int:
    """Rank ``k = ceil((n + 1)(1 - alpha))`` of the conformal quantile among ``n`` scores.

    Computed in exact rational arithmetic on the float ``alpha`` (``(n + 1)(1 - alpha)`` in floats
    can land just above an integer, e.g. ``100 * (1 - 0.1)``). ``k > n`` means the interval is
    infinite: too few calibration points for ``alpha`` (``n < 1 / alpha - 1``).
    """
    return math.ceil((num_points + 1) * (1 - Fraction(alpha)))


def conformal_quantile(scores: Tensor, alpha: float) -> Tensor:
    """Split-conformal quantile of nonconformity scores ``[n]`` or ``[n, T]`` (per column).

    The ``k``-th smallest score, ``k = ceil((n + 1)(1 - alpha))``: the empirical quantile at level
    ``k / n`` (``inverted_cdf``), the finite-sample correction that makes ``P(s_{n+1} <= q) >=
    1 - alpha`` for exchangeable scores (and ``< 1 - alpha + 1 / (n + 1)`` without ties).
    ``+inf`` when ``k > n``.
    """
    _check_alpha(alpha)
    if scores.ndim == 0 or scores.shape[0] == 0:
        raise ValueError(f"`scores` must hold at least one score, got shape {list(scores.shape)}")
    if bool(scores.isnan().any()):
        raise ValueError("`scores` contains NaN")
    num_points = scores.shape[0]
    rank = conformal_rank(num_points, alpha)
    if rank > num_points:
        return torch.full_like(scores[0], math.inf)
    return scores.kthvalue(rank, dim=0).values


def tempered_nll(logits: Tensor, target: Tensor, temperature: Tensor | float) -> Tensor:
    """Mean NLL of the sample-mean probabilities ``mean_s softmax(logits_s / T)``.

    Args:
        logits: ``[S, N, C]``.
        target: class indices ``[N]``.
        temperature: ``T > 0`` (a tensor keeps the graph for optimizing it).
    """
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])  # [N, C]
    return -log_mean.gather(-1, target.unsqueeze(-1)).mean()


def _check_alpha(alpha: float) -> float:
    return number_in(alpha, "alpha", 0.0, 1.0)


def check_wrapped_model(model: Any, task: type, kind: str, examples: str) -> None:
    """Raise a ``TypeError`` unless ``model`` is a ``UQMethod`` of ``task`` (e.g. ``RegressionTask``).

    ``kind`` names the task in the message ("regression"), ``examples`` names methods that are.
    """
    if not isinstance(model, UQMethod) or not isinstance(model, task):
        raise TypeError(
            f"`model` must be a fitted {kind} method (a {task.__name__} UQMethod such as "
            f"{examples}), got {type(model).__name__}"
        )


def _batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


class PostHocCalibration(UQMethod):
    """Wrap a fitted method; calibrate on held-out data; no training of the network.

    Subclasses set :attr:`default_split`, :attr:`concat_dims` and implement :meth:`collect`
    (per-batch statistics) and :meth:`fit_calibration` (on all of them); they list the buffers
    whose shape is known only after fitting in :attr:`fitted_buffers` and the numbers logged
    after calibrating in :attr:`summary_buffers`.

    Args:
        model: the fitted method (kept as ``self.model``, a submodule).
    """

    #: the data module split :meth:`calibrate` reads by default.
    default_split: str = "calib"
    #: concatenation dimension of each statistic returned by :meth:`collect`.
    concat_dims: dict[str, int] = {}
    #: buffers whose shape is known only after calibration (resized when a checkpoint is loaded).
    fitted_buffers: tuple[str, ...] = ()
    #: logged name -> buffer of :meth:`calibration_summary` (the buffer's mean).
    summary_buffers: dict[str, str] = {}

    def __init__(self, model: UQMethod) -> None:
        super().__init__(model)
        self._collected: list[dict[str, Tensor]] = []

    # -- to implement -------------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        """Whether :meth:`calibrate` (or a validation loop) has run."""
        raise NotImplementedError

    def collect(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Statistics of one batch of calibration data."""
        raise NotImplementedError

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """Fit the calibration parameters on all statistics."""
        raise NotImplementedError

    # -- calibration --------------------------------------------------------------------------
    def calibrate(self, data: Any, split: str | None = None) -> PostHocCalibration:
        """Calibrate on a data module's split (or an ``(inputs, targets)`` pair); returns self.

        Args:
            data: a data module with ``has_split``/``split`` (e.g. ``ArrayDataModule``), or a
                pair ``(inputs, targets)``.
            split: the split to read; :attr:`default_split` when ``None``.
        """
        x, y = self._calibration_data(data, split or self.default_split)
        batch_size = getattr(data, "eval_batch_size", 1024)
        with torch.no_grad():
            collected = [self.collect(xb, yb) for xb, yb in _batches(x, y, batch_size)]
        self.fit_calibration(self._concat(collected))
        return self

    def _calibration_data(self, data: Any, split: str) -> tuple[Tensor, Tensor]:
        if isinstance(data, tuple | list):
            if len(data) != 2:
                raise ValueError(
                    f"`data` given as a sequence must be a pair (inputs, targets), got "
                    f"{len(data)} items"
                )
            x = as_tensor(data[0], "inputs")
            y = as_tensor(data[1], "targets", target=isinstance(self, RegressionTask))
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(
                    f"calibration inputs and targets must have the same, non-zero number of "
                    f"rows, got {len(x)} and {len(y)}"
                )
            return x, y
        if not (hasattr(data, "has_split") and hasattr(data, "split")):
            raise TypeError(
                f"`data` must be a data module with splits (e.g. ArrayDataModule) or a pair "
                f"(inputs, targets), got {type(data).__name__}"
            )
        if not data.has_split(split):
            available = [s for s in getattr(data, "splits", KNOWN_SPLITS) if data.has_split(s)]
            raise ValueError(
                f"{type(self).__name__} calibrates on the '{split}' split, but "
                f"{type(data).__name__} has no '{split}' split; it has {available}. Hold out "
                f"data the network was not trained on (ArrayDataModule's `X_{split}`/`y_{split}`"
                + (", ToyHeteroscedasticDatamodule's `n_calib`" if split == "calib" else "")
                + ") or pass `split`"
            )
        return data.split(split)

    def _concat(self, collected: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if not collected:
            raise ValueError(f"{type(self).__name__} got no calibration data")
        return {
            key: torch.cat([c[key] for c in collected], dim=dim)
            for key, dim in self.concat_dims.items()
        }

    def _check_calibrated(self) -> None:
        if not self.is_calibrated:
            raise RuntimeError(
                f"{type(self).__name__} is not calibrated yet: call `.calibrate(datamodule)` "
                f"(uses the '{self.default_split}' split) or `trainer.validate` on held-out data "
                f"before predicting"
            )

    # -- Lightning hooks: validation = calibration, no training --------------------------------
    def configure_optimizers(self) -> Any:
        """A post-hoc wrapper has nothing to train."""
        raise RuntimeError(
            f"{type(self).__name__} calibrates a fitted method and has nothing to train: fit the "
            f"wrapped method first, then call `.calibrate(datamodule)` (or `trainer.validate`)"
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """A post-hoc wrapper has nothing to train."""
        return self.configure_optimizers()

    def on_validation_epoch_start(self) -> None:
        """Start collecting calibration statistics."""
        self._collected = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Collect one batch's calibration statistics."""
        x, target = self._inputs_and_targets(batch, "calibration")
        self._collected.append(self.collect(x.to(self.device), target.to(self.device)))

    def on_validation_epoch_end(self) -> None:
        """Fit the calibration on everything collected (gathered across processes)."""
        collected, self._collected = self._concat(self._collected), []
        if self.trainer.world_size > 1:
            collected = {
                key: torch.cat(list(self.all_gather(value).unbind(0)), dim=self.concat_dims[key])
                for key, value in collected.items()
            }
        with torch.inference_mode(False):
            # tensors made in Lightning's inference mode cannot enter autograd; clone them
            self.fit_calibration({k: v.clone() for k, v in collected.items()})
        self.log_dict(self.calibration_summary(), sync_dist=False)

    def calibration_summary(self) -> dict[str, float]:
        """Numbers logged after calibrating in a validation loop: :attr:`summary_buffers`."""
        return {
            name: getattr(self, buffer).float().mean().item()
            for name, buffer in self.summary_buffers.items()
        }

    def wrapped_predictions(self, batch: Any) -> dict[str, Tensor]:
        """A copy of the wrapped method's prediction dict of a batch's inputs (no gradients).

        Fails when the wrapper is not calibrated yet.
        """
        self._check_calibrated()
        x, _ = unpack_batch(batch)
        with torch.no_grad():
            return dict(self.model.predict_step(x))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # the fitted buffers' shapes (per target, class, knot) are unknown until calibration
        for name in self.fitted_buffers:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def on_test_epoch_start(self) -> None:
        """Fail early when testing an uncalibrated wrapper."""
        self._check_calibrated()


class ConformalRegression(RegressionTask, PostHocCalibration):
    """Split conformal prediction intervals around a fitted regression method.

    On ``n`` calibration points unseen in training, the nonconformity scores ``s_i`` give the
    conformal quantile ``q = `` the ``ceil((n + 1)(1 - alpha))``-th smallest score
    (:func:`conformal_quantile`), and for a new exchangeable point the interval below covers its
    target with probability at least ``1 - alpha`` (and below ``1 - alpha + 1 / (n + 1)`` for
    continuous scores), whatever the quality of the model -- a marginal guarantee, averaged over
    calibration sets and inputs, not a conditional one. With ``n < 1 / alpha - 1`` points the rank
    exceeds ``n`` and the interval is infinite (``q = inf``, with a warning).

    Scores (``score``):

    - ``"normalized"`` (the default for Gaussian methods): ``|y - pred| / pred_uct``, interval
      ``pred ± q pred_uct``, adaptive to the model's uncertainty;
    - ``"absolute"``: ``|y - pred|``, interval ``pred ± q`` of constant width;
    - ``"cqr"`` (the default for :class:`~uq_box.methods.quantile.QuantileRegression`, or any
      method whose predictions hold ``lower``/``upper``): ``max(lower - y, y - upper)``, interval
      ``[lower - q, upper + q]`` (``q < 0`` shrinks a too-wide interval).

    ``predict_step`` returns the wrapped method's dict with ``lower``/``upper`` the conformal
    interval, ``pred`` unchanged, and ``pred_uct`` replaced by the Gaussian-equivalent standard
    deviation ``half-width / z_{1 - alpha/2}`` (the std of the Gaussian centred on the interval
    whose central ``1 - alpha`` interval it is), so that the Gaussian metrics apply. The
    aleatoric and epistemic stds are multiplied by the same factor ``new pred_uct / old
    pred_uct``, so ``total^2 = aleatoric^2 + epistemic^2`` still holds and the split keeps its
    proportions (conformal calibration says nothing about the split itself). With
    ``quantile_levels`` set, ``quantiles`` ``[N, T, Q]`` are those of the Gaussian centred on the
    interval with that std (its ``alpha / 2`` and ``1 - alpha / 2`` quantiles are the conformal
    bounds). Other keys
    (``samples``, a quantile model's ``quantiles``) are the wrapped method's, uncalibrated; the
    raw ``outputs`` are dropped, so the ``nll`` metric scores the calibrated Gaussian.

    Test metrics: the Gaussian ones on ``pred``/``pred_uct`` plus ``coverage`` (fraction of
    targets in ``[lower, upper]``, nominally ``1 - alpha``) and ``interval_width``. Several
    targets ``[N, T]`` get one conformal quantile each (per-target marginal coverage).

    Args:
        model: a fitted regression method (a ``RegressionTask`` ``UQMethod``).
        alpha: miscoverage level in ``(0, 1)``; the intervals cover ``1 - alpha``.
        score: ``"auto"``, ``"normalized"``, ``"absolute"`` or ``"cqr"`` (see above).
    """

    default_split = "calib"
    concat_dims = {"scores": 0}
    # one conformal quantile per target
    fitted_buffers = ("conformal_quantile",)
    summary_buffers = {
        "conformal_quantile": "conformal_quantile",
        "calibration_points": "num_calibration_points",
    }

    def __init__(self, model: UQMethod, alpha: float = 0.1, score: str = "auto") -> None:
        check_wrapped_model(
            model, RegressionTask, "regression", "MVERegression or QuantileRegression"
        )
        alpha = _check_alpha(alpha)
        if score not in SCORES:
            raise ValueError(f"`score` must be one of {SCORES}, got {score!r}")
        super().__init__(model)
        self.alpha = alpha
        if score == "auto":
            score = "cqr" if isinstance(model, QuantileRegression) else "normalized"
        self.score = score
        #: ``z_{1 - alpha/2}``: half-width of the central 1 - alpha Gaussian interval in stds.
        self.z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
        self.register_buffer("conformal_quantile", torch.full((1,), math.nan))
        self.register_buffer("num_calibration_points", torch.zeros((), dtype=torch.long))
        self.save_hyperparameters(ignore=["model"])

    def build_metrics(self) -> nn.ModuleDict:
        """The Gaussian regression metrics plus conformal ``coverage`` and ``interval_width``."""
        metrics = super().build_metrics()
        metrics["coverage"] = MeanMetric()
        metrics["interval_width"] = MeanMetric()
        return metrics

    @property
    def is_calibrated(self) -> bool:
        """Whether a conformal quantile has been computed."""
        return not bool(self.conformal_quantile.isnan().any())

    def nonconformity_scores(self, preds: dict[str, Tensor], target: Tensor) -> Tensor:
        """Scores ``[N, T]`` of the wrapped method's predictions ``preds`` for ``target``."""
        target = target.to(device=preds["pred"].device, dtype=preds["pred"].dtype)
        if self.score == "cqr":
            if "lower" not in preds or "upper" not in preds:
                raise ValueError(
                    f"`score`='cqr' needs a method that predicts 'lower' and 'upper' (such as "
                    f"QuantileRegression); {type(self.model).__name__} gives {sorted(preds)}"
                )
            return torch.maximum(preds["lower"] - target, target - preds["upper"])
        residual = (target - preds["pred"]).abs()
        if self.score == "absolute":
            return residual
        std = preds["pred_uct"]
        if not bool((std > 0).all()):
            raise ValueError(
                f"`score`='normalized' divides by pred_uct, but {type(self.model).__name__} "
                f"predicts pred_uct <= 0 for some points; use `score`='absolute'"
            )
        return residual / std

    def collect(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Nonconformity scores of one batch."""
        return {"scores": self.nonconformity_scores(self.model.predict_step(x), target)}

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """Set the conformal quantile of the scores (one per target)."""
        scores = collected["scores"]
        num_points = scores.shape[0]
        quantile = conformal_quantile(scores, self.alpha)
        if bool(quantile.isinf().any()):
            warnings.warn(
                f"{num_points} calibration points are too few for `alpha`={self.alpha} (the "
                f"conformal rank {conformal_rank(num_points, self.alpha)} exceeds them; need at "
                f"least {math.ceil(1 / self.alpha - 1)}): the intervals are infinite",
                stacklevel=2,
            )
        self.conformal_quantile = quantile.detach().reshape(-1).to(self.conformal_quantile.device)
        self.num_calibration_points = torch.tensor(
            num_points, device=self.conformal_quantile.device
        )

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The wrapped method's prediction with the conformal interval, see the class doc."""
        preds = self.wrapped_predictions(batch)
        with torch.no_grad():
            # the raw outputs describe the uncalibrated density: `nll` scores the calibrated
            # Gaussian (pred, pred_uct) instead
            preds.pop("outputs", None)
            pred, old_std = preds["pred"], preds["pred_uct"]
            quantile = self.conformal_quantile.to(pred.dtype)
            if self.score == "cqr":
                lower, upper = preds["lower"] - quantile, preds["upper"] + quantile
                half_width = (upper - lower).clamp_min(0.0) / 2.0
            else:
                half_width = quantile * old_std if self.score == "normalized" else quantile
                half_width = half_width.expand_as(pred)
                lower, upper = pred - half_width, pred + half_width
            new_std = (half_width / self.z).clamp_min(MIN_STD)
            has_std = old_std > 0
            factor = new_std / torch.where(has_std, old_std, torch.ones_like(old_std))

            def scaled(part: Tensor) -> Tensor:  # 0 * inf stays 0
                return torch.where(part > 0, part * factor, torch.zeros_like(part))

            preds["aleatoric_uct"] = torch.where(
                has_std, scaled(preds["aleatoric_uct"].expand_as(pred)), new_std
            )
            preds["epistemic_uct"] = torch.where(
                has_std, scaled(preds["epistemic_uct"].expand_as(pred)), torch.zeros_like(pred)
            )
            preds.update(pred_uct=new_std, lower=lower, upper=upper)
            if self.quantile_levels is not None:  # the Gaussian whose central 1 - alpha is it
                center = (lower + upper) / 2.0
                preds["quantiles"] = gaussian_quantiles(center, new_std, self.quantile_levels)
        return preds


class LogitCalibration(ClassificationTask, PostHocCalibration):
    """Base of the wrappers that calibrate a fitted classifier's logits on the ``"val"`` split.

    Checks the wrapped method, collects its logits ``[S, B, C]`` and the labels of each batch.

    Args:
        model: a fitted classification method (a ``ClassificationTask`` ``UQMethod``).
    """

    default_split = "val"
    concat_dims = {"logits": 1, "target": 0}

    def __init__(self, model: UQMethod) -> None:
        check_wrapped_model(
            model, ClassificationTask, "classification", "DeterministicClassification"
        )
        super().__init__(model)

    def collect(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The wrapped method's logits ``[S, B, C]`` and the targets of one batch."""
        logits = self.model.predict_step(x)["logits"]
        target = target.to(logits.device)
        self._check_target(logits, target)
        return {"logits": logits, "target": target}


class TemperatureScaling(LogitCalibration):
    """Temperature scaling of a fitted classifier's logits (Guo et al. 2017).

    One temperature ``T > 0`` divides every logit. It is fitted on held-out data (the ``"val"``
    split by default) by minimizing the NLL of the sample-mean probabilities
    ``mean_s softmax(logits_s / T)`` (:func:`tempered_nll`; for one sample, the plain softmax):
    the wrapped method's logits ``[S, N, C]`` are computed once, then ``log T`` is optimized by
    L-BFGS (strong Wolfe line search, float64) from ``T = 1``. The fitted ``T`` is clamped to
    ``[1e-3, 1e3]``; a calibration set that every sample classifies correctly drives ``T`` towards
    0 (the NLL has no minimum), and a warning says so.
    For one sample the predicted classes, hence the accuracy, are unchanged.

    ``predict_step`` returns the classification contract of the tempered logits (see
    :func:`~uq_box.methods.predictive_classification.classification_predictive`).

    Args:
        model: a fitted classification method (a ``ClassificationTask`` ``UQMethod``).
        max_iter: L-BFGS iterations.
    """

    #: range the fitted temperature is clamped to.
    temperature_range = (1e-3, 1e3)
    summary_buffers = {"temperature": "temperature"}

    def __init__(self, model: UQMethod, max_iter: int = 100) -> None:
        super().__init__(model)
        self.max_iter = positive_int(max_iter, "max_iter")
        self.register_buffer("temperature", torch.tensor(math.nan))
        self.save_hyperparameters(ignore=["model"])

    @property
    def is_calibrated(self) -> bool:
        """Whether a temperature has been fitted."""
        return not bool(self.temperature.isnan())

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """Fit ``T`` by L-BFGS on ``log T``."""
        logits, target = collected["logits"].detach().double(), collected["target"]
        with torch.enable_grad():
            log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
            optimizer = torch.optim.LBFGS(
                [log_t],
                lr=1.0,
                max_iter=self.max_iter,
                tolerance_grad=1e-9,
                tolerance_change=1e-12,
                line_search_fn="strong_wolfe",
            )

            def closure() -> Tensor:
                optimizer.zero_grad()
                loss = tempered_nll(logits, target, log_t.exp())
                loss.backward()
                return loss

            optimizer.step(closure)
        temperature = log_t.detach().exp().item()
        low, high = self.temperature_range
        clamped = min(max(temperature, low), high) if math.isfinite(temperature) else 1.0
        if bool((logits.argmax(-1) == target).all()):
            warnings.warn(
                f"every calibration point is classified correctly by every sample, so the NLL "
                f"keeps falling as T -> 0; the fitted T = {clamped:.3g} is where L-BFGS stopped "
                f"(clamped to {self.temperature_range}). Calibrate on more (or harder) held-out "
                f"data",
                stacklevel=2,
            )
        elif clamped != temperature:
            warnings.warn(
                f"the fitted temperature {temperature:.3g} is outside {self.temperature_range} "
                f"(a degenerate calibration set?); clamped to {clamped:.3g}",
                stacklevel=2,
            )
        temperature = clamped
        self.temperature = torch.tensor(temperature, device=self.temperature.device)

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The classification contract of the wrapped method's logits divided by ``T``."""
        logits = self.wrapped_predictions(batch)["logits"]
        with torch.no_grad():
            return classification_predictive(logits / self.temperature.to(logits.dtype))
