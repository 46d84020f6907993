"""Plain backbones to wrap with a UQ method."""

from uq_box.models.cnn import CNN
from uq_box.models.mlp import MLP

__all__ = ["CNN", "MLP"]
