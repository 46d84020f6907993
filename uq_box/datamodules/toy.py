"""Synthetic data generated in memory, seeded."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from uq_box.checks import int_at_least, non_negative_finite, non_negative_int
from uq_box.datamodules._splits import split_counts
from uq_box.datamodules.base import ArrayDataModule


def toy_heteroscedastic_function(x: Tensor) -> Tensor:
    """Ground-truth mean of the toy heteroscedastic data: ``sin(x) + 0.3 x``."""
    return torch.sin(x) + 0.3 * x


def toy_heteroscedastic_noise_std(x: Tensor) -> Tensor:
    """Ground-truth noise standard deviation, between 0.05 and 0.45 (0.06 at -4, 0.45 at pi/2)."""
    return 0.05 + 0.4 * (1.0 + torch.sin(0.5 * x + math.pi / 4)) / 2.0


def _check_range(x_min: float, x_max: float) -> None:
    if not x_min < x_max:
        raise ValueError(f"`x_min` must be below `x_max`, got {x_min} and {x_max}")


def _draw_heteroscedastic(
    n: int, x_min: float, x_max: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` inputs uniform on ``[x_min, x_max]`` and their noisy heteroscedastic targets."""
    x = x_min + (x_max - x_min) * torch.rand(n, 1, generator=generator)
    noise = toy_heteroscedastic_noise_std(x) * torch.randn(n, 1, generator=generator)
    return x, toy_heteroscedastic_function(x) + noise


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
        x_min: lower end of the input range of the data.
        x_max: upper end of the input range of the data.
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
        _check_range(x_min, x_max)
        n_train, n_val = split_counts(n_points, val_fraction)
        n_calib = non_negative_int(n_calib, "n_calib")
        generator = torch.Generator().manual_seed(seed)
        draw = partial(_draw_heteroscedastic, x_min=x_min, x_max=x_max, generator=generator)
        x_train, y_train = draw(n_train)
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


def toy_gap_function(x: Tensor) -> Tensor:
    """Ground truth of the gap data (Pyro BNN tutorial): ``x + 0.3 sin(2 pi x) + 0.3 sin(4 pi x)``."""
    return x + 0.3 * torch.sin(2 * math.pi * x) + 0.3 * torch.sin(4 * math.pi * x)


def toy_gap_observations(x: Tensor, noise_std: float, generator: torch.Generator) -> Tensor:
    """Noisy observations at ``x`` as the Pyro tutorial draws them.

    One noise value ``eps ~ N(0, noise_std^2)`` per point perturbs both the input of the sines and
    the output: ``y = x + 0.3 sin(2 pi (x + eps)) + 0.3 sin(4 pi (x + eps)) + eps``.
    """
    eps = noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    shifted = x + eps
    return x + 0.3 * torch.sin(2 * math.pi * shifted) + 0.3 * torch.sin(4 * math.pi * shifted) + eps


