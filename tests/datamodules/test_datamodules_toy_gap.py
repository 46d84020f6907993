"""The gap data of the Pyro BNN tutorial: two intervals of data, nothing in between."""

import pytest
import torch

from uq_box.datamodules import ArrayDataModule
from uq_box.datamodules.toy import ToyGapDatamodule, toy_gap_function


def test_shapes_and_the_gap():
    dm = ToyGapDatamodule()
    assert dm.X_train.shape == dm.Y_train.shape == (1000, 1)  # 500 per interval, as the tutorial
    assert not dm.has_split("val")
    assert dm.X_test.shape == dm.Y_test.shape == (1000, 1)
    assert dm.X_gtext.shape == dm.Y_gtext.shape == (1000, 1)
    assert dm.X_gap.shape == dm.Y_gap.shape == (100, 1)
    assert dm.X_train.dtype == dm.Y_train.dtype == torch.float32
    assert dm.gap_bounds == pytest.approx((0.2, 0.6))
    low, high = dm.gap_bounds
    x = dm.X_train[:, 0]
    assert not dm.in_gap(dm.X_train).any()
    assert not ((x > low) & (x < high)).any()
    assert ((x >= -0.2) & (x <= 0.2)).sum() == 500 and ((x >= 0.6) & (x <= 1.0)).sum() == 500
    # the test points and the grid run across the gap and beyond the data
    for grid in (dm.X_test, dm.X_gtext):
        assert grid.min().item() == pytest.approx(-0.5) and grid.max().item() == pytest.approx(1.5)
        assert dm.in_gap(grid).sum() > 100
    torch.testing.assert_close(dm.Y_gtext, toy_gap_function(dm.X_gtext))
    # the new observations fill the gap; targets are the curve plus small noise
    assert dm.X_gap.min() >= low - 1e-6 and dm.X_gap.max() <= high + 1e-6
    for inputs, targets in ((dm.X_train, dm.Y_train), (dm.X_gap, dm.Y_gap)):
        residual = targets - toy_gap_function(inputs)
        assert 0.01 < residual.std().item() < 0.1


def test_seeded():
    a, b, c = ToyGapDatamodule(seed=3), ToyGapDatamodule(seed=3), ToyGapDatamodule(seed=4)
    for name in ("X_train", "Y_train", "X_test", "Y_test", "X_gap", "Y_gap"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("Y_train", "Y_test", "Y_gap"):
        assert not torch.equal(getattr(a, name), getattr(c, name)), name
    assert torch.equal(a.X_train, c.X_train)  # evenly spaced inputs, as in the tutorial
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    ToyGapDatamodule(seed=3)
    assert torch.equal(torch.rand(1), before)  # the global RNG is not used
    # the gap observations are drawn last: their number leaves the other splits alone
    assert torch.equal(ToyGapDatamodule(seed=3, n_gap=7).Y_test, a.Y_test)


def test_options_validation_split_and_gap_datamodule():
    dm = ToyGapDatamodule(
        n_points=101, left=(-1.0, 0.0), right=(1.0, 2.0), val_fraction=0.2, n_test=50,
        x_min=-2.0, x_max=3.0, n_gt=20, n_gap=10, noise_std=0.0, batch_size=16,
    )  # fmt: skip
    assert dm.X_train.shape == (81, 1) and dm.X_val.shape == (20, 1)
    assert dm.gap_bounds == (0.0, 1.0)
    assert not dm.in_gap(torch.cat([dm.X_train, dm.X_val])).any()
    torch.testing.assert_close(dm.Y_train, toy_gap_function(dm.X_train))  # no noise
    both = torch.cat([dm.X_train, dm.X_val])[:, 0].sort().values
    assert torch.equal(both, torch.cat([torch.linspace(-1, 0, 50), torch.linspace(1, 2, 51)]))
    update = dm.gap_datamodule()
    assert isinstance(update, ArrayDataModule) and update.batch_size == 16
    assert torch.equal(update.X_train, dm.X_gap) and torch.equal(update.X_test, dm.X_test)
    batch = next(iter(update.train_dataloader()))
    assert batch["input"].shape == (10, 1)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_points": 1}, "n_points"),
        ({"left": (0.0, 0.7)}, "left"),
        ({"right": (0.1, 0.5)}, "right"),
        ({"x_min": 2.0}, "x_min"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"n_gap": 0}, "n_gap"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ToyGapDatamodule(**kwargs)
