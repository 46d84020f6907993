"""UQ methods: each a LightningModule following the prediction contract of DESIGN.md."""

from uq_box.methods.base import RegressionTask, UQMethod
from uq_box.methods.bnn_vi import BNNVI, BNNVIRegression

__all__ = ["BNNVI", "BNNVIRegression", "RegressionTask", "UQMethod"]
