"""Classification data held in memory: two moons, a 3-arm spiral and the 8x8 digits.

All three are seeded and never touch the internet: the two moons come from
``sklearn.datasets.make_moons``, the spiral is generated here (the formula of the NumPyro BNN
lecture), and the digits are scikit-learn's bundled 8x8 images (``load_digits``), standing in for
MNIST. Inputs are float32, labels int64 of shape ``[N]``.

The 2-D data sets offer :meth:`grid`, a regular grid that reaches well past the data, for
decision-surface and uncertainty maps: a good UQ method grows uncertain far from the data. The
digits offer :meth:`DigitsDatamodule.rotated_test`, the test images rotated by an angle, for the
rotation out-of-distribution experiment. The rotation is written with
``torch.nn.functional.affine_grid``/``grid_sample`` so that no torchvision or scipy is needed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 -- the usual name
from torch import Tensor

from uq_box.checks import int_at_least, non_negative_finite, number_in
from uq_box.datamodules._splits import split_counts
from uq_box.datamodules.base import ArrayDataModule, InMemoryLoader

__all__ = [
    "DigitsDatamodule",
    "SpiralDatamodule",
    "TwoMoonsDatamodule",
    "make_spiral",
    "rotate_images",
]


class _Grid2DMixin:
    """Regular 2-D grids around the data of a 2-feature data module."""

    _data: dict[str, tuple[Tensor, Tensor]]

    def grid_extent(self, margin: float = 0.5) -> tuple[float, float, float, float]:
        """Bounding box of all splits, widened on each side by ``margin`` times its span.

        Args:
            margin: how far the box reaches past the data on each side, as a fraction of the
                data's span along that axis (``0.5``: the box is twice as wide as the data).

        Returns:
            ``(x_min, x_max, y_min, y_max)``, the ``extent`` matplotlib's ``imshow`` takes.
        """
        margin = non_negative_finite(margin, "margin")
        points = torch.cat([x for x, _ in self._data.values()])
        low, high = points.min(0).values, points.max(0).values
        span = (high - low).clamp_min(1e-6)
        low, high = low - margin * span, high + margin * span
        return float(low[0]), float(high[0]), float(low[1]), float(high[1])

    def grid(self, resolution: int = 100, margin: float = 0.5) -> Tensor:
        """A ``resolution x resolution`` grid of inputs over :meth:`grid_extent`.

        Points are ordered row by row, ``y`` (second feature) from low to high and ``x`` running
        fastest, so ``values.reshape(resolution, resolution)`` is an image for
        ``imshow(..., origin="lower", extent=grid_extent(margin))``.

        Args:
            resolution: points per axis.
            margin: see :meth:`grid_extent`.

        Returns:
            float32 tensor ``[resolution * resolution, 2]``.
        """
        resolution = int_at_least(resolution, "resolution", 2)
        x_min, x_max, y_min, y_max = self.grid_extent(margin)
        xs = torch.linspace(x_min, x_max, resolution)
        ys = torch.linspace(y_min, y_max, resolution)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


class TwoMoonsDatamodule(_Grid2DMixin, ArrayDataModule):
    """Two interleaving half circles (``sklearn.datasets.make_moons``), two classes.

    Inputs are kept raw, not standardized: they span about ``[-1, 2] x [-0.5, 1]``, a scale
    networks train on as they are, and :meth:`grid` stays in the same units as the data.
    Train and validation points come from one draw of ``n_points`` (shuffled, then split), the
    test points from an independent draw.

    Args:
        n_points: points of the training and validation splits together.
        noise: standard deviation of the Gaussian noise added to the points.
        val_fraction: share of ``n_points`` held out for validation.
        n_test: independent test points.
        batch_size: training batch size.
        seed: seed of the data and of the shuffle.
    """

    num_classes = 2

    def __init__(
        self,
        n_points: int = 1000,
        noise: float = 0.1,
        val_fraction: float = 0.2,
        n_test: int = 1000,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        from sklearn.datasets import make_moons

        n_train, n_val = split_counts(n_points, val_fraction)
        n_test = int_at_least(n_test, "n_test", 1)
        noise = non_negative_finite(noise, "noise")
        rng = np.random.RandomState(int_at_least(seed, "seed", 0))
        x, y = make_moons(n_samples=n_points, noise=noise, shuffle=True, random_state=rng)
        x_test, y_test = make_moons(n_samples=n_test, noise=noise, shuffle=True, random_state=rng)
        x, x_test = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(x_test).float()
        y, y_test = torch.as_tensor(y, dtype=torch.int64), torch.as_tensor(y_test).long()
        val = (x[n_train:], y[n_train:]) if n_val > 0 else (None, None)
        super().__init__(
            x[:n_train], y[:n_train], *val, x_test, y_test, batch_size=batch_size, seed=seed
        )
        self.noise = noise


def make_spiral(
    n_points: int,
    n_classes: int = 3,
    noise: float = 0.2,
    arm_length: float = 4.0,
    max_radius: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Points on ``n_classes`` interleaved spiral arms, shuffled.

    Arm ``j`` (class ``j``) has radii evenly spaced on ``[0, max_radius]`` and angles
    ``t = linspace(j L, (j + 1) L) + noise * eps`` with ``L = arm_length`` radians and
    ``eps ~ N(0, 1)``; a point is ``(r sin t, r cos t)``. With the defaults (3 classes, 4 radians
    per arm, radius 0.5, angular noise 0.2) this is the data of the NumPyro BNN lecture.

    Args:
        n_points: points in all, shared between the classes as evenly as possible.
        n_classes: number of arms.
        noise: standard deviation of the angular noise, in radians.
        arm_length: angle swept by each arm, in radians.
        max_radius: radius where the arms end.
        generator: source of randomness (default: a fresh one seeded with 0).

    Returns:
        ``(inputs [n_points, 2] float32, labels [n_points] int64)``.
    """
    n_points = int_at_least(n_points, "n_points", 1)
    n_classes = int_at_least(n_classes, "n_classes", 2)
    noise = non_negative_finite(noise, "noise")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    xs, ys = [], []
    for j in range(n_classes):
        n = n_points // n_classes + (j < n_points % n_classes)
        if n == 0:
            continue
        radius = torch.linspace(0.0, max_radius, n)
        theta = torch.linspace(j * arm_length, (j + 1) * arm_length, n)
        theta = theta + noise * torch.randn(n, generator=generator)
        xs.append(torch.stack([radius * torch.sin(theta), radius * torch.cos(theta)], dim=-1))
        ys.append(torch.full((n,), j, dtype=torch.int64))
    order = torch.randperm(n_points, generator=generator)
    return torch.cat(xs)[order].float(), torch.cat(ys)[order]


