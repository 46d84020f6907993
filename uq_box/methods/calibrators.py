"""Post-hoc calibration of a fitted classifier beside temperature scaling.

Each wrapper takes a *fitted* classification method, fits a map on held-out data (the ``"val"``
split by default, as :class:`~uq_box.methods.posthoc.TemperatureScaling`; ``split="calib"`` or an
``(inputs, targets)`` pair work too) and then predicts the classification contract of the
calibrated probabilities. They share :class:`~uq_box.methods.posthoc.PostHocCalibration`'s
machinery: ``calibrate(data)`` or ``trainer.validate(wrapper, ...)`` fits, ``trainer.test`` logs
the usual metrics, ``trainer.fit`` is an error, a data module without the split is an error naming
it.

Maps of the logits, fitted by minimizing the NLL with L-BFGS in float64 from the identity (the
uncalibrated model), each applied to every sample ``s`` of the wrapped method's logits
``z_s`` ``[S, N, C]``; the NLL is that of the sample mean ``mean_s softmax(map(z_s))``, as for
temperature scaling, so the calibrated prediction keeps the ``S`` samples and the entropy split:

- :class:`VectorScaling`: ``w * z + b`` with ``w, b`` in ``R^C`` (Guo, Pleiss, Sun & Weinberger
  2017, "On Calibration of Modern Neural Networks"); temperature scaling is ``w = 1 / T``, ``b = 0``.
- :class:`MatrixScaling`: ``W z + b`` with ``W`` in ``R^{C x C}`` (Guo et al. 2017), optionally
  with the off-diagonal and intercept regularization (ODIR) of Kull et al. 2019.
- :class:`DirichletCalibration`: ``W log p + b`` on the log-probabilities ``log p =
  log_softmax(z)`` (Kull, Perello-Nieto, Kängsepp, Silva Filho, Song & Flach 2019, "Beyond
  temperature scaling: Obtaining well-calibrated multiclass probabilities with Dirichlet
  calibration"), with ODIR: the loss is the mean NLL plus ``lambda / (C (C - 1)) sum_{i != j}
  W_ij^2 + mu / C sum_j b_j^2``.

Maps of the probabilities, fitted one class against the rest on the wrapped method's mean
probabilities ``pred`` and renormalized to sum to 1 (Zadrozny & Elkan 2002, "Transforming
classifier scores into accurate multiclass probability estimates"); the calibrated prediction is
one distribution, ``S = 1``, so its ``epistemic_uct`` is 0:

- :class:`HistogramBinning`: the fraction of each bin's points that belong to the class
  (Zadrozny & Elkan 2001, "Obtaining calibrated probability estimates from decision trees and
  naive Bayesian classifiers"), equal-mass (the default, as there) or equal-width bins.
- :class:`IsotonicCalibration`: isotonic regression of ``1[y = c]`` on ``p_c`` (Zadrozny & Elkan
  2002), fitted by scikit-learn's pool-adjacent-violators (``sklearn.isotonic``, a core
  dependency) and evaluated in torch by linear interpolation between its knots, as
  ``IsotonicRegression.predict`` does.

A row whose one-vs-rest probabilities are all 0 (every class mapped to 0) keeps the wrapped
method's probabilities. The contract's ``logits`` are the logarithms of the calibrated
probabilities, floored at the dtype's smallest normal number so that they stay finite (a
probability of 0 becomes about ``1e-38`` in float32).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from uq_box.checks import non_negative_finite, positive_int
from uq_box.methods.base import UQMethod
from uq_box.methods.posthoc import LogitCalibration
from uq_box.methods.predictive_classification import classification_predictive

__all__ = [
    "ClassifierCalibration",
    "DirichletCalibration",
    "HistogramBinning",
    "IsotonicCalibration",
    "MatrixScaling",
    "VectorScaling",
]

BINNINGS = ("equal_mass", "equal_width")


def _non_negative_number(value: Any, name: str) -> float:
    return non_negative_finite(value, name)


def _mean_nll(log_p: Tensor, target: Tensor) -> Tensor:
    """Mean NLL of ``mean_s exp(log_p_s)`` for log-probabilities ``[S, N, C]``."""
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    return -log_mean.gather(-1, target.unsqueeze(-1)).mean()


class ClassifierCalibration(LogitCalibration):
    """Base of the classifier calibrators: collect logits, fit, predict the contract.

    Subclasses implement :meth:`fit_map` (on the collected logits ``[S, N, C]`` and targets) and
    :meth:`calibrated_logits` (the logits whose softmax is the calibrated prediction), and list
    the buffers whose shape is known only after fitting in :attr:`fitted_buffers`.

    Args:
        model: a fitted classification method (a ``ClassificationTask`` ``UQMethod``).
    """

    #: buffers sized by the number of classes (resized when a checkpoint is loaded).
    fitted_buffers: tuple[str, ...] = ()
    summary_buffers = {"calibration_points": "num_calibration_points"}

    def __init__(self, model: UQMethod) -> None:
        super().__init__(model)
        self.register_buffer("num_calibration_points", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_classes", torch.zeros((), dtype=torch.long))

    # -- to implement --------------------------------------------------------------------------
    def fit_map(self, logits: Tensor, target: Tensor) -> None:
        """Fit the map on the wrapped method's logits ``[S, N, C]`` and the labels ``[N]``."""
        raise NotImplementedError

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        """Calibrated logits ``[S', N, C]`` of the wrapped method's logits ``[S, N, C]``."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        """Whether the map has been fitted."""
        return int(self.num_calibration_points) > 0

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """Fit the map on every calibration point."""
        logits, target = collected["logits"].detach(), collected["target"].long()
        self.fit_map(logits, target)
        device = self.num_calibration_points.device
        self.num_calibration_points = torch.tensor(target.numel(), device=device)
        self.num_classes = torch.tensor(logits.shape[-1], device=device)

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The classification contract of the calibrated logits, see the module doc."""
        logits = self.wrapped_predictions(batch)["logits"]
        with torch.no_grad():
            if logits.shape[-1] != int(self.num_classes):
                raise ValueError(
                    f"{type(self).__name__} was calibrated on {int(self.num_classes)} classes but "
                    f"the wrapped method now gives {logits.shape[-1]}"
                )
            return classification_predictive(self.calibrated_logits(logits))


