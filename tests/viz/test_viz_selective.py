"""The risk-coverage plot: its curves and legend areas equal the selective metrics."""

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from uq_box.metrics import functional_selective as fsel  # noqa: E402
from uq_box.viz.selective import plot_risk_coverage  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _data(n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    difficulty = torch.rand(n, generator=gen)
    loss = torch.rand(n, generator=gen) < difficulty
    return {
        "informative": (difficulty * 20).round(),  # ties
        "noise": torch.rand(n, generator=gen),
    }, loss


def _areas(label):
    return float(re.search(r"(AURC|AUGRC) ([0-9.]+)", label).group(2))


def test_curves_and_areas_match_the_metrics():
    scores, loss = _data()
    fig = plot_risk_coverage(scores, loss, title="digits")
    assert isinstance(fig, Figure)
    ax_risk, ax_gen = fig.axes
    assert fig._suptitle.get_text() == "digits"
    for i, (name, u) in enumerate(scores.items()):
        coverage, selective, generalized, _ = fsel.risk_coverage_curve(u, loss)
        line = ax_risk.lines[i]
        np.testing.assert_allclose(line.get_xdata(), coverage.numpy())
        np.testing.assert_allclose(line.get_ydata(), selective.numpy())
        assert line.get_label().startswith(name)
        assert _areas(line.get_label()) == pytest.approx(fsel.aurc(u, loss).item(), abs=5e-5)
        gen_line = ax_gen.lines[i]
        np.testing.assert_allclose(gen_line.get_ydata()[1:], generalized.numpy())
        assert _areas(gen_line.get_label()) == pytest.approx(fsel.augrc(u, loss).item(), abs=5e-5)
    # the oracle: AURC minus E-AURC, AUGRC r^2 / 2
    u = scores["informative"]
    oracle_aurc = (fsel.aurc(u, loss) - fsel.eaurc(u, loss)).item()
    assert _areas(ax_risk.lines[2].get_label()) == pytest.approx(oracle_aurc, abs=5e-5)
    rate = loss.double().mean().item()
    assert _areas(ax_gen.lines[2].get_label()) == pytest.approx(rate**2 / 2, abs=5e-5)
    # informative scores lie below the noise
    assert _areas(ax_risk.lines[0].get_label()) < _areas(ax_risk.lines[1].get_label())


def test_one_score_one_panel():
    scores, loss = _data()
    fig = plot_risk_coverage(scores["noise"].numpy(), loss.numpy(), generalized=False)
    assert len(fig.axes) == 1
    assert fig.axes[0].lines[0].get_label().startswith("uncertainty (AURC")


def test_errors_name_the_argument():
    scores, loss = _data(n=10)
    with pytest.raises(ValueError, match=r"`uncertainty\['noise'\]` has 9 values, expected 10"):
        plot_risk_coverage({"noise": scores["noise"][:9]}, loss)
    with pytest.raises(ValueError, match="`loss` contains non-finite"):
        plot_risk_coverage(scores["noise"], torch.full((10,), float("nan")))
    with pytest.raises(ValueError, match="`uncertainty` is empty"):
        plot_risk_coverage({}, loss)
    with pytest.raises(ValueError, match=r"`uncertainty` must have shape \[N\]"):
        plot_risk_coverage(torch.rand(10, 3), loss)