class SpiralDatamodule(_Grid2DMixin, ArrayDataModule):
    """The 3-arm spiral of the NumPyro BNN lecture (see :func:`make_spiral`), in ``[-0.5, 0.5]^2``.

    Train and validation points come from one draw of ``n_points`` (shuffled, then split), the
    test points from an independent draw.

    Args:
        n_points: points of the training and validation splits together (100 per class in the
            lecture).
        n_classes: number of arms and classes.
        noise: standard deviation of the angular noise, in radians.
        val_fraction: share of ``n_points`` held out for validation.
        n_test: independent test points.
        batch_size: training batch size.
        seed: seed of the data and of the shuffle.
    """

    def __init__(
        self,
        n_points: int = 300,
        n_classes: int = 3,
        noise: float = 0.2,
        val_fraction: float = 0.2,
        n_test: int = 300,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        n_train, n_val = split_counts(n_points, val_fraction)
        n_test = int_at_least(n_test, "n_test", 1)
        n_classes = int_at_least(n_classes, "n_classes", 2)
        generator = torch.Generator().manual_seed(int_at_least(seed, "seed", 0))
        x, y = make_spiral(n_points, n_classes, noise, generator=generator)
        x_test, y_test = make_spiral(n_test, n_classes, noise, generator=generator)
        val = (x[n_train:], y[n_train:]) if n_val > 0 else (None, None)
        super().__init__(
            x[:n_train], y[:n_train], *val, x_test, y_test, batch_size=batch_size, seed=seed
        )
        self.num_classes = n_classes
        self.noise = noise


def rotate_images(images: Tensor, angle_degrees: float) -> Tensor:
    """Rotate images counter-clockwise (as displayed, row 0 on top) about their centre.

    Bilinear interpolation with ``affine_grid``/``grid_sample``; pixels that come from outside
    the image are 0 (the digits' background). A multiple of 90 degrees on a square image maps
    pixel centres onto pixel centres, so it equals ``torch.rot90(images, k, dims=(-2, -1))`` up
    to rounding.

    Args:
        images: ``[N, C, H, W]`` or ``[N, H, W]`` floating point images.
        angle_degrees: rotation angle in degrees.

    Returns:
        The rotated images, same shape and dtype as ``images``.
    """
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError("`images` must be a floating point tensor [N, C, H, W] or [N, H, W]")
    if images.ndim not in (3, 4):
        raise ValueError(
            f"`images` must have shape [N, C, H, W] or [N, H, W], got {list(images.shape)}"
        )
    if isinstance(angle_degrees, bool) or not isinstance(angle_degrees, numbers.Real):
        raise ValueError(f"`angle_degrees` must be a real number, got {angle_degrees!r}")
    x = images.unsqueeze(1) if images.ndim == 3 else images
    angle = math.radians(float(angle_degrees))
    cos, sin = math.cos(angle), math.sin(angle)
    # output pixel p samples the input at R^-1 p, in normalized (x right, y down) coordinates
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1) if images.ndim == 3 else out