class _AffineCalibration(ClassifierCalibration):
    """``weight`` and ``bias`` of an affine map of each sample's logits (or log-probabilities),
    fitted by L-BFGS on the regularized NLL.

    Args:
        model: a fitted classification method.
        max_iter: L-BFGS iterations.
        off_diagonal_reg: ``lambda`` of the off-diagonal penalty (matrix maps only).
        intercept_reg: ``mu`` of the intercept penalty.
    """

    fitted_buffers = ("weight", "bias")
    #: ``"vector"`` (``w * z``) or ``"matrix"`` (``W z``).
    weight_kind = "matrix"
    #: map the log-probabilities (Dirichlet) rather than the logits.
    on_log_probs = False

    def __init__(
        self,
        model: UQMethod,
        max_iter: int = 200,
        off_diagonal_reg: float = 0.0,
        intercept_reg: float = 0.0,
    ) -> None:
        super().__init__(model)
        self.max_iter = positive_int(max_iter, "max_iter")
        self.off_diagonal_reg = _non_negative_number(off_diagonal_reg, "off_diagonal_reg")
        self.intercept_reg = _non_negative_number(intercept_reg, "intercept_reg")
        self.register_buffer("weight", torch.empty(0))
        self.register_buffer("bias", torch.empty(0))

    def _map_inputs(self, logits: Tensor) -> Tensor:
        return torch.log_softmax(logits, dim=-1) if self.on_log_probs else logits

    def _affine(self, inputs: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if self.weight_kind == "vector":
            return inputs * weight + bias
        return inputs @ weight.T + bias

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        """The affine map of each sample's logits (or log-probabilities)."""
        weight, bias = self.weight.to(logits.dtype), self.bias.to(logits.dtype)
        return self._affine(self._map_inputs(logits), weight, bias)

    def penalty(self, weight: Tensor, bias: Tensor) -> Tensor:
        """ODIR: ``lambda / (C (C - 1)) sum_{i != j} W_ij^2 + mu / C sum_j b_j^2``."""
        num_classes = bias.numel()
        total = self.intercept_reg * bias.square().sum() / num_classes
        if self.weight_kind == "matrix" and num_classes > 1:
            off = weight - torch.diag_embed(torch.diagonal(weight))
            total = total + self.off_diagonal_reg * off.square().sum() / (
                num_classes * (num_classes - 1)
            )
        return total

    def fit_map(self, logits: Tensor, target: Tensor) -> None:
        """Minimize the regularized NLL from the identity map by L-BFGS (float64)."""
        inputs = self._map_inputs(logits.double())
        num_classes = logits.shape[-1]
        eye = torch.eye(num_classes, dtype=torch.float64, device=logits.device)
        initial = torch.ones_like(eye[0]) if self.weight_kind == "vector" else eye
        with torch.enable_grad():
            weight = initial.clone().requires_grad_(True)
            bias = torch.zeros_like(eye[0]).requires_grad_(True)
            optimizer = torch.optim.LBFGS(
                [weight, bias],
                lr=1.0,
                max_iter=self.max_iter,
                tolerance_grad=1e-9,
                tolerance_change=1e-12,
                history_size=20,
                line_search_fn="strong_wolfe",
            )

            def closure() -> Tensor:
                optimizer.zero_grad()
                mapped = torch.log_softmax(self._affine(inputs, weight, bias), dim=-1)
                loss = _mean_nll(mapped, target) + self.penalty(weight, bias)
                loss.backward()
                return loss

            optimizer.step(closure)
        weight, bias = weight.detach(), bias.detach()
        if not (bool(weight.isfinite().all()) and bool(bias.isfinite().all())):
            raise FloatingPointError(
                f"{type(self).__name__}: the fit diverged (non-finite parameters); calibrate on "
                f"more held-out data or raise the regularization"
            )
        if bool((logits.argmax(-1) == target).all()):
            warnings.warn(
                f"every calibration point is classified correctly by every sample, so the NLL "
                f"has no minimum and {type(self).__name__}'s parameters are where L-BFGS stopped "
                f"after `max_iter`={self.max_iter} iterations. Calibrate on more (or harder) "
                f"held-out data",
                stacklevel=3,
            )
        self.weight = weight.to(self.num_classes.device)
        self.bias = bias.to(self.num_classes.device)


class VectorScaling(_AffineCalibration):
    """Vector scaling of a fitted classifier's logits (Guo et al. 2017): ``w * z + b``.

    One weight and one bias per class, fitted on held-out data (the ``"val"`` split by default)
    by minimizing the NLL of ``mean_s softmax(w * z_s + b)`` with L-BFGS from ``w = 1, b = 0``.
    With all weights equal to ``1 / T`` and no bias it is temperature scaling with temperature
    ``T``. Unlike temperature scaling it can change the predicted class.

    Args:
        model: a fitted classification method (a ``ClassificationTask`` ``UQMethod``).
        max_iter: L-BFGS iterations.
        intercept_reg: ``mu`` of the penalty ``mu / C sum_j b_j^2`` (0: none, as in Guo et al.).
    """

    weight_kind = "vector"

    def __init__(self, model: UQMethod, max_iter: int = 200, intercept_reg: float = 0.0) -> None:
        super().__init__(model, max_iter=max_iter, intercept_reg=intercept_reg)
        self.save_hyperparameters(ignore=["model"])


class MatrixScaling(_AffineCalibration):
    """Matrix scaling of a fitted classifier's logits (Guo et al. 2017): ``W z + b``.

    A full ``C x C`` matrix and a bias, fitted as :class:`VectorScaling` from ``W = I, b = 0``.
    With many classes and few calibration points it overfits (Guo et al. 2017); the
    off-diagonal and intercept regularization (ODIR) of Kull et al. (2019) adds
    ``lambda / (C (C - 1)) sum_{i != j} W_ij^2 + mu / C sum_j b_j^2`` to the mean NLL.

    Args:
        model: a fitted classification method (a ``ClassificationTask`` ``UQMethod``).
        max_iter: L-BFGS iterations.
        off_diagonal_reg: ``lambda`` (0: unregularized, as in Guo et al.).
        intercept_reg: ``mu`` (0: unregularized).
    """

    weight_kind = "matrix"

    def __init__(
        self,
        model: UQMethod,
        max_iter: int = 200,
        off_diagonal_reg: float = 0.0,
        intercept_reg: float = 0.0,
    ) -> None:
        super().__init__(model, max_iter, off_diagonal_reg, intercept_reg)
        self.save_hyperparameters(ignore=["model"])


class DirichletCalibration(_AffineCalibration):
    """Dirichlet calibration (Kull et al. 2019): ``softmax(W log p + b)``.

    The map acts on the log-probabilities ``log p = log_softmax(z)`` of each sample: the
    calibrated probabilities are those of a Dirichlet-distributed generative model of ``p`` per
    class (the paper's section 3). ``W`` and ``b`` are fitted from ``W = I, b = 0`` by minimizing
    the mean NLL plus the ODIR penalty ``lambda / (C (C - 1)) sum_{i != j} W_ij^2 + mu / C sum_j
    b_j^2``, which pulls the map towards vector scaling of the log-probabilities and is what
    makes it work with many classes. Kull et al. choose ``lambda`` and ``mu`` by
    cross-validation; the defaults here are mild.

    Args:
        model: a fitted classification method (a ``ClassificationTask`` ``UQMethod``).
        max_iter: L-BFGS iterations.
        off_diagonal_reg: ``lambda`` of the off-diagonal penalty.
        intercept_reg: ``mu`` of the intercept penalty.
    """

    weight_kind = "matrix"
    on_log_probs = True

    def __init__(
        self,
        model: UQMethod,
        max_iter: int = 200,
        off_diagonal_reg: float = 1e-3,
        intercept_reg: float = 1e-3,
    ) -> None:
        super().__init__(model, max_iter, off_diagonal_reg, intercept_reg)
        self.save_hyperparameters(ignore=["model"])


class _OneVsRestCalibration(ClassifierCalibration):
    """One-vs-rest maps of the mean probabilities ``pred``, renormalized to sum to 1."""

    def fit_map(self, logits: Tensor, target: Tensor) -> None:
        """Fit one map per class on ``(pred[:, c], 1[y = c])``."""
        probs = classification_predictive(logits.double())["pred"]
        onehot = torch.nn.functional.one_hot(target, probs.shape[-1]).to(probs.dtype)
        self.fit_one_vs_rest(probs, onehot)

    def fit_one_vs_rest(self, probs: Tensor, onehot: Tensor) -> None:
        """Fit the per-class maps on probabilities ``[N, C]`` and one-hot labels ``[N, C]``."""
        raise NotImplementedError

    def one_vs_rest(self, probs: Tensor) -> Tensor:
        """The per-class calibrated probabilities ``[N, C]`` (before renormalizing)."""
        raise NotImplementedError

    def calibrated_probs(self, probs: Tensor) -> Tensor:
        """Calibrated probabilities ``[N, C]``: the one-vs-rest maps, renormalized.

        Rows whose maps are all 0 keep ``probs``.
        """
        mapped = self.one_vs_rest(probs).clamp(0.0, 1.0)
        total = mapped.sum(-1, keepdim=True)
        return torch.where(total > 0, mapped / total.clamp_min(1e-300), probs)

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        """``log`` of the calibrated mean probabilities (floored), one sample ``[1, N, C]``."""
        probs = self.calibrated_probs(classification_predictive(logits)["pred"])
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log().unsqueeze(0)


class HistogramBinning(_OneVsRestCalibration):
    """Histogram binning (Zadrozny & Elkan 2001), one class against the rest.

    For each class ``c`` the wrapped method's mean probabilities ``p_c`` of the calibration
    points are cut into ``num_bins`` bins, and a bin predicts the fraction of its calibration
    points whose label is ``c``; the ``C`` values of a point are renormalized to sum to 1.

    Bins (``binning``): ``"equal_mass"`` (the default, as in Zadrozny & Elkan): the interior
    edges are the ``b / num_bins`` quantiles of the calibration ``p_c``, bin ``b`` holds ``(e_b,
    e_{b+1}]``, and tied values stay together (a bin may then hold more points, another none);
    ``"equal_width"``: the bins ``(b / num_bins, (b + 1) / num_bins]`` of the ECE. A bin without
    calibration points predicts its midpoint.

    Args:
        model: a fitted classification method (a ``ClassificationTask`` ``UQMethod``).
        num_bins: bins per class.
        binning: ``"equal_mass"`` or ``"equal_width"``.
    """

    fitted_buffers = ("edges", "bin_values")

    def __init__(self, model: UQMethod, num_bins: int = 15, binning: str = "equal_mass") -> None:
        super().__init__(model)
        self.num_bins = positive_int(num_bins, "num_bins")
        if binning not in BINNINGS:
            raise ValueError(f"`binning` must be one of {BINNINGS}, got {binning!r}")
        self.binning = binning
        #: interior bin edges ``[C, num_bins - 1]`` and the value of each bin ``[C, num_bins]``.
        self.register_buffer("edges", torch.empty(0))
        self.register_buffer("bin_values", torch.empty(0))
        self.save_hyperparameters(ignore=["model"])

    def _bin(self, probs: Tensor, edges: Tensor) -> Tensor:
        """Bin index ``[N, C]`` of each class probability: bin ``b`` is ``(e_{b-1}, e_b]``."""
        columns = [
            torch.bucketize(probs[:, c].contiguous(), edges[c].contiguous(), right=False)
            for c in range(probs.shape[1])
        ]
        return torch.stack(columns, dim=1)

    def fit_one_vs_rest(self, probs: Tensor, onehot: Tensor) -> None:
        """Bin edges and the label frequency of each bin, per class."""
        num_classes, num_bins = probs.shape[1], self.num_bins
        levels = torch.arange(1, num_bins, dtype=probs.dtype, device=probs.device) / num_bins
        if self.binning == "equal_width":
            edges = levels.expand(num_classes, -1)
        else:
            edges = torch.quantile(probs.T, levels, dim=1).T  # [C, num_bins - 1]
        index = self._bin(probs, edges)
        flat = (index + num_bins * torch.arange(num_classes, device=probs.device)).reshape(-1)
        size = num_classes * num_bins
        hits = probs.new_zeros(size).scatter_add_(0, flat, onehot.reshape(-1))
        count = probs.new_zeros(size).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=probs.dtype)
        )
        full = torch.cat(
            [probs.new_zeros(num_classes, 1), edges, probs.new_ones(num_classes, 1)], dim=1
        )
        midpoint = ((full[:, :-1] + full[:, 1:]) / 2).reshape(-1)
        values = torch.where(count > 0, hits / count.clamp_min(1), midpoint)
        device = self.num_classes.device
        self.edges = edges.contiguous().to(device)
        self.bin_values = values.reshape(num_classes, num_bins).to(device)

    def one_vs_rest(self, probs: Tensor) -> Tensor:
        """The value of each class probability's bin."""
        edges = self.edges.to(probs.dtype)
        index = self._bin(probs, edges)
        return self.bin_values.to(probs.dtype).gather(1, index.T).T


