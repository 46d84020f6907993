"""A run's report: test metrics as JSON and the standard plots as PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning import LightningDataModule  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from uq_box.methods.base import ClassificationTask, UQMethod  # noqa: E402
from uq_box.viz import (  # noqa: E402
    plot_calibration,
    plot_decision_surface,
    plot_predictions_regression,
    plot_reliability_diagram,
    plot_toy_regression_data,
    plot_training_metrics,
)

TRAINING_METRICS = (
    "train_loss",
    "train_nll",
    "train_pinball",
    "train_kl",
    "train_rmse",
    "train_accuracy",
)


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


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
    set. Classification: the training metrics, the decision surface with its mutual-information
    map (2-D inputs with a ``grid``), and the reliability diagram on the test set.

    Returns:
        The report folder.
    """
    run_dir = Path(run_dir)
    report = run_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    (run_dir / "test_metrics.json").write_text(json.dumps(test_metrics, indent=2) + "\n")
    title = title or type(model).__name__
    x_train, y_train = datamodule.X_train, datamodule.Y_train
    x_test, y_test = datamodule.X_test, datamodule.Y_test
    images = []
    classification = isinstance(model, ClassificationTask)
    one_dimensional = not classification and x_train.shape[1:] == (1,) and y_train.shape[-1] == 1
    if one_dimensional:
        images.append(
            _save(plot_toy_regression_data(x_train, y_train, x_test, y_test), report / "data.png")
        )
    metrics_csv = sorted(run_dir.rglob("metrics.csv"))
    if metrics_csv:
        columns = metrics_csv[0].read_text().splitlines()[0].split(",")
        names = [m for m in TRAINING_METRICS if m in columns]
        if names:
            fig = plot_training_metrics(run_dir, names)
            images.append(_save(fig, report / "training_metrics.png"))
    if one_dimensional:
        x_grid = getattr(datamodule, "X_gtext", None)
        y_grid = getattr(datamodule, "Y_gtext", None)
        if x_grid is None:
            order = torch.argsort(x_test[:, 0])
            x_grid, y_grid = x_test[order], y_test[order]
        preds = model.predict_step(x_grid)
        fig = plot_predictions_regression(
            x_train,
            y_train,
            x_grid,
            y_grid,
            preds["pred"],
            preds["pred_uct"],
            epistemic=preds["epistemic_uct"],
            aleatoric=preds["aleatoric_uct"],
            title=title,
        )
        images.append(_save(fig, report / "predictions.png"))
    preds = model.predict_step(x_test)
    if classification:
        if x_train.shape[1:] == (2,) and hasattr(datamodule, "grid"):
            grid = datamodule.grid()
            grid_preds = model.predict_step(grid)
            fig = plot_decision_surface(
                x_train,
                y_train,
                grid,
                grid_preds["pred"],
                grid_preds["epistemic_uct"],
                grid_extent=datamodule.grid_extent(),
                title=title,
                uncertainty_label="mutual information (epistemic)",
            )
            images.append(_save(fig, report / "decision_surface.png"))
        fig = plot_reliability_diagram(preds["pred"], y_test)
        images.append(_save(fig, report / "reliability.png"))
    else:
        fig = plot_calibration(preds["pred"], preds["pred_uct"], y_test, x_test)
        images.append(_save(fig, report / "calibration.png"))
    lines = [f"# {title}", "", "| metric | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.4g} |" for k, v in test_metrics.items()]
    lines += [""] + [f"![{Path(name).stem}]({name})" for name in images]
    (report / "index.md").write_text("\n".join(lines) + "\n")
    return report
