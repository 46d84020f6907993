"""Data modules: synthetic toy data, small image data and user arrays, all held in memory."""

from uq_box.datamodules.base import ArrayDataModule, InMemoryLoader
from uq_box.datamodules.classification import (
    DigitsDatamodule,
    SpiralDatamodule,
    TwoMoonsDatamodule,
    make_spiral,
    rotate_images,
)
from uq_box.datamodules.toy import ToyHeteroscedasticDatamodule

__all__ = [
    "ArrayDataModule",
    "DigitsDatamodule",
    "InMemoryLoader",
    "SpiralDatamodule",
    "ToyHeteroscedasticDatamodule",
    "TwoMoonsDatamodule",
    "make_spiral",
    "rotate_images",
]