class DigitsDatamodule(ArrayDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), offline.

    Pixel values (0 to 16) are scaled to ``[0, 1]``. The test split and the validation split are
    stratified by class (``sklearn.model_selection.train_test_split``).

    Args:
        batch_size: training batch size.
        val_fraction: share of all images held out for validation (0 for no validation split).
        test_fraction: share of all images held out for testing.
        flatten: give inputs as ``[N, 64]`` vectors instead of ``[N, 1, 8, 8]`` images.
        seed: seed of the splits and of the shuffle.
        ood_angles: rotation angles (degrees) of the rotation out-of-distribution experiment;
            default ``0, 15, ..., 180``.
    """

    num_classes = 10
    image_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        flatten: bool = False,
        seed: int = 0,
        ood_angles: Sequence[float] | None = None,
    ) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        val_fraction = number_in(val_fraction, "val_fraction", 0.0, 1.0, closed="low")
        test_fraction = number_in(test_fraction, "test_fraction", 0.0, 1.0)
        if val_fraction + test_fraction >= 0.95:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must leave training data, got "
                f"{val_fraction} + {test_fraction}"
            )
        seed = int_at_least(seed, "seed", 0)
        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
        labels = digits.target.astype(np.int64)
        index = np.arange(len(labels))
        rest, test = train_test_split(
            index, test_size=test_fraction, stratify=labels, random_state=seed
        )
        val: np.ndarray | None = None
        if val_fraction > 0:
            share = val_fraction / (1.0 - test_fraction)
            rest, val = train_test_split(
                rest, test_size=share, stratify=labels[rest], random_state=seed
            )
        self.flatten = bool(flatten)

        def take(idx: np.ndarray | None) -> tuple[Tensor | None, Tensor | None]:
            if idx is None:
                return None, None
            x = torch.from_numpy(images[idx])
            return (x.flatten(1) if self.flatten else x), torch.from_numpy(labels[idx])

        super().__init__(*take(rest), *take(val), *take(test), batch_size=batch_size, seed=seed)
        if ood_angles is None:
            ood_angles = range(0, 181, 15)
        self.ood_angles = [float(a) for a in ood_angles]

    def rotated_test(self, angle_degrees: float) -> tuple[Tensor, Tensor]:
        """The test images rotated counter-clockwise by ``angle_degrees`` (see
        :func:`rotate_images`), in the data module's input layout, and their labels.
        """
        x, y = self.split("test")
        images = x.reshape(-1, *self.image_shape) if self.flatten else x
        rotated = rotate_images(images, angle_degrees)
        return (rotated.flatten(1) if self.flatten else rotated), y

    def rotated_test_dataloader(self, angle_degrees: float) -> InMemoryLoader:
        """Batches of :meth:`rotated_test`, for ``Trainer.test`` or ``Trainer.predict``."""
        x, y = self.rotated_test(angle_degrees)
        return InMemoryLoader(x, y, batch_size=self.eval_batch_size, shuffle=False)
