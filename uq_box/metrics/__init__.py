"""Metrics for uncertainty quantification: torchmetrics classes and pure torch functions."""

from uq_box.metrics import functional
from uq_box.metrics.regression import CRPS, GaussianNLL, IntervalCoverage, MiscalibrationArea

__all__ = ["CRPS", "GaussianNLL", "IntervalCoverage", "MiscalibrationArea", "functional"]
