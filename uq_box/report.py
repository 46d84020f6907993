"""A run's report: test metrics as JSON and the standard plots as PNG.

:func:`write_report` writes ``test_metrics.json`` and ``report/`` (the plots and an ``index.md``
listing them). A plot that does not apply to the run (no CSV log, inputs that are not 1-D or
2-D) is skipped, and ``index.md`` says which and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning import LightningDataModule  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from uq_box.methods.base import ClassificationTask, UQMethod  # noqa: E402
from uq_box.methods.binary import BinaryClassificationTask  # noqa: E402
from uq_box.methods.dense import DenseTask  # noqa: E402
from uq_box.metrics.dense import dense_sparsification_curves  # noqa: E402
from uq_box.viz import (  # noqa: E402
    plot_calibration,
    plot_decision_surface,
    plot_predictions_regression,
    plot_reliability_diagram,
    plot_toy_regression_data,
    plot_training_metrics,
)
from uq_box.viz.dense import plot_dense_predictions, plot_sparsification  # noqa: E402

TRAINING_METRICS = (
    "train_loss",
    "train_nll",
    "train_pinball",
    "train_kl",
    "train_rmse",
    "train_accuracy",
)


@dataclass
class _Report:
    """The report folder, the images written into it and the plots skipped (with why)."""

    folder: Path
    title: str
    images: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def save(self, fig: Figure, name: str) -> None:
        fig.savefig(self.folder / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.images.append(name)

    def skip(self, plot: str, reason: str) -> None:
        self.skipped.append(f"{plot}: {reason}")


def write_report(
    model: UQMethod,
    datamodule: LightningDataModule,
    run_dir: str | Path,
    test_metrics: dict[str, float],
    title: str | None = None,
) -> Path:
    """Write ``test_metrics.json`` into ``run_dir`` and the plots into ``run_dir/report``.

    Regression: the data, the training metrics (from the run's ``metrics.csv``), the predictions
    with their epistemic and aleatoric parts (1-D inputs), and the calibration curve on the test
    set (several targets: their marginal intervals pooled). Classification: the training metrics, the decision surface with its mutual-information
    map (2-D inputs with a ``grid``), and the reliability diagram on the test set. Segmentation
    and pixel regression: the training metrics, the per-pixel maps of the first test images and
    the sparsification curves (:func:`_dense_plots`). ``index.md``
    shows the metrics and the plots and names the plots skipped, with the reason.

    Returns:
        The report folder.
    """
    run_dir = Path(run_dir)
    report = _Report(run_dir / "report", title or type(model).__name__)
    report.folder.mkdir(parents=True, exist_ok=True)
    (run_dir / "test_metrics.json").write_text(json.dumps(test_metrics, indent=2) + "\n")
    if isinstance(model, DenseTask):
        _training_metrics_plot(report, run_dir)
        _dense_plots(report, model, datamodule)
    elif isinstance(model, ClassificationTask | BinaryClassificationTask):
        _training_metrics_plot(report, run_dir)
        _classification_plots(report, model, datamodule)
    else:
        _regression_plots(report, model, datamodule, run_dir)
    _write_index(report, test_metrics)
    return report.folder


def _is_one_dimensional(datamodule: LightningDataModule) -> bool:
    return datamodule.X_train.shape[1:] == (1,) and datamodule.Y_train.shape[-1] == 1


def _training_metrics_plot(report: _Report, run_dir: Path) -> None:
    """The training curves from the run's CSV log, if there is one with such columns."""
    metrics_csv = sorted(run_dir.rglob("metrics.csv"))
    if not metrics_csv:
        report.skip("training metrics", "no metrics.csv in the run folder (no CSVLogger)")
        return
    columns = metrics_csv[0].read_text().splitlines()[0].split(",")
    names = [m for m in TRAINING_METRICS if m in columns]
    if not names:
        report.skip("training metrics", f"metrics.csv logs none of {list(TRAINING_METRICS)}")
        return
    report.save(plot_training_metrics(run_dir, names), "training_metrics.png")


def _regression_plots(
    report: _Report, model: UQMethod, datamodule: LightningDataModule, run_dir: Path
) -> None:
    """Data, training metrics, predictions (1-D inputs) and the calibration curve."""
    x_train, y_train = datamodule.X_train, datamodule.Y_train
    x_test, y_test = datamodule.X_test, datamodule.Y_test
    one_dimensional = _is_one_dimensional(datamodule)
    if one_dimensional:
        fig = plot_toy_regression_data(x_train, y_train, x_test, y_test)
        report.save(fig, "data.png")
    _training_metrics_plot(report, run_dir)
    if one_dimensional:
        _regression_predictions_plot(report, model, datamodule)
    else:
        reason = f"inputs of shape {tuple(x_train.shape[1:])}, targets {tuple(y_train.shape[1:])}"
        report.skip("data and predictions", f"need 1-D inputs and one target ({reason})")
    preds = model.predict_step(x_test)
    if y_test.shape[-1] == 1:
        fig = plot_calibration(preds["pred"], preds["pred_uct"], y_test, x_test)
    else:  # several targets: one curve over every target's marginal interval, pooled
        fig = plot_calibration(
            preds["pred"].reshape(-1), preds["pred_uct"].reshape(-1), y_test.reshape(-1)
        )
    report.save(fig, "calibration.png")


def _regression_predictions_plot(
    report: _Report, model: UQMethod, datamodule: LightningDataModule
) -> None:
    """Predictions with their epistemic and aleatoric bands on a grid (or the sorted test set)."""
    x_grid, y_grid = _prediction_grid(datamodule)
    preds = model.predict_step(x_grid)
    fig = plot_predictions_regression(
        datamodule.X_train,
        datamodule.Y_train,
        x_grid,
        y_grid,
        preds["pred"],
        preds["pred_uct"],
        epistemic=preds["epistemic_uct"],
        aleatoric=preds["aleatoric_uct"],
        title=report.title,
    )
    report.save(fig, "predictions.png")


def _prediction_grid(datamodule: LightningDataModule) -> tuple[Tensor, Tensor]:
    """The data module's ``X_gtext``/``Y_gtext`` grid, else the test set sorted by input."""
    x_grid = getattr(datamodule, "X_gtext", None)
    if x_grid is not None:
        return x_grid, getattr(datamodule, "Y_gtext", None)
    x_test, y_test = datamodule.X_test, datamodule.Y_test
    order = torch.argsort(x_test[:, 0])
    return x_test[order], y_test[order]


def _classification_plots(
    report: _Report, model: UQMethod, datamodule: LightningDataModule
) -> None:
    """The decision surface (2-D inputs with a ``grid``) and the reliability diagram (a binary
    classifier's ``pred [N, 1]`` is ``P(class 1)``, plotted as two classes; multilabel
    predictions are not plotted).
    """
    x_train, y_train = datamodule.X_train, datamodule.Y_train
    if isinstance(model, BinaryClassificationTask) and y_train.ndim > 1:
        report.skip("decision surface and reliability", "multilabel targets (one plot per label)")
        return
    if x_train.shape[1:] == (2,) and hasattr(datamodule, "grid"):
        grid = datamodule.grid()
        grid_preds = model.predict_step(grid)
        fig = plot_decision_surface(
            x_train,
            y_train,
            grid,
            _class_probabilities(grid_preds["pred"]),
            grid_preds["epistemic_uct"],
            grid_extent=datamodule.grid_extent(),
            title=report.title,
            uncertainty_label="mutual information (epistemic)",
        )
        report.save(fig, "decision_surface.png")
    else:
        report.skip("decision surface", "needs 2-D inputs and a data module with a `grid`")
    preds = model.predict_step(datamodule.X_test)
    probs = _class_probabilities(preds["pred"])
    report.save(plot_reliability_diagram(probs, datamodule.Y_test), "reliability.png")


def _class_probabilities(pred: Tensor) -> Tensor:
    """Softmax probabilities ``[N, C]`` as they are; a binary ``P(class 1)`` ``[N, 1]`` as
    ``[N, 2]``.
    """
    return torch.cat([1.0 - pred, pred], dim=-1) if pred.shape[-1] == 1 else pred


def _dense_plots(report: _Report, model: UQMethod, datamodule: LightningDataModule) -> None:
    """Segmentation and pixel regression: image | target | prediction | aleatoric | epistemic |
    error for the first test images, and the sparsification curves of the test pixels.
    """
    x_test, y_test = datamodule.X_test, datamodule.Y_test
    preds = model.predict_step(x_test)
    ignore = getattr(model, "ignore_index", -100)
    fig = plot_dense_predictions(x_test, y_test, preds, ignore_index=ignore, title=report.title)
    report.save(fig, "dense_predictions.png")
    curves = dense_sparsification_curves(preds, y_test, ignore)
    report.save(plot_sparsification(curves, title=report.title), "sparsification.png")


def _write_index(report: _Report, test_metrics: dict[str, float]) -> None:
    """``index.md``: the metrics table, the images, and what was skipped."""
    lines = [f"# {report.title}", "", "| metric | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.4g} |" for k, v in test_metrics.items()]
    lines += [""] + [f"![{Path(name).stem}]({name})" for name in report.images]
    if report.skipped:
        lines += ["", "Not in this report:", ""] + [f"- {note}" for note in report.skipped]
    (report.folder / "index.md").write_text("\n".join(lines) + "\n")
