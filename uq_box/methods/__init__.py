"""UQ methods: each a LightningModule following one prediction contract.

The contract, the hooks a method implements and how to add one:
[docs/architecture.md](../architecture.md) and [docs/add-a-method.md](../add-a-method.md).
"""

from uq_box.methods.base import ClassificationTask, RegressionTask, UQMethod
from uq_box.methods.bnn_vi import BNNVI, BNNVIClassification, BNNVIRegression
from uq_box.methods.deep_ensemble import (
    DeepEnsemble,
    DeepEnsembleClassification,
    DeepEnsembleRegression,
)
from uq_box.methods.deterministic import (
    Deterministic,
    DeterministicClassification,
    DeterministicRegression,
    MVERegression,
)
from uq_box.methods.laplace import Laplace, LaplaceClassification, LaplaceRegression
from uq_box.methods.mc_dropout import MCDropout, MCDropoutClassification, MCDropoutRegression
from uq_box.methods.posthoc import ConformalRegression, PostHocCalibration, TemperatureScaling
from uq_box.methods.quantile import QuantileRegression
from uq_box.methods.sgmcmc import (
    SGMCMC,
    PSGLDClassification,
    PSGLDRegression,
    SGHMCClassification,
    SGHMCRegression,
    SGLDClassification,
    SGLDRegression,
    SGMCMCClassification,
    SGMCMCRegression,
)
from uq_box.methods.stacked import StackedRuns
from uq_box.methods.swag import SWAG, SWAGClassification, SWAGRegression

__all__ = [
    "BNNVI",
    "ConformalRegression",
    "BNNVIClassification",
    "BNNVIRegression",
    "ClassificationTask",
    "DeepEnsemble",
    "DeepEnsembleClassification",
    "DeepEnsembleRegression",
    "Deterministic",
    "DeterministicClassification",
    "DeterministicRegression",
    "Laplace",
    "LaplaceClassification",
    "LaplaceRegression",
    "MCDropout",
    "MCDropoutClassification",
    "MCDropoutRegression",
    "MVERegression",
    "PostHocCalibration",
    "PSGLDClassification",
    "PSGLDRegression",
    "QuantileRegression",
    "RegressionTask",
    "SGHMCClassification",
    "SGHMCRegression",
    "SGLDClassification",
    "SGLDRegression",
    "SGMCMC",
    "SGMCMCClassification",
    "SGMCMCRegression",
    "SWAG",
    "StackedRuns",
    "SWAGClassification",
    "SWAGRegression",
    "TemperatureScaling",
    "UQMethod",
]
