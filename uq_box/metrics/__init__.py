"""Metrics for uncertainty quantification: torchmetrics classes and pure torch functions."""

from uq_box.metrics import (
    functional,
    functional_calibration,
    functional_classification,
    functional_ood,
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
from uq_box.metrics.regression import CRPS, GaussianNLL, IntervalCoverage, MiscalibrationArea
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
    "ExpectedCalibrationError",
    "GaussianNLL",
    "IntervalCoverage",
    "MiscalibrationArea",
    "MulticlassNLL",
    "OODDetection",
    "RiskCoverageCurve",
    "SetCoverage",
    "SetSize",
    "SizeStratifiedCoverage",
    "functional",
    "functional_calibration",
    "functional_classification",
    "functional_ood",
    "functional_selective",
    "functional_sets",
]