def _check_intervals(
    left: tuple[float, float], right: tuple[float, float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """``left`` and ``right`` as float pairs, or raise unless they are ordered with a gap."""
    left, right = (float(left[0]), float(left[1])), (float(right[0]), float(right[1]))
    if not left[0] < left[1] < right[0] < right[1]:
        raise ValueError(
            f"`left` and `right` must be intervals (low, high) with a gap between them, left "
            f"below right; got {left} and {right}"
        )
    return left, right


class ToyGapDatamodule(ArrayDataModule):
    """1-D regression with a gap in the data: "in-between" uncertainty (Pyro BNN tutorial).

    Training inputs are evenly spaced on two intervals, ``[-0.2, 0.2]`` and ``[0.6, 1.0]`` by
    default, half of ``n_points`` on each, with nothing in between; targets follow
    :func:`toy_gap_observations` (noise std 0.02). A good method is confident on the two
    intervals and uncertain in the gap ``gap_bounds = (0.2, 0.6)`` and beyond the data.

    The test split has noisy observations at ``n_test`` evenly spaced inputs across
    ``[x_min, x_max]`` (the gap included); ``X_gtext``/``Y_gtext`` hold the noise-free truth on a
    grid over the same range. ``X_gap``/``Y_gap`` are ``n_gap`` new observations evenly spaced
    across the gap, the "new data" of the tutorial's Bayesian-updating exercise; they are drawn
    last, so they leave the other splits of a seed unchanged, and are in no split
    (:meth:`gap_datamodule` wraps them for a second fit).

    Args:
        n_points: training (and validation) points, split evenly between the two intervals.
        left: the interval ``(low, high)`` holding the left half of the data.
        right: the interval holding the right half of the data, above ``left``.
        noise_std: standard deviation of the noise.
        val_fraction: share of the points held out at random for validation (0: none, as in
            the tutorial).
        n_test: test points across ``[x_min, x_max]``.
        x_min: lower end of the range of the test points and the ground-truth grid.
        x_max: upper end of that range.
        n_gt: points on the ground-truth grid.
        n_gap: new observations in the gap.
        batch_size: training batch size.
        seed: seed of the noise, the validation split and the shuffle.
    """

    def __init__(
        self,
        n_points: int = 1000,
        left: tuple[float, float] = (-0.2, 0.2),
        right: tuple[float, float] = (0.6, 1.0),
        noise_std: float = 0.02,
        val_fraction: float = 0.0,
        n_test: int = 1000,
        x_min: float = -0.5,
        x_max: float = 1.5,
        n_gt: int = 1000,
        n_gap: int = 100,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        left, right = _check_intervals(left, right)
        _check_range(x_min, x_max)
        noise_std = non_negative_finite(noise_std, "noise_std")
        n_test = int_at_least(n_test, "n_test", 1)
        n_gt = int_at_least(n_gt, "n_gt", 2)
        n_gap = int_at_least(n_gap, "n_gap", 1)
        _, n_val = split_counts(n_points, val_fraction)
        generator = torch.Generator().manual_seed(seed)
        n_left = n_points // 2
        x = torch.cat(
            [torch.linspace(*left, n_left), torch.linspace(*right, n_points - n_left)]
        ).unsqueeze(-1)
        y = toy_gap_observations(x, noise_std, generator)
        order = torch.randperm(n_points, generator=generator)
        train, val = order[n_val:].sort().values, order[:n_val].sort().values
        x_test = torch.linspace(x_min, x_max, n_test).unsqueeze(-1)
        y_test = toy_gap_observations(x_test, noise_std, generator)
        super().__init__(
            x[train],
            y[train],
            x[val] if n_val > 0 else None,
            y[val] if n_val > 0 else None,
            x_test,
            y_test,
            batch_size=batch_size,
            seed=seed,
        )
        self.left, self.right = left, right
        self.gap_bounds = (left[1], right[0])
        self.noise_std = float(noise_std)
        self.X_gtext = torch.linspace(x_min, x_max, n_gt).unsqueeze(-1)
        self.Y_gtext = toy_gap_function(self.X_gtext)
        self.X_gap = torch.linspace(*self.gap_bounds, n_gap).unsqueeze(-1)
        self.Y_gap = toy_gap_observations(self.X_gap, noise_std, generator)

    def in_gap(self, x: Tensor) -> Tensor:
        """Whether inputs lie strictly inside the gap, ``gap_bounds[0] < x < gap_bounds[1]``."""
        low, high = self.gap_bounds
        return (x > low) & (x < high)

    def gap_datamodule(self, batch_size: int | None = None) -> ArrayDataModule:
        """The new observations ``X_gap``/``Y_gap`` as training data, with this test split: the
        second fit of Bayesian updating (:func:`uq_box.nn.posterior_as_prior`).
        """
        return ArrayDataModule(
            self.X_gap,
            self.Y_gap,
            X_test=self.X_test,
            y_test=self.Y_test,
            batch_size=self.batch_size if batch_size is None else batch_size,
            seed=self.seed,
        )
