"""Synthetic data generated in memory, seeded."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uq_box.datamodules.base import ArrayDataModule


def toy_heteroscedastic_function(x: Tensor) -> Tensor:
    """Ground-truth mean of the toy heteroscedastic data: ``sin(x) + 0.3 x``."""
    return torch.sin(x) + 0.3 * x


def toy_heteroscedastic_noise_std(x: Tensor) -> Tensor:
    """Ground-truth noise standard deviation, between 0.05 and 0.45 (0.06 at -4, 0.45 at pi/2)."""
    return 0.05 + 0.4 * (1.0 + torch.sin(0.5 * x + math.pi / 4)) / 2.0


class ToyHeteroscedasticDatamodule(ArrayDataModule):
    """1-D regression whose noise level changes with the input.

    ``y = sin(x) + 0.3 x + eps``, ``eps ~ N(0, s(x)^2)`` with ``s`` between 0.05 and 0.45, for
    ``x`` uniform on ``[x_min, x_max]``. Train, validation, test and (optional) calibration points
    are independent draws; the calibration points are drawn last, so ``n_calib`` leaves the other
    splits of a seed unchanged.
    ``X_gtext``/``Y_gtext`` hold a dense noise-free grid that extends ``extension`` past both ends
    of the training range, to show how a method extrapolates.

    Args:
        n_points: points of the training and validation splits together.
        val_fraction: share of ``n_points`` held out for validation.
        n_test: independent test points.
        x_min, x_max: input range of the data.
        extension: how far the ground-truth grid reaches past the data range on each side.
        n_gt: points on the ground-truth grid.
        batch_size: training batch size.
        seed: seed of the data and of the shuffle.
        n_calib: independent calibration points (the ``"calib"`` split); none when 0.
    """

    def __init__(
        self,
        n_points: int = 500,
        val_fraction: float = 0.3,
        n_test: int = 1000,
        x_min: float = -4.0,
        x_max: float = 4.0,
        extension: float = 2.0,
        n_gt: int = 500,
        batch_size: int = 32,
        seed: int = 0,
        n_calib: int = 0,
    ) -> None:
        if n_points < 2:
            raise ValueError(f"`n_points` must be at least 2, got {n_points}")
        if not x_min < x_max:
            raise ValueError(f"`x_min` must be below `x_max`, got {x_min} and {x_max}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}")
        if isinstance(n_calib, bool) or not isinstance(n_calib, int) or n_calib < 0:
            raise ValueError(f"`n_calib` must be a non-negative integer, got {n_calib!r}")
        n_val = round(n_points * val_fraction)
        if n_points - n_val < 1:
            raise ValueError(
                f"`val_fraction`={val_fraction} of `n_points`={n_points} leaves no training point"
            )
        generator = torch.Generator().manual_seed(seed)

        def draw(n: int) -> tuple[Tensor, Tensor]:
            x = x_min + (x_max - x_min) * torch.rand(n, 1, generator=generator)
            noise = toy_heteroscedastic_noise_std(x) * torch.randn(n, 1, generator=generator)
            return x, toy_heteroscedastic_function(x) + noise

        x_train, y_train = draw(n_points - n_val)
        x_val, y_val = draw(n_val) if n_val > 0 else (None, None)
        x_test, y_test = draw(n_test)
        x_calib, y_calib = draw(n_calib) if n_calib > 0 else (None, None)
        super().__init__(
            x_train,
            y_train,
            x_val,
            y_val,
            x_test,
            y_test,
            batch_size=batch_size,
            seed=seed,
            X_calib=x_calib,
            y_calib=y_calib,
        )
        self.X_gtext = torch.linspace(x_min - extension, x_max + extension, n_gt).unsqueeze(-1)
        self.Y_gtext = toy_heteroscedastic_function(self.X_gtext)
        self.noise_std_gtext = toy_heteroscedastic_noise_std(self.X_gtext)
