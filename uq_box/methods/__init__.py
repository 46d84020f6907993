"""UQ methods: each a LightningModule following one prediction contract.

The contract, the hooks a method implements and how to add one:
[docs/architecture.md](../architecture.md) and [docs/add-a-method.md](../add-a-method.md).
"""

from uq_box.methods.base import ClassificationTask, RegressionTask, UQMethod
from uq_box.methods.binary import (
    BinaryClassificationTask,
    BNNVIBinaryClassification,
    DeepEnsembleBinaryClassification,
    DeterministicBinaryClassification,
    MCBatchNormBinaryClassification,
    MCDropoutBinaryClassification,
    TTABinaryClassification,
)
from uq_box.methods.bnn_vi import BNNVI, BNNVIClassification, BNNVIRegression
from uq_box.methods.calibrators import (
    DirichletCalibration,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    VectorScaling,
)
from uq_box.methods.conformal_classification import ConformalClassification
from uq_box.methods.conformal_dense import ConformalPixelRegression, ConformalSegmentation
from uq_box.methods.ddu import DDU, DDUClassification
from uq_box.methods.deep_ensemble import (
    DeepEnsemble,
    DeepEnsembleClassification,
    DeepEnsembleRegression,
)
from uq_box.methods.dense import (
    BNNVIPixelRegression,
    BNNVISegmentation,
    DeepEnsemblePixelRegression,
    DeepEnsembleSegmentation,
    DeterministicPixelRegression,
    DeterministicSegmentation,
    MCDropoutPixelRegression,
    MCDropoutSegmentation,
    PixelRegressionTask,
    SegmentationTask,
    SGMCMCPixelRegression,
    SGMCMCSegmentation,
    SWAGPixelRegression,
    SWAGSegmentation,
)
from uq_box.methods.deterministic import (
    Deterministic,
    DeterministicClassification,
    DeterministicRegression,
    MVERegression,
)
from uq_box.methods.due import DUE, DUEClassification, DUERegression
from uq_box.methods.efficient_ensembles import (
    MIMO,
    BatchEnsemble,
    BatchEnsembleClassification,
    BatchEnsembleRegression,
    Masksembles,
    MasksemblesClassification,
    MasksemblesRegression,
    MIMOClassification,
    MIMORegression,
    PackedEnsemble,
    PackedEnsembleClassification,
    PackedEnsembleRegression,
    Rank1BNN,
    Rank1BNNClassification,
    Rank1BNNRegression,
)
from uq_box.methods.laplace import Laplace, LaplaceClassification, LaplaceRegression
from uq_box.methods.likelihood import DERRegression, MDNRegression
from uq_box.methods.mc_batchnorm import (
    MCBatchNormClassification,
    MCBatchNormMethod,
    MCBatchNormRegression,
)
from uq_box.methods.mc_dropout import (
    MCDropoutClassification,
    MCDropoutMethod,
    MCDropoutRegression,
)
from uq_box.methods.posthoc import ConformalRegression, PostHocCalibration, TemperatureScaling
from uq_box.methods.quantile import QuantileRegression
from uq_box.methods.recalibration import IsotonicRecalibration, StdScaling
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
from uq_box.methods.sngp import SNGP, SNGPClassification, SNGPRegression
from uq_box.methods.stacked import StackedRuns
from uq_box.methods.swag import SWAG, SWAGClassification, SWAGRegression
from uq_box.methods.tta import TTAClassification, TTAMethod, TTARegression

__all__ = [
    "BNNVIPixelRegression",
    "BNNVISegmentation",
    "DeepEnsemblePixelRegression",
    "DeepEnsembleSegmentation",
    "DeterministicPixelRegression",
    "DeterministicSegmentation",
    "MCDropoutPixelRegression",
    "MCDropoutSegmentation",
    "PixelRegressionTask",
    "SGMCMCPixelRegression",
    "SGMCMCSegmentation",
    "SWAGPixelRegression",
    "SWAGSegmentation",
    "SegmentationTask",
    "BNNVI",
    "ConformalRegression",
    "BNNVIBinaryClassification",
    "BNNVIClassification",
    "BNNVIRegression",
    "BinaryClassificationTask",
    "BatchEnsemble",
    "BatchEnsembleClassification",
    "BatchEnsembleRegression",
    "MIMO",
    "MIMOClassification",
    "MIMORegression",
    "Masksembles",
    "MasksemblesClassification",
    "MasksemblesRegression",
    "PackedEnsemble",
    "PackedEnsembleClassification",
    "PackedEnsembleRegression",
    "Rank1BNN",
    "Rank1BNNClassification",
    "Rank1BNNRegression",
    "ClassificationTask",
    "ConformalClassification",
    "ConformalPixelRegression",
    "ConformalSegmentation",
    "DDU",
    "DDUClassification",
    "DUE",
    "DUEClassification",
    "DUERegression",
    "DeepEnsemble",
    "DeepEnsembleBinaryClassification",
    "DeepEnsembleClassification",
    "DeepEnsembleRegression",
    "DERRegression",
    "Deterministic",
    "DeterministicBinaryClassification",
    "DeterministicClassification",
    "DeterministicRegression",
    "DirichletCalibration",
    "HistogramBinning",
    "IsotonicCalibration",
    "IsotonicRecalibration",
    "Laplace",
    "LaplaceClassification",
    "LaplaceRegression",
    "MCBatchNormBinaryClassification",
    "MCBatchNormClassification",
    "MCBatchNormMethod",
    "MCBatchNormRegression",
    "MCDropoutBinaryClassification",
    "MCDropoutClassification",
    "MCDropoutMethod",
    "MCDropoutRegression",
    "MDNRegression",
    "MatrixScaling",
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
    "SNGP",
    "SNGPClassification",
    "SNGPRegression",
    "StackedRuns",
    "StdScaling",
    "SWAGClassification",
    "SWAGRegression",
    "TTABinaryClassification",
    "TTAClassification",
    "TTAMethod",
    "TTARegression",
    "TemperatureScaling",
    "UQMethod",
    "VectorScaling",
]


def __getattr__(name: str) -> object:
    if name == "MCDropout":  # the layer's name; the method family base is MCDropoutMethod
        raise AttributeError(
            "uq_box.methods has no `MCDropout`: the MC dropout methods are MCDropoutRegression and "
            "MCDropoutClassification (family base: MCDropoutMethod); the layer is "
            "uq_box.nn.MCDropout"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
