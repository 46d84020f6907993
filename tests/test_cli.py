import json
import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import yaml
from lightning import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from uq_box.cli import main
from uq_box.datamodules import ArrayDataModule
from uq_box.methods import BNNVIRegression
from uq_box.models import MLP
from uq_box.report import write_report

CONFIG = "configs/toy_heteroscedastic/bnn_vi.yaml"
REPO = Path(__file__).parents[1]
ALL_CONFIGS = sorted(
    str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")
)
FIT_CONFIGS = ALL_CONFIGS


def config_param(config: str):
    """A config as a test parameter; Laplace configs run in .venv-laplace (`laplace` marker)."""
    model = yaml.safe_load((REPO / "configs" / config).read_text())["model"]["class_path"]
    return pytest.param(config, marks=[pytest.mark.laplace] if "Laplace" in model else [])


def fewer_samples(config: str) -> list[str]:
    """2 prediction samples where the config sets a number (keeps each smoke test ~1-2 s)."""
    init_args = yaml.safe_load((REPO / "configs" / config).read_text())["model"]["init_args"]
    if isinstance(init_args.get("num_mc_samples_test"), int):
        return ["--model.init_args.num_mc_samples_test=2"]
    return []


def test_every_config_is_a_fit_config():
    """A new config joins the fast_dev_run smoke test below (the UCI benchmark's hyperparameters
    live in the package, uq_box/benchmarks/uci.yaml)."""
    for config in FIT_CONFIGS:
        assert {"trainer", "model", "data"} <= set(
            yaml.safe_load((REPO / "configs" / config).read_text())
        )


@pytest.mark.parametrize("config", [config_param(c) for c in FIT_CONFIGS])
def test_fast_dev_run_smoke_test_of_every_config(config, tmp_path, capsys, monkeypatch):
    """``--trainer.fast_dev_run=true``: one batch of each stage, test metrics, the report built
    (methods needing snapshots or samples take one), no traceback and no file written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["uq-box"])
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / config),
            "--trainer.fast_dev_run=true",
            "--trainer.enable_model_summary=false",
            *fewer_samples(config),
        ]
    )
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("test metrics: ")]
    metrics = dict(item.split("=") for item in line[len("test metrics: ") :].split(", "))
    assert metrics and all(math.isfinite(float(v)) for v in metrics.values()), line
    classification = "test_accuracy" in metrics
    plots = "decision_surface.png, reliability.png" if classification else "calibration.png"
    if config.startswith(("toy_segmentation", "toy_pixel_regression")):  # dense tasks
        plots = "dense_predictions.png, sparsification.png"
    assert "fast_dev_run: report built (" in out and plots in out, out
    assert list(tmp_path.iterdir()) == []  # nothing written, as Lightning's own fast_dev_run


def test_cli_fit_writes_log_metrics_and_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["uq-box"])
    repo_config = REPO / CONFIG
    main(
        [
            "fit",
            "--config",
            str(repo_config),
            "--trainer.max_epochs=4",
            "--model.init_args.burnin_epochs=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    run = tmp_path / "bnn_vi" / "version_0"
    metrics = json.loads((run / "test_metrics.json").read_text())
    expected = {
        "test_nll",
        "test_nll_gaussian",
        "test_rmse",
        "test_crps",
        "test_coverage_95",
        "test_miscalibration_area",
    }
    assert set(metrics) == expected
    assert all(np.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["test_coverage_95"] <= 1.0
    for name in ["data", "training_metrics", "predictions", "calibration"]:
        png = run / "report" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    csv = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "train_nll", "train_kl", "train_rmse", "val_loss", "val_nll"} <= set(csv)
    assert "report written to" in capsys.readouterr().out
    assert plt.get_fignums() == []  # the report closes its figures


def test_cli_rejects_unknown_config_key(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["uq-box"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  class_path: uq_box.methods.BNNVIRegression\n  init_args:\n    num_mc_samples: 3\n"
    )
    try:
        main(["fit", "--config", str(bad)])
    except SystemExit as err:
        assert err.code != 0
    else:
        raise AssertionError("an unknown key must stop the CLI")


def test_report_without_one_dimensional_inputs(tmp_path):
    seed_everything(0)
    x = torch.randn(64, 3)
    y = x.sum(-1, keepdim=True) + 0.1 * torch.randn(64, 1)
    dm = ArrayDataModule(x[:48], y[:48], X_test=x[48:], y_test=y[48:], batch_size=16)
    model = BNNVIRegression(MLP(3, [8], 2), stochastic_module_names=[-1], num_mc_samples_test=5)
    trainer = Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    metrics = trainer.test(model, dm, verbose=False)[0]
    report = write_report(model, dm, trainer.log_dir, metrics)
    assert sorted(p.name for p in report.glob("*.png")) == [
        "calibration.png",
        "training_metrics.png",
    ]
    index = (report / "index.md").read_text()
    assert "test_nll" in index
    assert "Not in this report:" in index and "- data and predictions: need 1-D inputs" in index
