"""Two correlated regression targets: where a diagonal (per-target) noise model is misspecified."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from uq_box.checks import number_in, positive_finite
from uq_box.datamodules._splits import check_input_range, independent_splits, split_counts
from uq_box.datamodules.base import ArrayDataModule


def _draw_correlated(
    n: int,
    x_min: float,
    x_max: float,
    scale_tril: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``n`` inputs uniform on ``[x_min, x_max]`` and targets ``[x, x] + L z``, ``z ~ N(0, I)``."""
    x = x_min + (x_max - x_min) * torch.rand(n, 1, generator=generator)
    noise = torch.randn(n, 2, generator=generator) @ scale_tril.T
    return x, x.expand(-1, 2) + noise


class ToyCorrelatedDatamodule(ArrayDataModule):
    """2-D regression with correlated noise: ``y = [x + e_1, x + e_2]``.

    ``(e_1, e_2)`` is Gaussian with standard deviations ``noise_std`` each and correlation
    ``correlation``, for ``x`` uniform on ``[x_min, x_max]``. A diagonal Gaussian head (``NLL()``,
    ``2 T = 4`` outputs) can fit both marginals but not their correlation; a full covariance head
    (:class:`~uq_box.losses.MultivariateNLL`, ``T (T + 3) / 2 = 5`` outputs) fits the joint
    distribution and scores a lower joint NLL. Train, validation and test points are independent
    draws. :attr:`noise_covariance` holds the true ``[2, 2]`` noise covariance.

    Args:
        n_points: points of the training and validation splits together.
        val_fraction: share of ``n_points`` held out for validation.
        n_test: independent test points.
        x_min: lower end of the input range.
        x_max: upper end of the input range.
        noise_std: standard deviation of each target's noise.
        correlation: correlation of the two noises, in ``(-1, 1)``.
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
        noise_std: float = 0.3,
        correlation: float = 0.8,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        check_input_range(x_min, x_max)
        noise_std = positive_finite(noise_std, "noise_std")
        correlation = number_in(correlation, "correlation", -1.0, 1.0)
        n_train, n_val = split_counts(n_points, val_fraction)
        covariance = noise_std**2 * torch.tensor([[1.0, correlation], [correlation, 1.0]])
        generator = torch.Generator().manual_seed(seed)
        draw = partial(
            _draw_correlated, x_min=x_min, x_max=x_max,
            scale_tril=torch.linalg.cholesky(covariance), generator=generator,
        )  # fmt: skip
        splits = independent_splits(draw, n_train, n_val, n_test)
        super().__init__(*splits, batch_size=batch_size, seed=seed)
        self.noise_std, self.correlation = noise_std, correlation
        self.noise_covariance = covariance
