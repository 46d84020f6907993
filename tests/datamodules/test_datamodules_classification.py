"""Classification data modules: two moons, spiral, digits (shapes, seeding, splits, rotation)."""

import math

import numpy as np
import pytest
import torch

from uq_box.datamodules.classification import (
    DigitsDatamodule,
    SpiralDatamodule,
    TwoMoonsDatamodule,
    make_spiral,
    rotate_images,
)

SPLITS = ("X_train", "Y_train", "X_val", "Y_val", "X_test", "Y_test")


@pytest.fixture(scope="module")
def digits():
    return DigitsDatamodule()


def _no_shared_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not (torch.cdist(a.flatten(1), b.flatten(1)) == 0).any()


# --------------------------------------------------------------------------- two moons
def test_two_moons_shapes_dtypes_balance():
    dm = TwoMoonsDatamodule(n_points=200, val_fraction=0.25, n_test=100)
    assert dm.X_train.shape == (150, 2) and dm.Y_train.shape == (150,)
    assert dm.X_val.shape == (50, 2) and dm.Y_val.shape == (50,)
    assert dm.X_test.shape == (100, 2) and dm.Y_test.shape == (100,)
    assert dm.num_classes == 2
    for name in SPLITS:
        value = getattr(dm, name)
        assert value.dtype == (torch.float32 if name.startswith("X") else torch.int64), name
    labels = torch.cat([dm.Y_train, dm.Y_val])
    assert set(labels.tolist()) == {0, 1}
    assert torch.bincount(labels).tolist() == [100, 100]  # make_moons: exactly half each
    assert torch.bincount(dm.Y_test).tolist() == [50, 50]
    assert 0.35 < dm.Y_train.float().mean() < 0.65  # the shuffle mixes classes into both splits
    # raw (not standardized) moons: x in about [-1, 2], y in about [-0.5, 1]
    x = dm.X_train
    assert -1.6 < x[:, 0].min() < -0.6 and 1.6 < x[:, 0].max() < 2.6
    assert -1.0 < x[:, 1].min() < 0.0 and 0.6 < x[:, 1].max() < 1.5
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (64, 2) and batch["target"].shape == (64,)
    assert batch["target"].dtype == torch.int64


def test_two_moons_seeded_and_disjoint():
    a, b, c = TwoMoonsDatamodule(seed=3), TwoMoonsDatamodule(seed=3), TwoMoonsDatamodule(seed=4)
    for name in SPLITS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("X_train", "X_val", "X_test"):
        assert not torch.equal(getattr(a, name), getattr(c, name)), name
    assert _no_shared_rows(a.X_train, a.X_val)
    assert _no_shared_rows(a.X_train, a.X_test)
    assert _no_shared_rows(a.X_val, a.X_test)
    # the global RNGs are not used
    torch.manual_seed(1)
    np.random.seed(1)
    assert torch.equal(TwoMoonsDatamodule(seed=3).X_train, a.X_train)


def test_two_moons_noise_level():
    clean = TwoMoonsDatamodule(n_points=400, noise=0.0, val_fraction=0.0)
    x, y = clean.X_train, clean.Y_train
    # noise-free moons: class 0 on the unit circle around (0, 0), class 1 around (1, 0.5)
    r0 = x[y == 0].norm(dim=1)
    r1 = (x[y == 1] - torch.tensor([1.0, 0.5])).norm(dim=1)
    assert torch.allclose(r0, torch.ones_like(r0), atol=1e-5)
    assert torch.allclose(r1, torch.ones_like(r1), atol=1e-5)
    assert not clean.has_split("val")
    noisy = TwoMoonsDatamodule(n_points=2000, noise=0.1, val_fraction=0.0)
    x, y = noisy.X_train, noisy.Y_train
    spread = x[y == 0].norm(dim=1) - 1
    assert 0.07 < spread.std() < 0.13


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_points": 1}, "n_points"),
        ({"n_points": 10.5}, "n_points"),
        ({"noise": -0.1}, "noise"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"n_test": 0}, "n_test"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_two_moons_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        TwoMoonsDatamodule(**kwargs)


