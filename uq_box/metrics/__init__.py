"""Metrics for uncertainty quantification: torchmetrics classes and pure torch functions."""

from uq_box.metrics import (
    functional,
    functional_calibration,
    functional_classification,
    functional_ood,
    functional_quantiles,
    functional_samples,
    functional_selective,
    functional_sets,
)
from uq_box.metrics.calibration import AdaptiveCalibrationError, ClasswiseCalibrationError
from uq_box.metrics.classification import (
    BrierScore,
    ExpectedCalibrationError,
    MulticlassNLL,
    OODDetection,
)
from uq_box.metrics.density import MixtureNLL
from uq_box.metrics.regression import CRPS, GaussianNLL, IntervalCoverage, MiscalibrationArea
from uq_box.metrics.samples import (
    EnergyScore,
    IntervalScore,
    IntervalWidth,
    QuantileCoverage,
    QuantilePinball,
    SampleCRPS,
)
from uq_box.metrics.selective import AUGRC, AURC, EAURC, RiskCoverageCurve
from uq_box.metrics.sets import SetCoverage, SetSize, SizeStratifiedCoverage

__all__ = [
    "AUGRC",
    "AURC",
    "CRPS",
    "EAURC",
    "AdaptiveCalibrationError",
    "BrierScore",
    "ClasswiseCalibrationError",
    "EnergyScore",
    "ExpectedCalibrationError",
    "GaussianNLL",
    "IntervalCoverage",
    "IntervalScore",
    "IntervalWidth",
    "MiscalibrationArea",
    "MixtureNLL",
    "MulticlassNLL",
    "OODDetection",
    "QuantileCoverage",
    "QuantilePinball",
    "RiskCoverageCurve",
    "SampleCRPS",
    "SetCoverage",
    "SetSize",
    "SizeStratifiedCoverage",
    "functional",
    "functional_calibration",
    "functional_classification",
    "functional_ood",
    "functional_quantiles",
    "functional_samples",
    "functional_selective",
    "functional_sets",
]
