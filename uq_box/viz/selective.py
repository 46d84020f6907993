"""Risk-coverage plots for selective prediction: abstain where the uncertainty is highest.

The curves are computed here with numpy, as
:func:`uq_box.metrics.functional_selective.risk_coverage_curve` defines them (one point per
distinct score, tied points answered together), so that the viz package does not import the
metrics; the areas in the legend are those of :func:`~uq_box.metrics.functional_selective.aurc`
and :func:`~uq_box.metrics.functional_selective.augrc` (the tests check that they agree).
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from uq_box.viz._utils import to_flat_1d

__all__ = ["plot_risk_coverage"]

Array = torch.Tensor | ArrayLike


def _finite(name: str, values: Array, length: int | None = None) -> np.ndarray:
    array = np.asarray(to_flat_1d(name, values), dtype=np.float64)
    if length is not None and len(array) != length:
        raise ValueError(f"`{name}` has {len(array)} values, expected {length} (one per point)")
    if len(array) == 0:
        raise ValueError(f"`{name}` is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains non-finite values (NaN or inf)")
    return array


def _curve(uncertainty: np.ndarray, loss: np.ndarray) -> dict[str, np.ndarray | float]:
    """Coverage, selective and generalized risk per distinct score; AURC and AUGRC."""
    order = np.argsort(uncertainty, kind="stable")
    u, ell = uncertainty[order], loss[order]
    n = len(u)
    last = np.append(u[1:] != u[:-1], True)
    count = np.arange(1, n + 1, dtype=np.float64)[last]
    total = np.cumsum(ell)[last]
    # AURC: mean over k of the expected risk of the k first points, ties in a random order
    group = np.cumsum(last) - last
    count_before, total_before = np.append(0.0, count[:-1]), np.append(0.0, total[:-1])
    mean = (total - total_before) / (count - count_before)
    k = np.arange(1, n + 1)
    aurc = np.mean((total_before[group] + (k - count_before[group]) * mean[group]) / k)
    coverage = np.append(0.0, count / n)
    generalized = np.append(0.0, total / n)
    augrc = float(np.sum(np.diff(coverage) * (generalized[1:] + generalized[:-1]) / 2))
    return {
        "coverage": count / n,
        "selective": total / count,
        "generalized": total / n,
        "aurc": float(aurc),
        "augrc": augrc,
    }


def plot_risk_coverage(
    uncertainty: Array | Mapping[str, Array],
    loss: Array,
    generalized: bool = True,
    title: str | None = None,
) -> Figure:
    """Risk against coverage when the most uncertain points are rejected first.

    Each score's curve answers the points with uncertainty at most a threshold, for every
    threshold: the left panel shows the selective risk (mean loss of the answered points), with
    the AURC in the legend; the right panel (``generalized=True``) the generalized risk (loss of
    the answered points over all points: answered **and** wrong, for the 0/1 error; Traub et al.
    2024), with the AUGRC. Dashed: the oracle ranking by the loss itself; dotted: a score
    without information (the risk at full coverage).

    Args:
        uncertainty: ``[N]`` scores, higher means reject first (``pred_uct``, ``1 - max p``,
            ...), or ``{name: [N] scores}`` to compare several on the same points.
        loss: ``[N]`` per-point loss, e.g. the 0/1 error ``pred.argmax(-1) != target``.
        generalized: add the generalized-risk panel.
        title: figure title.

    Returns:
        Figure with one axes, or two with ``generalized``.
    """
    ell = _finite("loss", loss)
    scores = dict(uncertainty) if isinstance(uncertainty, Mapping) else {"uncertainty": uncertainty}
    if not scores:
        raise ValueError("`uncertainty` is empty; expected [N] scores or {name: [N] scores}")
    named = isinstance(uncertainty, Mapping)
    curves = {
        name: _curve(
            _finite(f"uncertainty[{name!r}]" if named else "uncertainty", u, len(ell)), ell
        )
        for name, u in scores.items()
    }
    oracle = _curve(ell, ell)

    fig, axes = plt.subplots(
        1, 2 if generalized else 1, figsize=(11 if generalized else 5.5, 4.2), squeeze=False,
        constrained_layout=True,
    )  # fmt: skip
    ax_risk = axes[0, 0]
    for i, (name, curve) in enumerate(curves.items()):
        ax_risk.plot(
            curve["coverage"], curve["selective"], color=f"C{i % 10}", drawstyle="steps-pre",
            label=f"{name} (AURC {curve['aurc']:.4f})",
        )  # fmt: skip
    ax_risk.plot(
        oracle["coverage"], oracle["selective"], color="black", ls="--", lw=1,
        label=f"oracle (AURC {oracle['aurc']:.4f})",
    )  # fmt: skip
    ax_risk.axhline(ell.mean(), color="gray", ls=":", lw=1, label="no information")
    ax_risk.set_xlabel("coverage (share of points answered)")
    ax_risk.set_ylabel("selective risk (mean loss when answered)")
    ax_risk.set_title("Risk-coverage")
    ax_risk.set_xlim(0, 1)
    ax_risk.legend(loc="upper left", fontsize="small")
    ax_risk.grid(alpha=0.3)
    if generalized:
        ax_gen = axes[0, 1]
        for i, (name, curve) in enumerate(curves.items()):
            ax_gen.plot(
                np.append(0.0, curve["coverage"]), np.append(0.0, curve["generalized"]),
                color=f"C{i % 10}", label=f"{name} (AUGRC {curve['augrc']:.4f})",
            )  # fmt: skip
        ax_gen.plot(
            np.append(0.0, oracle["coverage"]), np.append(0.0, oracle["generalized"]),
            color="black", ls="--", lw=1, label=f"oracle (AUGRC {oracle['augrc']:.4f})",
        )  # fmt: skip
        ax_gen.plot([0, 1], [0, ell.mean()], color="gray", ls=":", lw=1, label="no information")
        ax_gen.set_xlabel("coverage (share of points answered)")
        ax_gen.set_ylabel("generalized risk (loss of answered / all)")
        ax_gen.set_title("Generalized risk-coverage")
        ax_gen.set_xlim(0, 1)
        ax_gen.legend(loc="upper left", fontsize="small")
        ax_gen.grid(alpha=0.3)
    if title is not None:
        fig.suptitle(title)
    return fig
