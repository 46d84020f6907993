"""Classification and comparison plots: figures with the right axes, ECE as numpy computes it."""

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from uq_box.datamodules.classification import SpiralDatamodule  # noqa: E402
from uq_box.viz.classification import (  # noqa: E402
    _reliability_bins,
    plot_decision_surface,
    plot_reliability_diagram,
    plot_rotated_examples,
    plot_uncertainty_vs_rotation,
)
from uq_box.viz.comparison import plot_predictions_comparison  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


# --------------------------------------------------------------------------- decision surface
def test_decision_surface_on_grid():
    dm = SpiralDatamodule(n_points=150, n_test=30)
    grid = dm.grid(resolution=40, margin=0.5)
    logits = torch.stack([grid[:, 0], grid[:, 1], -grid.sum(1)], dim=1) * 5
    probs = logits.softmax(-1)
    fig = plot_decision_surface(
        dm.X_train, dm.Y_train, grid, probs, _entropy(probs), dm.grid_extent(0.5), title="t"
    )
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3  # two panels and the colorbar
    ax_class, ax_uct, cbar = fig.axes
    assert len(ax_class.images) == 1 and len(ax_uct.images) == 1
    assert ax_class.images[0].get_array().shape == (40, 40, 3)
    np.testing.assert_allclose(
        ax_uct.images[0].get_array(), _entropy(probs).reshape(40, 40).numpy(), rtol=1e-6
    )
    assert cbar.get_ylabel() == "predictive entropy"
    assert ax_class.get_xlim() == pytest.approx(dm.grid_extent(0.5)[:2])
    # 3 classes of training points on each panel
    assert len(ax_class.collections) == 3 and len(ax_uct.collections) == 3
    assert fig._suptitle.get_text() == "t"
    # a probability at chance level is drawn white, a confident one in the class colour
    rgb = ax_class.images[0].get_array().reshape(-1, 3)
    uniform = torch.full((1600, 3), 1 / 3)
    flat = plot_decision_surface(dm.X_train, dm.Y_train, grid, uniform, _entropy(uniform))
    np.testing.assert_allclose(flat.axes[0].images[0].get_array(), 1.0)
    assert rgb.min() < 0.5


def test_decision_surface_labels_and_scattered_points():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=gen)
    y = (x[:, 0] > 0).long()
    points = torch.rand(200, 2, generator=gen) * 6 - 3  # not a regular grid
    pred = (points[:, 0] > 0).long()
    fig = plot_decision_surface(
        x, y, points.numpy(), pred, points.norm(dim=1), uncertainty_label="mutual information"
    )
    assert len(fig.axes) == 3
    assert fig.axes[2].get_ylabel() == "mutual information"
    with pytest.raises(ValueError, match="`X_train`"):
        plot_decision_surface(x[:, :1], y, points, pred, points[:, 0])
    with pytest.raises(ValueError, match="`uncertainty`"):
        plot_decision_surface(x, y, points, pred, points[:10, 0])
    with pytest.raises(ValueError, match="`probs_or_pred`"):
        plot_decision_surface(x, y, points, torch.randn(200, 2), points[:, 0])


# --------------------------------------------------------------------------- reliability
def _numpy_ece(probs: np.ndarray, target: np.ndarray, num_bins: int) -> float:
    confidence, prediction = probs.max(1), probs.argmax(1)
    ece = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        in_bin = (confidence >= lo) & ((confidence < hi) if b < num_bins - 1 else True)
        if in_bin.any():
            accuracy = (prediction[in_bin] == target[in_bin]).mean()
            ece += in_bin.mean() * abs(accuracy - confidence[in_bin].mean())
    return ece


def _ece_from_title(fig: Figure) -> float:
    return float(re.search(r"ECE = ([0-9.]+)", fig.axes[0].get_title()).group(1))


