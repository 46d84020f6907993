"""Matplotlib plots; every function returns a ``Figure`` and never calls ``plt.show()``."""

from uq_box.viz.regression import (
    plot_calibration,
    plot_predictions_regression,
    plot_toy_regression_data,
)
from uq_box.viz.training import plot_training_metrics

__all__ = [
    "plot_calibration",
    "plot_predictions_regression",
    "plot_toy_regression_data",
    "plot_training_metrics",
]
