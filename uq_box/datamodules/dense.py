"""Toy dense prediction data, generated in memory: segmentation and pixel-wise regression.

- :class:`ToySegmentationDatamodule`: disks (class 1) and squares (class 2) on a textured, noisy
  background (class 0), with soft boundaries whose pixels are labeled at random in proportion to
  the shape's membership (ambiguous boundaries: aleatoric uncertainty sits on the edges) and
  flat bars that occlude the shapes (labeled background). ``ood=True`` draws the test images with
  triangles, a shape never seen in training (their pixels are unlabeled, ``ignore_index``, and
  marked in :attr:`~ToySegmentationDatamodule.ood_mask_test`): epistemic uncertainty should rise
  there.
- :class:`ToyPixelRegressionDatamodule`: a smooth random field ``u`` (a sum of low-frequency
  Fourier modes) as the input image and ``y = sin(2u) + 0.5 u`` plus heteroscedastic noise of
  std ``0.05 + 0.25 sigmoid(3u)`` as the target. ``ood=True`` scales the test fields by 2.5,
  values outside the training range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uq_box.checks import int_at_least, non_negative_finite, number_in, positive_int
from uq_box.datamodules.base import ArrayDataModule

__all__ = [
    "ToyPixelRegressionDatamodule",
    "ToySegmentationDatamodule",
    "make_toy_pixel_regression",
    "make_toy_segmentation",
    "toy_pixel_noise_std",
]

IGNORE_INDEX = -100


def _texture(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Oriented sinusoidal stripes with random frequency and phase, ``[n, size, size]``."""
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.rand(n, 1, 1, generator=generator) * math.pi
    freq = 0.4 + 0.6 * torch.rand(n, 1, 1, generator=generator)
    phase = torch.rand(n, 1, 1, generator=generator) * 2 * math.pi
    return torch.sin(freq * (xx * angle.cos() + yy * angle.sin()) + phase)


def _signed_distance(shape: str, dy: Tensor, dx: Tensor, radius: Tensor) -> Tensor:
    """Distance inside the shape's boundary (positive inside), per pixel."""
    if shape == "disk":
        return radius - (dy**2 + dx**2).sqrt()
    if shape == "square":
        return radius * 0.85 - torch.maximum(dy.abs(), dx.abs())
    # an equilateral triangle pointing up (y grows downwards): three edges at distance r / 2
    # from the centre, outward normals (dx, dy) = (0, 1), (s3 / 2, -1 / 2), (-s3 / 2, -1 / 2)
    s3 = math.sqrt(3.0)
    d1 = radius * 0.5 - dy
    d2 = radius * 0.5 - (dx * s3 / 2 - dy * 0.5)
    d3 = radius * 0.5 - (-dx * s3 / 2 - dy * 0.5)
    return torch.minimum(torch.minimum(d1, d2), d3) * 1.5


