"""Metrics for uncertainty quantification: torchmetrics classes and pure torch functions."""

from uq_box.metrics import (
    functional,
    functional_calibration,
    functional_classification,
    functional_ood,
)
from uq_box.metrics.calibration import AdaptiveCalibrationError, ClasswiseCalibrationError
from uq_box.metrics.classification import (
    BrierScore,
    ExpectedCalibrationError,
    MulticlassNLL,
    OODDetection,
)
from uq_box.metrics.regression import CRPS, GaussianNLL, IntervalCoverage, MiscalibrationArea

__all__ = [
    "CRPS",
    "AdaptiveCalibrationError",
    "BrierScore",
    "ClasswiseCalibrationError",
    "ExpectedCalibrationError",
    "GaussianNLL",
    "IntervalCoverage",
    "MiscalibrationArea",
    "MulticlassNLL",
    "OODDetection",
    "functional",
    "functional_calibration",
    "functional_classification",
    "functional_ood",
]