def test_grid_layout_and_extent():
    dm = TwoMoonsDatamodule(n_points=300, n_test=200)
    data = torch.cat([dm.X_train, dm.X_val, dm.X_test])
    low, high = data.min(0).values, data.max(0).values
    span = high - low
    x_min, x_max, y_min, y_max = dm.grid_extent(margin=0.5)
    assert x_min == pytest.approx(float(low[0] - 0.5 * span[0]), abs=1e-5)
    assert x_max == pytest.approx(float(high[0] + 0.5 * span[0]), abs=1e-5)
    assert y_min == pytest.approx(float(low[1] - 0.5 * span[1]), abs=1e-5)
    assert y_max == pytest.approx(float(high[1] + 0.5 * span[1]), abs=1e-5)
    grid = dm.grid(resolution=50, margin=0.5)
    assert grid.shape == (2500, 2) and grid.dtype == torch.float32
    image = grid.reshape(50, 50, 2)
    assert torch.allclose(image[..., 0], image[0, :, 0].expand(50, 50))  # x runs along columns
    assert torch.allclose(image[..., 1], image[:, 0, 1].unsqueeze(1).expand(50, 50))
    assert (image[0, 1:, 0] > image[0, :-1, 0]).all() and (image[1:, 0, 1] > image[:-1, 0, 1]).all()
    assert grid[0].tolist() == pytest.approx([x_min, y_min], abs=1e-5)
    assert grid[-1].tolist() == pytest.approx([x_max, y_max], abs=1e-5)
    # far-away points exist: the grid corner is more than a data span away from every point
    assert torch.cdist(grid[:1], data).min() > 0.5 * span.min()
    # margin 0 gives the data's bounding box
    assert dm.grid_extent(0.0) == pytest.approx(
        (float(low[0]), float(high[0]), float(low[1]), float(high[1])), abs=1e-6
    )
    with pytest.raises(ValueError, match="`resolution`"):
        dm.grid(resolution=1)
    with pytest.raises(ValueError, match="`margin`"):
        dm.grid(margin=-1.0)


# --------------------------------------------------------------------------- spiral
def test_spiral_shapes_and_balance():
    dm = SpiralDatamodule(n_points=300, val_fraction=0.2, n_test=150)
    assert dm.X_train.shape == (240, 2) and dm.X_val.shape == (60, 2)
    assert dm.X_test.shape == (150, 2) and dm.Y_test.shape == (150,)
    assert dm.num_classes == 3
    assert dm.X_train.dtype == torch.float32 and dm.Y_train.dtype == torch.int64
    assert torch.bincount(torch.cat([dm.Y_train, dm.Y_val])).tolist() == [100, 100, 100]
    assert torch.bincount(dm.Y_test).tolist() == [50, 50, 50]
    for x in (dm.X_train, dm.X_val, dm.X_test):
        assert x.norm(dim=1).max() <= 0.5 + 1e-6  # radius at most 0.5, as in the lecture
    assert _no_shared_rows(dm.X_train[dm.X_train.norm(dim=1) > 0], dm.X_val)
    four = SpiralDatamodule(n_points=402, n_classes=4, val_fraction=0.0)
    assert four.num_classes == 4
    assert torch.bincount(four.Y_train).tolist() == [101, 101, 100, 100]
    grid = dm.grid(resolution=20, margin=1.0)
    assert grid.shape == (400, 2)
    assert grid.abs().max() > 1.4  # the data are in [-0.5, 0.5]^2; the grid reaches past 1.4


def test_spiral_formula_without_noise():
    x, y = make_spiral(300, n_classes=3, noise=0.0)
    r = x.norm(dim=1)
    theta = 4.0 * y + 4.0 * r / 0.5  # radius and angle grow together along each arm
    expected = torch.stack([r * torch.sin(theta), r * torch.cos(theta)], dim=1)
    assert torch.allclose(x, expected, atol=1e-5)
    # arm j sweeps angles [4j, 4j + 4]; radii are evenly spaced on [0, 0.5]
    radii = torch.sort(r[y == 1]).values
    assert torch.allclose(radii, torch.linspace(0, 0.5, 100), atol=1e-5)


def test_spiral_seeded_and_noise():
    a, b, c = SpiralDatamodule(seed=1), SpiralDatamodule(seed=1), SpiralDatamodule(seed=2)
    for name in SPLITS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.X_train, c.X_train)
    x, y = make_spiral(3000, noise=0.2, generator=torch.Generator().manual_seed(0))
    r = x.norm(dim=1)
    angle = torch.atan2(x[:, 0], x[:, 1])
    clean = 4.0 * y + 8.0 * r
    residual = torch.remainder(angle - clean + math.pi, 2 * math.pi) - math.pi
    keep = r > 0.05  # the angle is ill-defined at the centre
    assert 0.17 < residual[keep].std() < 0.23
    with pytest.raises(ValueError, match="`n_classes`"):
        SpiralDatamodule(n_classes=1)
    with pytest.raises(ValueError, match="`noise`"):
        SpiralDatamodule(noise=float("nan"))
    with pytest.raises(ValueError, match="`val_fraction`"):
        SpiralDatamodule(n_points=2, val_fraction=0.9)


# --------------------------------------------------------------------------- digits
def test_digits_shapes_and_ranges(digits):
    dm = digits
    assert dm.num_classes == 10
    n = len(dm.X_train) + len(dm.X_val) + len(dm.X_test)
    assert n == 1797
    assert len(dm.X_test) == 360 and len(dm.X_val) == 180 and len(dm.X_train) == 1257
    for x, y in ((dm.X_train, dm.Y_train), (dm.X_val, dm.Y_val), (dm.X_test, dm.Y_test)):
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.ndim == 1
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert set(y.tolist()) == set(range(10))
    assert dm.X_train.max() == 1.0  # 16/16
    assert dm.ood_angles == [float(a) for a in range(0, 181, 15)]