def make_toy_segmentation(
    n: int,
    image_size: int = 32,
    generator: torch.Generator | None = None,
    shapes: tuple[str, ...] = ("disk", "square"),
    noise_std: float = 0.3,
    boundary_width: float = 1.0,
    occluder_prob: float = 0.5,
    unlabeled_fraction: float = 0.0,
) -> dict[str, Tensor]:
    """``n`` toy segmentation images.

    Every image holds 1 or 2 shapes of ``shapes`` (disk: class 1, bright; square: class 2, dark;
    triangle: bright, unlabeled) on stripes plus Gaussian noise. A pixel's membership of a shape
    is ``sigmoid(signed distance / boundary_width)``; its label is the shape's class with that
    probability (so boundary pixels are ambiguous). A flat bar occludes part of the image with
    probability ``occluder_prob`` (labeled background). A random ``unlabeled_fraction`` of the
    pixels is labeled ``-100``.

    Returns:
        ``input`` ``[n, 1, H, W]``, ``target`` ``[n, H, W]`` (long), ``boundary`` (pixels whose
        membership of some shape is in ``(0.2, 0.8)``) and ``ood`` (pixels of a triangle), each
        ``[n, H, W]`` booleans.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    size = image_size
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    image = 0.3 * _texture(n, size, g)
    target = torch.zeros(n, size, size, dtype=torch.long)
    boundary = torch.zeros(n, size, size, dtype=torch.bool)
    ood = torch.zeros(n, size, size, dtype=torch.bool)
    intensity = {"disk": 1.0, "square": -1.0, "triangle": 1.0}
    label = {"disk": 1, "square": 2, "triangle": IGNORE_INDEX}
    num_shapes = 1 + (torch.rand(n, generator=g) < 0.5).long()
    for slot in range(2):
        active = (num_shapes > slot).float().reshape(n, 1, 1)
        which = torch.randint(len(shapes), (n,), generator=g)
        radius = size * (0.14 + 0.12 * torch.rand(n, 1, 1, generator=g))
        cy = radius + (size - 2 * radius) * torch.rand(n, 1, 1, generator=g)
        cx = radius + (size - 2 * radius) * torch.rand(n, 1, 1, generator=g)
        draw = torch.rand(n, size, size, generator=g)
        for k, shape in enumerate(shapes):
            sel = (which == k).float().reshape(n, 1, 1) * active
            member = torch.sigmoid(
                _signed_distance(shape, yy - cy, xx - cx, radius) / boundary_width
            )
            member = member * sel
            image = image * (1 - member) + intensity[shape] * member
            labeled = draw < member
            target = torch.where(labeled, torch.full_like(target, label[shape]), target)
            boundary |= (member > 0.2) & (member < 0.8)
            if shape == "triangle":
                ood |= member > 0.5
    if occluder_prob > 0:
        has = torch.rand(n, generator=g) < occluder_prob
        vertical = torch.rand(n, generator=g) < 0.5
        start = torch.randint(0, size - 3, (n,), generator=g).reshape(n, 1, 1)
        pos = torch.where(vertical.reshape(n, 1, 1), xx, yy)
        bar = has.reshape(n, 1, 1) & (pos >= start) & (pos < start + max(2, size // 12))
        image = torch.where(bar, torch.zeros_like(image), image)
        target = torch.where(bar, torch.zeros_like(target), target)
        boundary &= ~bar
        ood &= ~bar
    image = image + noise_std * torch.randn(n, size, size, generator=g)
    if unlabeled_fraction > 0:
        drop = torch.rand(n, size, size, generator=g) < unlabeled_fraction
        target = torch.where(drop, torch.full_like(target, IGNORE_INDEX), target)
    return {"input": image.unsqueeze(1), "target": target, "boundary": boundary, "ood": ood}


def _smooth_field(n: int, size: int, generator: torch.Generator, modes: int = 4) -> Tensor:
    """Sum of ``modes`` random low-frequency plane waves, ``[n, size, size]``, std about 1."""
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    field = torch.zeros(n, size, size)
    for _ in range(modes):
        ky, kx = (2 * math.pi * 1.5 * torch.randn(n, 1, 1, generator=generator) for _ in range(2))
        phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
        field = field + torch.sin(ky * yy + kx * xx + phase)
    return field * math.sqrt(2.0 / modes)


def toy_pixel_noise_std(field: Tensor) -> Tensor:
    """The noise std of :func:`make_toy_pixel_regression`: ``0.05 + 0.25 sigmoid(3u)``."""
    return 0.05 + 0.25 * torch.sigmoid(3 * field)


def make_toy_pixel_regression(
    n: int, image_size: int = 32, generator: torch.Generator | None = None, scale: float = 1.0
) -> dict[str, Tensor]:
    """``n`` fields ``u`` (times ``scale``) and targets ``sin(2u) + 0.5u + noise``.

    Returns:
        ``input`` ``[n, 1, H, W]``, ``target`` ``[n, 1, H, W]`` and ``noise_std`` (the true noise
        std per pixel) ``[n, 1, H, W]``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    field = scale * _smooth_field(n, image_size, g)
    std = toy_pixel_noise_std(field)
    target = torch.sin(2 * field) + 0.5 * field + std * torch.randn(field.shape, generator=g)
    return {
        "input": field.unsqueeze(1),
        "target": target.unsqueeze(1),
        "noise_std": std.unsqueeze(1),
    }


