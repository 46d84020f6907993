"""Bimodal toy regression: two crossing branches, where one Gaussian per input cannot fit."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from uq_box.checks import non_negative_finite, positive_finite
from uq_box.datamodules._splits import check_input_range, independent_splits, split_counts
from uq_box.datamodules.base import ArrayDataModule


def _draw_branches(
    n: int, x_min: float, x_max: float, slope: float, noise_std: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` inputs uniform on ``[x_min, x_max]``, each on a branch ``+slope x`` or ``-slope x``
    chosen by a fair coin, plus Gaussian noise.
    """
    x = x_min + (x_max - x_min) * torch.rand(n, 1, generator=generator)
    sign = torch.randint(0, 2, (n, 1), generator=generator).mul(2).sub(1).to(x.dtype)
    noise = noise_std * torch.randn(n, 1, generator=generator)
    return x, sign * slope * x + noise


class ToyBimodalDatamodule(ArrayDataModule):
    """1-D regression with two crossing branches: ``y = ±slope x + eps``.

    Each point lies on the branch ``+slope x`` or ``-slope x`` with probability 1/2, plus noise
    ``eps ~ N(0, noise_std^2)``, for ``x`` uniform on ``[x_min, x_max]``. The conditional
    distribution of ``y`` is a mixture of two Gaussians, bimodal away from ``x = 0``: a mixture
    density network (:class:`~uq_box.methods.MDNRegression`) can fit it, a single Gaussian
    (:class:`~uq_box.methods.MVERegression`) only its mean 0 and a wide spread. Train,
    validation and test points are independent draws.

    Args:
        n_points: points of the training and validation splits together.
        val_fraction: share of ``n_points`` held out for validation.
        n_test: independent test points.
        x_min: lower end of the input range.
        x_max: upper end of the input range.
        slope: the branches' slopes ``±slope``.
        noise_std: standard deviation of the noise around each branch.
        batch_size: training batch size.
        seed: seed of the data and of the shuffle.
    """

    def __init__(
        self,
        n_points: int = 1000,
        val_fraction: float = 0.2,
        n_test: int = 1000,
        x_min: float = -2.0,
        x_max: float = 2.0,
        slope: float = 1.0,
        noise_std: float = 0.1,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        check_input_range(x_min, x_max)
        slope = positive_finite(slope, "slope")
        noise_std = non_negative_finite(noise_std, "noise_std")
        n_train, n_val = split_counts(n_points, val_fraction)
        generator = torch.Generator().manual_seed(seed)
        draw = partial(
            _draw_branches, x_min=x_min, x_max=x_max, slope=slope, noise_std=noise_std,
            generator=generator,
        )  # fmt: skip
        splits = independent_splits(draw, n_train, n_val, n_test)
        super().__init__(*splits, batch_size=batch_size, seed=seed)
        self.slope, self.noise_std = slope, noise_std
