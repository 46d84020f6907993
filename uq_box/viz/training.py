"""Plots of metrics logged during training by Lightning's ``CSVLogger``."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["plot_training_metrics"]


def _newest_metrics_csv(log_dir: Path) -> Path:
    """Return the most recently modified ``metrics.csv`` under ``log_dir`` (recursive)."""
    candidates = list(log_dir.rglob("metrics.csv"))
    if not candidates:
        raise FileNotFoundError(f"no metrics.csv found under {str(log_dir)!r}")
    return max(candidates, key=lambda path: path.stat().st_mtime)


def _val_twin(metric: str, columns: pd.Index) -> str | None:
    """Return the validation column matching a ``train_`` metric, if logged.

    ``train_loss`` pairs with ``val_loss``; ``train_loss_epoch`` with ``val_loss_epoch`` or, as
    Lightning names epoch-level validation logs, ``val_loss``.
    """
    if not metric.startswith("train_"):
        return None
    twin = "val_" + metric.removeprefix("train_")
    for candidate in (twin, twin.removesuffix("_epoch")):
        if candidate in columns:
            return candidate
    return None


def plot_training_metrics(log_dir: str | os.PathLike, metrics: list[str]) -> Figure:
    """Plot logged metrics from the newest Lightning ``CSVLogger`` file under ``log_dir``.

    Each metric gets its own axes, plotted against ``epoch`` (or ``step`` when the file has no
    epoch column) over the rows where it was logged; the ``val_`` twin of a ``train_`` metric is
    drawn on the same axes when it was logged too.

    Args:
        log_dir: folder searched recursively for ``metrics.csv``, e.g. the logger's ``save_dir``
            or one ``lightning_logs/version_k``.
        metrics: column names to plot.

    Returns:
        Figure with one axes per metric.

    Raises:
        FileNotFoundError: no ``metrics.csv`` under ``log_dir``.
        ValueError: ``metrics`` is empty or names a column the file does not have.
    """
    if not metrics:
        raise ValueError("`metrics` is empty; name at least one logged column")
    path = _newest_metrics_csv(Path(log_dir))
    frame = pd.read_csv(path)
    for metric in metrics:
        if metric not in frame.columns:
            raise ValueError(
                f"metric {metric!r} is not in {str(path)!r}; available columns: "
                f"{list(frame.columns)}"
            )
    x_col = "epoch" if "epoch" in frame.columns else "step"

    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False, constrained_layout=True
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        twin = _val_twin(metric, frame.columns)
        for column in (metric, twin) if twin else (metric,):
            rows = frame[[x_col, column]].dropna()
            ax.plot(rows[x_col], rows[column], marker="o", markersize=3, label=column)
        ax.set_xlabel(x_col)
        ax.set_title(metric)
        if twin:
            ax.legend(fontsize="small")
    return fig