def _check_sizes(n_train: int, n_val: int, n_test: int, image_size: int) -> None:
    for value, name in ((n_train, "n_train"), (n_val, "n_val"), (n_test, "n_test")):
        positive_int(value, name)
    int_at_least(image_size, "image_size", 8)


def _arrays(*splits: dict[str, Tensor]) -> list[Tensor]:
    """``input``, ``target`` of each split in turn (``ArrayDataModule``'s arguments)."""
    return [split[key] for split in splits for key in ("input", "target")]


class ToySegmentationDatamodule(ArrayDataModule):
    """Toy segmentation (see :func:`make_toy_segmentation`): 3 classes, images ``[1, H, W]``.

    Args:
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        image_size: ``H = W``.
        noise_std: pixel noise.
        boundary_width: softness of the shapes' boundaries, in pixels.
        occluder_prob: probability of an occluding bar per image.
        unlabeled_fraction: fraction of the training pixels labeled ``-100`` (unlabeled).
        ood: draw the test images with triangles (unseen shapes, unlabeled); their pixels are in
            :attr:`ood_mask_test`.
        batch_size: training batch size.
        eval_batch_size: batch size of the other loaders.
        seed: seed of the data and of the shuffle.
    """

    num_classes = 3
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        n_train: int = 256,
        n_val: int = 64,
        n_test: int = 64,
        image_size: int = 32,
        noise_std: float = 0.3,
        boundary_width: float = 1.0,
        occluder_prob: float = 0.5,
        unlabeled_fraction: float = 0.0,
        ood: bool = False,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        _check_sizes(n_train, n_val, n_test, image_size)
        non_negative_finite(noise_std, "noise_std")
        number_in(boundary_width, "boundary_width", 0.0)
        number_in(occluder_prob, "occluder_prob", 0.0, 1.0, closed="low high")
        number_in(unlabeled_fraction, "unlabeled_fraction", 0.0, 1.0, closed="low")
        g = torch.Generator().manual_seed(seed)
        common = {
            "image_size": image_size,
            "generator": g,
            "noise_std": noise_std,
            "boundary_width": boundary_width,
            "occluder_prob": occluder_prob,
        }
        train = make_toy_segmentation(n_train, unlabeled_fraction=unlabeled_fraction, **common)
        val = make_toy_segmentation(n_val, **common)
        test_shapes = ("disk", "square", "triangle") if ood else ("disk", "square")
        test = make_toy_segmentation(n_test, shapes=test_shapes, **common)
        super().__init__(
            *_arrays(train, val, test),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
        )
        self.boundary_mask_test = test["boundary"]
        self.boundary_mask_val = val["boundary"]
        self.ood_mask_test = test["ood"]


class ToyPixelRegressionDatamodule(ArrayDataModule):
    """Toy pixel-wise regression (see :func:`make_toy_pixel_regression`): images ``[1, H, W]``,
    one target channel.

    Args:
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        image_size: ``H = W``.
        ood: scale the test fields by 2.5 (inputs outside the training range).
        batch_size: training batch size.
        eval_batch_size: batch size of the other loaders.
        seed: seed of the data and of the shuffle.
    """

    def __init__(
        self,
        n_train: int = 256,
        n_val: int = 64,
        n_test: int = 64,
        image_size: int = 32,
        ood: bool = False,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        _check_sizes(n_train, n_val, n_test, image_size)
        g = torch.Generator().manual_seed(seed)
        train = make_toy_pixel_regression(n_train, image_size, g)
        val = make_toy_pixel_regression(n_val, image_size, g)
        test = make_toy_pixel_regression(n_test, image_size, g, scale=2.5 if ood else 1.0)
        super().__init__(
            *_arrays(train, val, test),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
        )
        self.noise_std_test = test["noise_std"]