class IsotonicCalibration(_OneVsRestCalibration):
    """Isotonic regression calibration (Zadrozny & Elkan 2002), one class against the rest.

    For each class ``c`` a non-decreasing function of ``p_c`` is fitted to ``1[y = c]`` on the
    calibration points by pool-adjacent-violators (``sklearn.isotonic.IsotonicRegression`` with
    ``y_min=0``, ``y_max=1``, ``out_of_bounds="clip"``); between its knots it is linear, beyond
    them constant, exactly as ``IsotonicRegression.predict``. The ``C`` values of a point are
    renormalized to sum to 1. The knots are buffers, so a calibrated wrapper is saved and loaded
    with the ``state_dict`` and predicts in torch on any device.

    Args:
        model: a fitted classification method (a ``ClassificationTask`` ``UQMethod``).
    """

    fitted_buffers = ("knots_x", "knots_y")

    def __init__(self, model: UQMethod) -> None:
        super().__init__(model)
        #: knots ``[C, K]`` of each class's piecewise-linear map, padded past 1 with flat ends.
        self.register_buffer("knots_x", torch.empty(0))
        self.register_buffer("knots_y", torch.empty(0))
        self.save_hyperparameters(ignore=["model"])

    def fit_one_vs_rest(self, probs: Tensor, onehot: Tensor) -> None:
        """Fit one isotonic regression per class (scikit-learn), keep its knots."""
        from sklearn.isotonic import IsotonicRegression

        p, y = probs.cpu().numpy(), onehot.cpu().numpy()
        knots = []
        for c in range(p.shape[1]):
            fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            fitted.fit(p[:, c], y[:, c])
            knots.append((fitted.X_thresholds_, fitted.y_thresholds_))
        width = max(len(x) for x, _ in knots)
        knots_x = torch.empty(len(knots), width, dtype=torch.float64)
        knots_y = torch.empty_like(knots_x)
        for c, (x, y_c) in enumerate(knots):
            n = len(x)
            knots_x[c, :n] = torch.as_tensor(x, dtype=torch.float64)
            knots_y[c, :n] = torch.as_tensor(y_c, dtype=torch.float64)
            # pad with increasing abscissae past any probability, flat at the last value
            knots_x[c, n:] = max(float(x[-1]), 1.0) + torch.arange(1, width - n + 1)
            knots_y[c, n:] = float(y_c[-1])
        device = self.num_classes.device
        self.knots_x, self.knots_y = knots_x.to(device), knots_y.to(device)

    def one_vs_rest(self, probs: Tensor) -> Tensor:
        """Each class's piecewise-linear map at its probability, clipped at the end knots."""
        knots_x, knots_y = self.knots_x.to(probs.dtype), self.knots_y.to(probs.dtype)
        columns = probs.T.contiguous()  # [C, N]
        width = knots_x.shape[1]
        if width == 1:
            return knots_y[:, :1].expand(-1, probs.shape[0]).T
        upper = torch.searchsorted(knots_x, columns, right=True).clamp(1, width - 1)
        x0, x1 = knots_x.gather(1, upper - 1), knots_x.gather(1, upper)
        y0, y1 = knots_y.gather(1, upper - 1), knots_y.gather(1, upper)
        share = ((columns - x0) / (x1 - x0)).clamp(0.0, 1.0)
        return (y0 + share * (y1 - y0)).T
