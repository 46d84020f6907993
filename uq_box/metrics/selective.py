"""torchmetrics ``Metric`` classes for selective prediction: risk-coverage, AURC, E-AURC, AUGRC.

``update(uncertainty, loss)`` takes any uncertainty score ``[B]`` (higher means abstain first) and
the per-point loss ``[B]`` (e.g. the 0/1 error ``pred.argmax(-1) != target``). The areas rank
all points, so every score is kept in memory (concatenated across processes under DDP), as for
:class:`~uq_box.metrics.OODDetection`. See :mod:`uq_box.metrics.functional_selective` for the
definitions and the handling of ties.

Example::

    aurc = AURC()
    for batch in loader:
        preds = method.predict_step(batch)
        aurc.update(preds["pred_uct"], preds["pred"].argmax(-1) != batch["target"])
    aurc.compute()
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from uq_box.metrics import functional_selective as fsel

__all__ = ["AUGRC", "AURC", "EAURC", "RiskCoverageCurve"]


class _SelectiveMetric(Metric):
    """Base class: keeps every uncertainty score and loss; :meth:`compute` ranks them."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("uncertainty", default=[], dist_reduce_fx="cat")
        self.add_state("loss", default=[], dist_reduce_fx="cat")

    def update(self, uncertainty: Tensor, loss: Tensor) -> None:
        """Add a batch.

        Args:
            uncertainty: ``[B]`` scores, higher means abstain first.
            loss: ``[B]`` per-point loss (booleans read as 0/1).
        """
        uncertainty, loss = fsel._check_uncertainty_loss(uncertainty, loss)
        self.uncertainty.append(uncertainty)
        self.loss.append(loss)

    def _gathered(self) -> tuple[Tensor, Tensor]:
        if isinstance(self.uncertainty, list) and not self.uncertainty:
            raise ValueError(f"`{type(self).__name__}.compute` called before any `update`")
        return dim_zero_cat(self.uncertainty), dim_zero_cat(self.loss)


class RiskCoverageCurve(_SelectiveMetric):
    """The risk-coverage curve.

    See :func:`~uq_box.metrics.functional_selective.risk_coverage_curve`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    higher_is_better = None

    def compute(self) -> dict[str, Tensor]:
        """``{"coverage", "selective_risk", "generalized_risk", "threshold"}``, each ``[K]``."""
        curve = fsel.risk_coverage_curve(*self._gathered())
        return dict(
            zip(("coverage", "selective_risk", "generalized_risk", "threshold"), curve, strict=True)
        )


class AURC(_SelectiveMetric):
    """Area under the risk-coverage curve, see :func:`~uq_box.metrics.functional_selective.aurc`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def compute(self) -> Tensor:
        """The AURC of every point seen since the last reset (float64)."""
        return fsel.aurc(*self._gathered())


class EAURC(_SelectiveMetric):
    """Excess AURC over the oracle ranking, see :func:`~uq_box.metrics.functional_selective.eaurc`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def compute(self) -> Tensor:
        """The E-AURC of every point seen since the last reset (float64)."""
        return fsel.eaurc(*self._gathered())


class AUGRC(_SelectiveMetric):
    """Area under the generalized risk-coverage curve (Traub et al. 2024).

    See :func:`~uq_box.metrics.functional_selective.augrc`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def compute(self) -> Tensor:
        """The AUGRC of every point seen since the last reset (float64)."""
        return fsel.augrc(*self._gathered())
