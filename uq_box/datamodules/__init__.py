"""Data modules: synthetic toy data, small image data and user arrays, all held in memory."""

from uq_box.datamodules.base import ArrayDataModule, InMemoryLoader
from uq_box.datamodules.classification import (
    DigitsDatamodule,
    SpiralDatamodule,
    TwoMoonsDatamodule,
    make_spiral,
    rotate_images,
)
from uq_box.datamodules.toy import (
    ToyGapDatamodule,
    ToyHeteroscedasticDatamodule,
    toy_gap_function,
    toy_gap_observations,
)
from uq_box.datamodules.uci import UCI_DATASETS, UCIRegressionDatamodule

__all__ = [
    "ArrayDataModule",
    "DigitsDatamodule",
    "InMemoryLoader",
    "SpiralDatamodule",
    "ToyGapDatamodule",
    "ToyHeteroscedasticDatamodule",
    "TwoMoonsDatamodule",
    "UCIRegressionDatamodule",
    "UCI_DATASETS",
    "make_spiral",
    "rotate_images",
    "toy_gap_function",
    "toy_gap_observations",
]