@pytest.mark.parametrize("num_bins", [5, 15])
def test_reliability_diagram_ece(num_bins):
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(500, 4, generator=gen)
    target = torch.randint(0, 4, (500,), generator=gen)
    target[:250] = logits[:250].argmax(1)  # half right, overconfident
    probs = logits.softmax(-1)
    probs[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # confidence exactly 1: the last bin
    probs[1] = torch.tensor([0.4, 0.2, 0.2, 0.2])  # on a bin edge for 5 bins
    expected = _numpy_ece(probs.double().numpy(), target.numpy(), num_bins)
    bins = _reliability_bins(probs.double().numpy(), target.numpy(), num_bins)
    assert bins["ece"] == pytest.approx(expected, abs=1e-12)
    assert bins["counts"].sum() == 500 and len(bins["counts"]) == num_bins
    assert 0.05 < expected < 0.5
    fig = plot_reliability_diagram(probs, target, num_bins=num_bins)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert _ece_from_title(fig) == pytest.approx(expected, abs=5e-5)
    # accuracy bars, gap bars, count bars: one per bin each
    assert len(fig.axes[0].patches) == 2 * num_bins and len(fig.axes[1].patches) == num_bins
    heights = [p.get_height() for p in fig.axes[1].patches]
    assert heights == bins["counts"].tolist()


def test_reliability_diagram_binary_and_errors():
    gen = torch.Generator().manual_seed(2)
    p1 = torch.rand(300, generator=gen)
    target = torch.bernoulli(p1, generator=gen).long()  # calibrated by construction
    fig = plot_reliability_diagram(p1, target, num_bins=10)
    two = torch.stack([1 - p1, p1], 1).double().numpy()
    assert _ece_from_title(fig) == pytest.approx(_numpy_ece(two, target.numpy(), 10), abs=5e-5)
    assert _ece_from_title(fig) < 0.1
    with pytest.raises(ValueError, match="`probs`"):
        plot_reliability_diagram(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="`target`"):
        plot_reliability_diagram(torch.full((10, 2), 0.5), torch.full((10,), 2))
    with pytest.raises(ValueError, match="`num_bins`"):
        plot_reliability_diagram(torch.full((10, 2), 0.5), torch.zeros(10), num_bins=0)


# --------------------------------------------------------------------------- rotation
def test_uncertainty_vs_rotation_flat_and_nested():
    angles = list(range(0, 181, 15))
    flat = {
        "MAP": torch.linspace(0.1, 1.0, 13),
        "MC dropout": [0.2 + 0.1 * i for i in range(13)],
        "per-input": torch.arange(13.0).unsqueeze(1) * torch.tensor([[1.0, 3.0]]),
    }
    fig = plot_uncertainty_vs_rotation(angles, flat)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == list(flat)
    np.testing.assert_allclose(lines[2].get_ydata(), 2.0 * np.arange(13))  # mean over inputs
    assert fig.axes[0].get_ylabel() == "mean predictive entropy"
    nested = {
        m: {"pred_uct": torch.rand(13), "aleatoric_uct": torch.rand(13), "epistemic_uct": v}
        for m, v in (("BNN", torch.rand(13)), ("Ensemble", torch.rand(13)))
    }
    nested["MAP"] = {"pred_uct": torch.rand(13)}
    fig = plot_uncertainty_vs_rotation(torch.tensor(angles), nested, ylabel="nats")
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["pred_uct", "aleatoric_uct", "epistemic_uct"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [3, 2, 2]
    with pytest.raises(ValueError, match="MAP"):
        plot_uncertainty_vs_rotation(angles, {"MAP": torch.rand(5)})
    with pytest.raises(ValueError, match="`values`"):
        plot_uncertainty_vs_rotation(angles, {})


def test_rotated_examples():
    from uq_box.datamodules.classification import rotate_images

    images = torch.rand(5, 1, 8, 8)
    angles = [0, 45, 90]
    stack = torch.stack([rotate_images(images, a) for a in angles])  # [A, K, 1, 8, 8]
    fig = plot_rotated_examples(stack, angles, labels=torch.arange(5), max_examples=4)
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 4
    assert fig.axes[4].get_ylabel() == "45°"
    fig = plot_rotated_examples([s.flatten(1) for s in stack], angles)
    assert len(fig.axes) == 15


# --------------------------------------------------------------------------- comparison
def test_predictions_comparison():
    gen = torch.Generator().manual_seed(0)
    x_train = torch.rand(40, 1, generator=gen) * 6 - 3
    y_train = torch.sin(x_train)
    x_test = torch.linspace(3, -3, 50).unsqueeze(1)  # unsorted on purpose
    y_test = torch.sin(x_test)
    full = {
        "pred": torch.sin(x_test),
        "pred_uct": torch.full((50, 1), 0.3),
        "epistemic_uct": torch.full((50,), 0.1),
        "aleatoric_uct": torch.full((50,), 0.28),
    }
    predictions = {
        "BNN": full,
        "MC dropout": full,
        "Deep ensemble": {"pred": full["pred"], "pred_uct": full["pred_uct"]},
        "SWAG": {k: v.numpy() for k, v in full.items()},
    }
    fig = plot_predictions_comparison(x_train, y_train, x_test, y_test, predictions, ncols=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == list(predictions)
    a0 = fig.axes[0]
    for ax in fig.axes[1:]:
        assert a0.get_shared_x_axes().joined(a0, ax) and a0.get_shared_y_axes().joined(a0, ax)
    assert len(fig.axes[0].collections) == 3  # data, total band, epistemic band
    assert len(fig.axes[2].collections) == 2  # no epistemic band
    mean_line = fig.axes[0].get_lines()[-1]
    assert np.all(np.diff(mean_line.get_xdata()) > 0)  # sorted by x
    one = plot_predictions_comparison(x_train, y_train, x_test, y_test, {"BNN": full})
    assert len(one.axes) == 1
    with pytest.raises(ValueError, match="pred_uct"):
        plot_predictions_comparison(
            x_train, y_train, x_test, y_test, {"BNN": {"pred": full["pred"]}}
        )
    with pytest.raises(ValueError, match="expected 50"):
        bad = {"pred": full["pred"][:10], "pred_uct": full["pred_uct"]}
        plot_predictions_comparison(x_train, y_train, x_test, y_test, {"BNN": bad})
