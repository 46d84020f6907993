"""Data modules: synthetic toy data, small image data and user arrays, all held in memory."""

from uq_box.datamodules.base import ArrayDataModule, InMemoryLoader, target_resolution
from uq_box.datamodules.bimodal import ToyBimodalDatamodule
from uq_box.datamodules.classification import (
    DigitsDatamodule,
    SpiralDatamodule,
    TwoMoonsDatamodule,
    make_spiral,
    rotate_images,
)
from uq_box.datamodules.correlated import ToyCorrelatedDatamodule
from uq_box.datamodules.dense import ToyPixelRegressionDatamodule, ToySegmentationDatamodule
from uq_box.datamodules.ood import (
    DigitsHeldOutDatamodule,
    FarCloudDatamodule,
    NoiseImagesDatamodule,
    OODDatamodule,
    RotatedDigitsDatamodule,
)
from uq_box.datamodules.stacked import StackedDataModule, StackedLoader, kfold_datamodules
from uq_box.datamodules.toy import (
    ToyGapDatamodule,
    ToyHeteroscedasticDatamodule,
    toy_gap_function,
    toy_gap_observations,
)
from uq_box.datamodules.uci import UCI_DATASETS, UCIRegressionDatamodule, default_uci_root

__all__ = [
    "ArrayDataModule",
    "DigitsDatamodule",
    "DigitsHeldOutDatamodule",
    "FarCloudDatamodule",
    "InMemoryLoader",
    "NoiseImagesDatamodule",
    "OODDatamodule",
    "RotatedDigitsDatamodule",
    "SpiralDatamodule",
    "StackedDataModule",
    "StackedLoader",
    "ToyBimodalDatamodule",
    "ToyCorrelatedDatamodule",
    "ToyGapDatamodule",
    "ToyHeteroscedasticDatamodule",
    "ToyPixelRegressionDatamodule",
    "ToySegmentationDatamodule",
    "TwoMoonsDatamodule",
    "UCIRegressionDatamodule",
    "UCI_DATASETS",
    "default_uci_root",
    "kfold_datamodules",
    "make_spiral",
    "rotate_images",
    "target_resolution",
    "toy_gap_function",
    "toy_gap_observations",
]
