"""The OOD data modules: shapes, labels, seeds, what the held-out split removes, the errors."""

import pytest
import torch

from uq_box.datamodules import DigitsDatamodule, rotate_images
from uq_box.datamodules.ood import (
    DigitsHeldOutDatamodule,
    FarCloudDatamodule,
    NoiseImagesDatamodule,
    OODDatamodule,
    RotatedDigitsDatamodule,
)


def test_ood_datamodule_holds_one_test_split():
    dm = OODDatamodule(torch.randn(7, 3), eval_batch_size=4)
    assert dm.has_split("test") and not dm.has_split("train")
    x, y = dm.split("test")
    assert x.shape == (7, 3) and torch.equal(y, torch.full((7,), -1))
    assert [len(b["input"]) for b in dm.test_dataloader()] == [4, 3]
    assert dm.X_test is x
    torch.testing.assert_close(next(iter(dm.predict_dataloader()))["input"], x[:4])
    with pytest.raises(ValueError, match="`X_test` has 7 rows but `y_test` has 2"):
        OODDatamodule(torch.randn(7, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="`X_test` contains 1 non-finite"):
        OODDatamodule(torch.tensor([[float("nan")], [0.0]]))
    with pytest.raises(ValueError, match="`X_test` is empty"):
        OODDatamodule(torch.zeros(0, 3))


def test_rotated_digits_are_the_test_digits_rotated():
    for flatten in (False, True):
        digits = DigitsDatamodule(flatten=flatten, seed=1)
        rotated = RotatedDigitsDatamodule(digits, 45.0)
        x, y = digits.split("test")
        rx, ry = rotated.split("test")
        assert rx.shape == x.shape and torch.equal(ry, y)
        expected = rotate_images(x.reshape(-1, 1, 8, 8), 45.0)
        torch.testing.assert_close(rx.reshape(-1, 1, 8, 8), expected)
    with pytest.raises(TypeError, match="`digits` must be a DigitsDatamodule"):
        RotatedDigitsDatamodule(OODDatamodule(torch.zeros(2, 64)))


def test_digits_held_out_classes():
    full = DigitsDatamodule(seed=2)
    dm = DigitsHeldOutDatamodule(held_out_classes=[3, 7], seed=2)
    assert dm.num_classes == 8 and dm.classes == [0, 1, 2, 4, 5, 6, 8, 9]
    ood = dm.ood_datamodule()
    ox, oy = ood.split("test")
    assert set(oy.tolist()) == {3, 7}
    total = 0
    for split in ("train", "val", "test"):
        x, y = dm.split(split)
        fx, fy = full.split(split)
        keep = (fy != 3) & (fy != 7)
        torch.testing.assert_close(x, fx[keep])  # same splits, held-out images removed
        assert torch.equal(torch.tensor(dm.classes)[y], fy[keep])  # labels renumbered 0..7
        assert y.min() == 0 and y.max() == 7
        total += int((~keep).sum())
    assert len(ox) == total  # every held-out image, from all three splits
    assert ox.shape[1:] == (1, 8, 8)
    assert DigitsHeldOutDatamodule(9, flatten=True).ood_datamodule().split("test")[0].shape[1:] == (
        64,
    )
    for bad in ([], [10], list(range(10)), ["8"], 2.5, [True]):
        with pytest.raises(ValueError, match="`held_out_classes` must be digits in 0..9"):
            DigitsHeldOutDatamodule(held_out_classes=bad)


def test_far_cloud_and_noise_images():
    cloud = FarCloudDatamodule(n_points=4000, center=(4.0, 3.0), std=0.3, seed=0)
    x, y = cloud.split("test")
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and bool((y == -1).all())
    torch.testing.assert_close(x.mean(0), torch.tensor([4.0, 3.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.tensor([0.3, 0.3]), atol=0.02, rtol=0)
    assert torch.equal(
        FarCloudDatamodule(seed=5).split("test")[0], FarCloudDatamodule(seed=5).split("test")[0]
    )
    with pytest.raises(ValueError, match="`center` must be two finite numbers"):
        FarCloudDatamodule(center=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="`std` must be a positive finite number"):
        FarCloudDatamodule(std=0.0)
    uniform = NoiseImagesDatamodule(n_images=2000, seed=0).split("test")[0]
    assert uniform.shape == (2000, 1, 8, 8) and 0 <= uniform.min() and uniform.max() <= 1
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    gaussian = NoiseImagesDatamodule(n_images=50, distribution="gaussian", flatten=True)
    x = gaussian.split("test")[0]
    assert x.shape == (50, 64) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="`distribution` must be one of"):
        NoiseImagesDatamodule(distribution="salt")
    with pytest.raises(ValueError, match="`n_images` must be a positive integer"):
        NoiseImagesDatamodule(n_images=0)