def test_digits_splits_partition_and_stratified(digits):
    from sklearn.datasets import load_digits

    full = load_digits()
    dm = digits
    x = torch.cat([dm.X_train, dm.X_val, dm.X_test]).flatten(1).numpy() * 16
    y = torch.cat([dm.Y_train, dm.Y_val, dm.Y_test]).numpy()
    ours = np.column_stack([x, y])
    reference = np.column_stack([full.data, full.target])
    sort = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_allclose(sort(ours), sort(reference), atol=1e-4)  # a partition
    overall = np.bincount(full.target, minlength=10) / len(full.target)
    for split, size in (("test", 360), ("val", 180)):
        counts = np.bincount(dm.split(split)[1].numpy(), minlength=10)
        assert np.all(np.abs(counts - overall * size) <= 1.0), split


def test_digits_seeded_and_flatten(digits):
    same = DigitsDatamodule(seed=0, flatten=True)
    assert same.X_train.shape == (1257, 64)
    assert torch.equal(same.X_train, digits.X_train.flatten(1))
    assert torch.equal(same.Y_test, digits.Y_test)
    other = DigitsDatamodule(seed=1, val_fraction=0.0, test_fraction=0.25)
    assert not other.has_split("val") and len(other.X_test) == 450
    assert not torch.equal(other.Y_test[:50], digits.Y_test[:50])
    batch = next(iter(DigitsDatamodule(batch_size=32).train_dataloader()))
    assert batch["input"].shape == (32, 1, 8, 8) and batch["target"].dtype == torch.int64
    for kwargs, name in (
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"val_fraction": 1.2}, "val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
        ({"batch_size": -1}, "batch_size"),
    ):
        with pytest.raises(ValueError, match=f"`{name}`"):
            DigitsDatamodule(**kwargs)


# --------------------------------------------------------------------------- rotation
def _asymmetric_image() -> torch.Tensor:
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 1:7, 2] = 1.0  # an "L": vertical bar ...
    image[0, 0, 6, 2:6] = 0.6  # ... and a foot
    image[0, 0, 2, 5] = 0.3
    return image


def test_rotation_matches_rot90():
    image = _asymmetric_image()
    for k in (1, 2, 3):
        rotated = rotate_images(image, 90.0 * k)
        expected = torch.rot90(image, k, dims=(-2, -1))
        assert torch.allclose(rotated[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-4)
        assert torch.allclose(rotated, expected, atol=1e-4)  # pixel centres map onto centres
    # counter-clockwise: the top of the vertical bar ends up on the left
    assert rotate_images(image, 90.0)[0, 0, 5, 1] == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(rotate_images(image, 360.0), image, atol=1e-5)
    assert torch.allclose(rotate_images(image, -90.0), rotate_images(image, 270.0), atol=1e-5)
    three_d = rotate_images(image[:, 0], 90.0)
    assert three_d.shape == (1, 8, 8) and torch.allclose(three_d, rotate_images(image, 90)[:, 0])
    # 45 degrees interpolates: values stay in [0, 1] and the mass is roughly kept
    half = rotate_images(image, 45.0)
    assert half.min() >= 0.0 and half.max() <= 1.0
    assert half.sum() == pytest.approx(image.sum().item(), rel=0.2)
    with pytest.raises(ValueError, match="`images`"):
        rotate_images(torch.zeros(8, 8), 10.0)
    with pytest.raises(TypeError, match="`images`"):
        rotate_images(torch.zeros(1, 8, 8, dtype=torch.int64), 10.0)


def test_rotated_test(digits):
    x0, y0 = digits.rotated_test(0.0)
    assert torch.allclose(x0, digits.X_test, atol=1e-6)
    assert torch.equal(y0, digits.Y_test)
    x90, _ = digits.rotated_test(90)
    assert torch.allclose(x90, torch.rot90(digits.X_test, 1, dims=(-2, -1)), atol=1e-4)
    x360, _ = digits.rotated_test(360.0)
    assert torch.allclose(x360, x0, atol=1e-5)
    x45, _ = digits.rotated_test(45.0)
    assert x45.shape == digits.X_test.shape and (x45 - x0).abs().mean() > 0.05
    flat = DigitsDatamodule(flatten=True)
    xf, _ = flat.rotated_test(30.0)
    assert xf.shape == (360, 64)
    assert torch.allclose(xf, digits.rotated_test(30.0)[0].flatten(1), atol=1e-6)
    batches = list(digits.rotated_test_dataloader(60.0))
    assert sum(len(b["input"]) for b in batches) == 360
