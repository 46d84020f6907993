"""Matplotlib plots; every function returns a ``Figure`` and never calls ``plt.show()``."""

from uq_box.viz.classification import (
    plot_decision_surface,
    plot_reliability_diagram,
    plot_rotated_examples,
    plot_uncertainty_vs_rotation,
)
from uq_box.viz.comparison import plot_predictions_comparison
from uq_box.viz.mcmc import plot_traces
from uq_box.viz.ood import ood_roc_curve, plot_ood_detection
from uq_box.viz.recalibration import plot_recalibration
from uq_box.viz.regression import (
    plot_calibration,
    plot_predictions_regression,
    plot_toy_regression_data,
)
from uq_box.viz.selective import plot_risk_coverage
from uq_box.viz.training import plot_training_metrics
from uq_box.viz.weights import model_weights, plot_weight_histograms

__all__ = [
    "model_weights",
    "ood_roc_curve",
    "plot_calibration",
    "plot_decision_surface",
    "plot_ood_detection",
    "plot_predictions_comparison",
    "plot_predictions_regression",
    "plot_recalibration",
    "plot_reliability_diagram",
    "plot_risk_coverage",
    "plot_rotated_examples",
    "plot_toy_regression_data",
    "plot_training_metrics",
    "plot_traces",
    "plot_uncertainty_vs_rotation",
    "plot_weight_histograms",
]
