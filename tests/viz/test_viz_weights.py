"""Weight-distribution histograms per method."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from uq_box.nn import BayesianLinear, to_bayesian  # noqa: E402
from uq_box.viz.weights import model_weights, plot_weight_histograms  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _mlp():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture
def models():
    torch.manual_seed(0)
    bayes_all = to_bayesian(_mlp(), None, posterior_rho_init=-3.0)
    bayes_last = to_bayesian(_mlp(), [-1], posterior_rho_init=-3.0)
    return {"MAP": _mlp(), "BBB": bayes_all, "BBB last layer": bayes_last}


def test_one_axes_with_a_line_per_model(models):
    fig = plot_weight_histograms(models)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(models)
    assert len(ax.patches) == len(models)  # one step histogram per model


def test_snr_axes_only_for_bayesian_models(models):
    fig = plot_weight_histograms(models, snr=True, num_samples=5, bins=30, log_density=True)
    assert len(fig.axes) == 2
    weights_ax, snr_ax = fig.axes
    assert "dB" in snr_ax.get_xlabel()
    labels = [t.get_text() for t in snr_ax.get_legend().get_texts()]
    assert labels == ["BBB", "BBB last layer"]  # the plain net has no SNR
    assert weights_ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="snr"):
        plot_weight_histograms({"MAP": _mlp()}, snr=True)


def test_model_weights_means_samples_and_plain_parameters():
    torch.manual_seed(1)
    layer = BayesianLinear(3, 2, posterior_rho_init=-2.0)
    means = model_weights(layer)
    torch.testing.assert_close(
        means, torch.cat([layer.weight_mu.flatten(), layer.bias_mu]).detach()
    )
    assert model_weights(layer, include_bias=False).numel() == 6
    draws = model_weights(layer, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert draws.numel() == 4 * 6 + 4 * 2 and not torch.equal(draws[:6], means[:6])
    plain = nn.Linear(3, 2)
    assert (
        model_weights(plain).numel() == 8 and model_weights(plain, include_bias=False).numel() == 6
    )
    with pytest.raises(ValueError, match="no weights"):
        model_weights(nn.ReLU())


def test_bad_arguments():
    with pytest.raises(TypeError, match="models"):
        plot_weight_histograms([_mlp()])
    with pytest.raises(ValueError, match="models"):
        plot_weight_histograms({})
    with pytest.raises(TypeError, match="models\\['x'\\]"):
        plot_weight_histograms({"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="num_samples"):
        plot_weight_histograms({"x": _mlp()}, num_samples=-1)
