"""Data modules: synthetic toy data and user arrays, all held in memory."""

from uq_box.datamodules.base import ArrayDataModule, InMemoryLoader
from uq_box.datamodules.toy import ToyHeteroscedasticDatamodule

__all__ = ["ArrayDataModule", "InMemoryLoader", "ToyHeteroscedasticDatamodule"]
