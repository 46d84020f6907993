import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from uq_box.viz import (  # noqa: E402
    plot_calibration,
    plot_predictions_regression,
    plot_toy_regression_data,
    plot_training_metrics,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def toy():
    gen = torch.Generator().manual_seed(0)
    x_train = torch.rand(60, 1, generator=gen) * 6 - 3
    y_train = torch.sin(x_train) + 0.1 * torch.randn(60, 1, generator=gen)
    x_test = torch.linspace(4, -4, 80).unsqueeze(1)  # unsorted on purpose
    y_test = torch.sin(x_test)
    epistemic = 0.05 + 0.1 * x_test.abs()
    aleatoric = torch.full_like(x_test, 0.1)
    total = (epistemic**2 + aleatoric**2).sqrt()
    return x_train, y_train, x_test, y_test, torch.sin(x_test), total, epistemic, aleatoric


def test_plot_toy_regression_data(toy):
    fig = plot_toy_regression_data(*toy[:4])
    assert isinstance(fig, Figure) and len(fig.axes) == 1


def test_plot_predictions_regression(toy):
    x_train, y_train, x_test, y_test, pred, total, epistemic, aleatoric = toy
    fig = plot_predictions_regression(x_train, y_train, x_test, y_test, pred, total)
    assert isinstance(fig, Figure) and len(fig.axes) == 1

    fig = plot_predictions_regression(
        x_train.numpy(), y_train, x_test, y_test, pred, total, epistemic, aleatoric, title="t"
    )
    assert len(fig.axes) == 2
    assert len(fig.axes[0].collections) == 1 + 3  # training scatter + three bands
    plotted_x = fig.axes[1].lines[0].get_xdata()
    assert np.all(np.diff(plotted_x) >= 0)

    fig = plot_predictions_regression(
        x_train, y_train, x_test, y_test, pred, total, epistemic=epistemic, show_bands=False
    )
    assert len(fig.axes) == 2 and len(fig.axes[0].collections) == 2

    with pytest.raises(ValueError, match="`pred_uct` has 79 values"):
        plot_predictions_regression(x_train, y_train, x_test, y_test, pred, total[1:])


def test_plot_calibration(toy):
    _, _, x_test, y_test, pred, total, _, _ = toy
    y = y_test + total * torch.randn(y_test.shape, generator=torch.Generator().manual_seed(1))
    fig = plot_calibration(pred, total, y)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert "MACE" in fig.axes[0].get_title()
    fig = plot_calibration(pred, total, y, x=x_test)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="`pred_uct` must be strictly positive"):
        plot_calibration(pred, torch.zeros_like(total), y)


CSV = """epoch,step,train_loss,val_loss,val_nll
0,9,1.5,,
0,9,,1.7,2.0
1,19,1.1,,
1,19,,1.2,1.5
2,29,0.9,,
2,29,,1.0,1.3
"""


def test_plot_training_metrics(tmp_path):
    old = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    new = tmp_path / "lightning_logs" / "version_1" / "metrics.csv"
    for path in (old, new):
        path.parent.mkdir(parents=True)
    old.write_text("epoch,step,other\n0,1,1.0\n")
    new.write_text(CSV)
    os.utime(old, (1_000, 1_000))

    fig = plot_training_metrics(tmp_path, ["train_loss", "val_nll"])
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    loss_ax, nll_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train_loss", "val_loss"]
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [0, 1, 2])
    np.testing.assert_array_equal(loss_ax.lines[1].get_ydata(), [1.7, 1.2, 1.0])
    assert len(nll_ax.lines) == 1

    with pytest.raises(ValueError, match=r"'val_acc'.*available columns.*train_loss"):
        plot_training_metrics(tmp_path, ["val_acc"])


def test_plot_training_metrics_uses_step_without_epoch(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,train_loss\n0,2.0\n5,1.0\n")
    fig = plot_training_metrics(tmp_path, ["train_loss"])
    assert fig.axes[0].get_xlabel() == "step"


def test_plot_training_metrics_without_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        plot_training_metrics(tmp_path, ["train_loss"])
