"""Out-of-distribution (OOD) data for the OOD protocol, generated in memory and offline.

Each OOD data set pairs with an in-distribution data module of the same input shape
(:func:`uq_box.methods.ood.evaluate_ood` checks it):

| in-distribution | OOD | shift |
| --- | --- | --- |
| :class:`~uq_box.datamodules.DigitsDatamodule` | :class:`RotatedDigitsDatamodule` | the same test digits, rotated (covariate shift) |
| :class:`DigitsHeldOutDatamodule` (trains on the other classes) | its :meth:`~DigitsHeldOutDatamodule.ood_datamodule` | digits of classes never seen (semantic shift) |
| :class:`~uq_box.datamodules.TwoMoonsDatamodule` | :class:`FarCloudDatamodule` | a Gaussian cloud far from both moons |
| :class:`~uq_box.datamodules.DigitsDatamodule` | :class:`NoiseImagesDatamodule` | images of pixel noise |

An OOD data module (:class:`OODDatamodule`) holds one split, ``"test"``, with the OOD inputs and
labels ``-1`` where no class applies (the rotated and held-out digits keep their digit), and the
``test_dataloader``/``predict_dataloader`` of any data module.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from lightning import LightningDataModule
from torch import Tensor

from uq_box.checks import positive_finite, positive_int
from uq_box.datamodules.base import ArrayLike, InMemoryLoader, SplitStore, as_tensor
from uq_box.datamodules.classification import DigitsDatamodule

__all__ = [
    "DigitsHeldOutDatamodule",
    "FarCloudDatamodule",
    "NoiseImagesDatamodule",
    "OODDatamodule",
    "RotatedDigitsDatamodule",
]


class OODDatamodule(SplitStore, LightningDataModule):
    """OOD inputs in one ``"test"`` split.

    Args:
        X_test: OOD inputs ``[N, ...]``, the input shape of the in-distribution data.
        y_test: labels ``[N]`` (``-1`` for each input when ``None``: no class applies).
        eval_batch_size: batch size of the test and predict loaders.
    """

    splits = ("test",)

    def __init__(
        self,
        X_test: ArrayLike,  # noqa: N803 -- the name ArrayDataModule uses
        y_test: ArrayLike | None = None,
        eval_batch_size: int = 1024,
    ) -> None:
        super().__init__()
        self.eval_batch_size = positive_int(eval_batch_size, "eval_batch_size")
        x = as_tensor(X_test, "X_test")
        if len(x) == 0:
            raise ValueError("`X_test` is empty; expected at least one OOD input")
        y = (
            torch.full((len(x),), -1, dtype=torch.int64)
            if y_test is None
            else as_tensor(y_test, "y_test")
        )
        if len(y) != len(x):
            raise ValueError(
                f"`X_test` has {len(x)} rows but `y_test` has {len(y)}; expected the same"
            )
        self._data: dict[str, tuple[Tensor, Tensor]] = {"test": (x, y)}

    def test_dataloader(self) -> InMemoryLoader:
        """Batches of the OOD inputs, in order."""
        x, y = self.split("test")
        return InMemoryLoader(x, y, batch_size=self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> InMemoryLoader:
        """Batches of the OOD inputs, for ``Trainer.predict``."""
        return self.test_dataloader()

    @property
    def X_test(self) -> Tensor:  # noqa: N802
        return self.split("test")[0]


class RotatedDigitsDatamodule(OODDatamodule):
    """The test digits of a :class:`~uq_box.datamodules.DigitsDatamodule`, rotated.

    The same images as the in-distribution test split, rotated counter-clockwise by
    ``angle_degrees`` (:func:`~uq_box.datamodules.rotate_images`), in its input layout
    (flattened or not), with their digit labels.

    Args:
        digits: the in-distribution data module.
        angle_degrees: rotation angle in degrees.
    """

    def __init__(self, digits: DigitsDatamodule, angle_degrees: float = 90.0) -> None:
        if not isinstance(digits, DigitsDatamodule):
            raise TypeError(f"`digits` must be a DigitsDatamodule, got {type(digits).__name__}")
        x, y = digits.rotated_test(angle_degrees)
        super().__init__(x, y, eval_batch_size=digits.eval_batch_size)
        self.angle_degrees = float(angle_degrees)


class DigitsHeldOutDatamodule(DigitsDatamodule):
    """The digits without some classes, which become the OOD data (semantic shift).

    The splits of :class:`~uq_box.datamodules.DigitsDatamodule` (same arguments, same seed)
    with the images of ``held_out_classes`` removed from all of them, and the remaining labels
    renumbered ``0 .. K - 1`` in increasing order (:attr:`classes` maps a new label to its
    digit). :meth:`ood_datamodule` gives the held-out images, from every split: a network trained
    here never saw those classes.

    Args:
        held_out_classes: the digits left out (at least one, not all).
        batch_size: training batch size.
        val_fraction: share of all images held out for validation (before removing classes).
        test_fraction: share of all images held out for testing (before removing classes).
        flatten: give inputs as ``[N, 64]`` vectors instead of ``[N, 1, 8, 8]`` images.
        seed: seed of the splits and of the shuffle.
    """

    def __init__(
        self,
        held_out_classes: Sequence[int] = (8, 9),
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        flatten: bool = False,
        seed: int = 0,
    ) -> None:
        held = _held_out(held_out_classes)
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            flatten=flatten,
            seed=seed,
        )
        kept = [c for c in range(10) if c not in held]
        relabel = torch.full((10,), -1, dtype=torch.int64)
        relabel[kept] = torch.arange(len(kept))
        ood_x, ood_y = [], []
        for split, (x, y) in list(self._data.items()):
            out = torch.isin(y, torch.tensor(held))
            ood_x.append(x[out])
            ood_y.append(y[out])
            self._data[split] = (x[~out], relabel[y[~out]])
        self.held_out_classes = held
        #: the digit of each new label.
        self.classes = kept
        self.num_classes = len(kept)
        self._ood = (torch.cat(ood_x), torch.cat(ood_y))

    def ood_datamodule(self) -> OODDatamodule:
        """The images of the held-out classes (labels: their digits), same input layout."""
        return OODDatamodule(*self._ood, eval_batch_size=self.eval_batch_size)


def _held_out(classes: Sequence[int]) -> list[int]:
    items = [classes] if isinstance(classes, numbers.Integral) else classes
    valid = isinstance(items, Sequence) and not isinstance(items, str)
    valid = valid and all(
        isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in items
    )
    held = sorted({int(c) for c in items}) if valid else []
    if not held or held[0] < 0 or held[-1] > 9 or len(held) == 10:
        raise ValueError(
            f"`held_out_classes` must be digits in 0..9, at least one and not all ten, got "
            f"{classes!r}"
        )
    return held


class FarCloudDatamodule(OODDatamodule):
    """A Gaussian cloud of 2-D points far from the two moons (OOD for ``TwoMoonsDatamodule``).

    The moons span about ``[-1, 2] x [-0.5, 1]``; the default cloud sits at ``(4, 3)``, some 3
    units from the nearest point of the data. Labels are ``-1``.

    Args:
        n_points: points in the cloud.
        center: its centre ``(x, y)``.
        std: standard deviation along each axis.
        seed: seed of the draw.
    """

    def __init__(
        self,
        n_points: int = 500,
        center: Sequence[float] = (4.0, 3.0),
        std: float = 0.3,
        seed: int = 0,
    ) -> None:
        n_points = positive_int(n_points, "n_points")
        std = positive_finite(std, "std")
        centre = torch.as_tensor(np.asarray(center, dtype=np.float32))
        if centre.shape != (2,) or not bool(centre.isfinite().all()):
            raise ValueError(f"`center` must be two finite numbers (x, y), got {center!r}")
        generator = torch.Generator().manual_seed(int(seed))
        x = centre + std * torch.randn(n_points, 2, generator=generator)
        super().__init__(x)
        self.center, self.std = tuple(float(c) for c in centre), std


class NoiseImagesDatamodule(OODDatamodule):
    """Images of independent pixel noise (OOD for ``DigitsDatamodule``).

    ``"uniform"`` pixels are uniform on ``[0, 1]`` (the digits' range); ``"gaussian"`` pixels are
    ``N(0.5, 0.25^2)`` clipped to ``[0, 1]``. Labels are ``-1``.

    Args:
        n_images: number of images.
        image_shape: ``(channels, height, width)``; the digits' ``(1, 8, 8)`` by default.
        distribution: ``"uniform"`` or ``"gaussian"``.
        flatten: give inputs as ``[N, C * H * W]`` vectors (as ``DigitsDatamodule(flatten=True)``).
        seed: seed of the draw.
    """

    distributions = ("uniform", "gaussian")

    def __init__(
        self,
        n_images: int = 500,
        image_shape: Sequence[int] = (1, 8, 8),
        distribution: str = "uniform",
        flatten: bool = False,
        seed: int = 0,
    ) -> None:
        n_images = positive_int(n_images, "n_images")
        shape = tuple(positive_int(s, "image_shape") for s in image_shape)
        if distribution not in self.distributions:
            raise ValueError(
                f"`distribution` must be one of {self.distributions}, got {distribution!r}"
            )
        generator = torch.Generator().manual_seed(int(seed))
        if distribution == "uniform":
            x = torch.rand(n_images, *shape, generator=generator)
        else:
            x = (0.5 + 0.25 * torch.randn(n_images, *shape, generator=generator)).clamp(0.0, 1.0)
        super().__init__(x.flatten(1) if flatten else x)
        self.image_shape, self.distribution = shape, distribution
