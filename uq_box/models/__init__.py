"""Plain backbones to wrap with a UQ method."""

from uq_box.models.cnn import CNN
from uq_box.models.mlp import MLP
from uq_box.models.unet import UNet

__all__ = ["CNN", "MLP", "UNet"]
