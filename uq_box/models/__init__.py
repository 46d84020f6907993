"""Plain backbones to wrap with a UQ method."""

from uq_box.models.mlp import MLP

__all__ = ["MLP"]
