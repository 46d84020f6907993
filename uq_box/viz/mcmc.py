"""Trace plots of MCMC chains (e.g. :class:`uq_box.reference.NUTSReference` samples)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from uq_box.checks import positive_int

__all__ = ["plot_traces"]


def plot_traces(
    samples: torch.Tensor | ArrayLike,
    names: Sequence[str] | None = None,
    max_params: int = 6,
    params: Sequence[int] | None = None,
    bins: int = 30,
) -> Figure:
    """Trace and marginal histogram of each chain, one row per parameter.

    Well-mixed chains overlap in both panels: traces that wander apart or histograms that
    disagree show a chain stuck in its own region (a large ``r_hat``).

    Args:
        samples: ``[chains, draws, P]`` (e.g. ``NUTSReference.samples``).
        names: ``P`` parameter names for the row labels (``"param k"`` when ``None``).
        max_params: plot at most this many parameters (the first ones, or of ``params``).
        params: indices of the parameters to plot (default: ``0, 1, ...``).
        bins: histogram bins.

    Returns:
        Figure with two axes per plotted parameter: the trace (left) and the histogram (right).
    """
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    values = np.asarray(samples, dtype=float)
    if values.ndim != 3:
        raise ValueError(f"`samples` must have shape [chains, draws, P], got {list(values.shape)}")
    num_chains, num_draws, num_params = values.shape
    if num_draws < 1 or num_params < 1:
        raise ValueError(f"`samples` is empty: shape {list(values.shape)}")
    if names is not None and len(names) != num_params:
        raise ValueError(f"`names` has {len(names)} entries, expected {num_params}")
    chosen = _chosen_params(params, num_params, positive_int(max_params, "max_params"))

    fig, axes = plt.subplots(
        len(chosen),
        2,
        figsize=(10, 1.9 * len(chosen) + 0.6),
        gridspec_kw={"width_ratios": [3, 1]},
        squeeze=False,
        constrained_layout=True,
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    steps = np.arange(num_draws)
    for row, k in zip(axes, chosen, strict=True):
        label = names[k] if names is not None else f"param {k}"
        trace_ax, hist_ax = row
        edges = np.histogram_bin_edges(values[:, :, k], bins=bins)
        for c in range(num_chains):
            color = colors[c % len(colors)]
            trace_ax.plot(
                steps, values[c, :, k], lw=0.6, alpha=0.8, color=color, label=f"chain {c}"
            )
            hist_ax.hist(
                values[c, :, k], bins=edges, density=True, histtype="step", color=color, lw=1.0
            )
        trace_ax.set_ylabel(label)
        hist_ax.set_yticks([])
    axes[0, 0].set_title("Trace")
    axes[0, 1].set_title("Marginal")
    axes[-1, 0].set_xlabel("draw")
    if num_chains > 1:
        axes[0, 0].legend(loc="upper right", fontsize="small", ncol=min(num_chains, 4))
    return fig


def _chosen_params(params: Sequence[int] | None, num_params: int, max_params: int) -> list[int]:
    """The first ``max_params`` of ``params`` (default ``0, 1, ...``), checked to be in range."""
    chosen = list(range(num_params)) if params is None else [int(k) for k in params]
    bad = [k for k in chosen if not 0 <= k < num_params]
    if bad:
        raise ValueError(f"`params` {bad} out of range for {num_params} parameters")
    if not chosen:
        raise ValueError("`params` is empty; nothing to plot")
    return chosen[:max_params]
