import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from uq_box.viz.mcmc import plot_traces  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def chains():
    return torch.randn(3, 50, 8, generator=torch.Generator().manual_seed(0))


def test_plot_traces_two_axes_per_parameter_up_to_max_params(chains):
    fig = plot_traces(chains, max_params=6)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 12
    trace_ax = fig.axes[0]
    assert len(trace_ax.lines) == 3  # one line per chain
    assert trace_ax.get_ylabel() == "param 0"
    assert trace_ax.get_legend() is not None

    fig = plot_traces(chains.numpy()[:, :, :2], names=["a", "b"], max_params=6)
    assert len(fig.axes) == 4
    assert [fig.axes[i].get_ylabel() for i in (0, 2)] == ["a", "b"]


def test_plot_traces_picks_parameters(chains):
    names = [f"w{k}" for k in range(8)]
    fig = plot_traces(chains, names=names, params=[7, 2, 5], max_params=2)
    assert len(fig.axes) == 4
    assert [fig.axes[i].get_ylabel() for i in (0, 2)] == ["w7", "w2"]


def test_plot_traces_single_chain_has_no_legend():
    fig = plot_traces(np.zeros((1, 10, 1)) + np.arange(10)[None, :, None])
    assert len(fig.axes) == 2
    assert fig.axes[0].get_legend() is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples": torch.zeros(10, 3)}, r"\[chains, draws, P\]"),
        ({"names": ["a"]}, "`names` has 1 entries, expected 8"),
        ({"params": [8]}, r"`params` \[8\] out of range"),
        ({"max_params": 0}, "`max_params` must be a positive integer"),
    ],
)
def test_plot_traces_errors_name_the_argument(chains, kwargs, match):
    kwargs = {"samples": chains, **kwargs}
    with pytest.raises(ValueError, match=match):
        plot_traces(**kwargs)
