import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from uq_box.benchmarks.uci import (
    DEFAULT_CONFIG,
    METHODS,
    build_method,
    fit_dataset,
    load_config,
    markdown_table,
    original_units_metrics,
    published_results,
)
from uq_box.cli import main
from uq_box.datamodules.uci import load_uci_split


def test_original_unit_metrics_match_numpy(uci_root):
    split = load_uci_split(uci_root, "bostonHousing", 1)
    rng = np.random.default_rng(0)
    mean_s = split.y_test + rng.normal(0, 0.3, split.y_test.shape)  # standardized prediction
    std_s = rng.uniform(0.2, 0.6, split.y_test.shape)
    metrics = original_units_metrics(torch.tensor(mean_s), torch.tensor(std_s), split)

    raw = np.loadtxt(uci_root / "bostonHousing" / "data.txt")[split.test_index, 13]
    mean, std = mean_s * split.y_std + split.y_mean, std_s * split.y_std
    assert metrics["test_rmse"] == pytest.approx(np.sqrt(np.mean((mean - raw) ** 2)))
    assert metrics["test_rmse"] == pytest.approx(
        split.y_std * np.sqrt(np.mean((mean_s - split.y_test) ** 2))
    )
    log_lik = stats.norm.logpdf(raw, mean, std).mean()
    assert metrics["test_log_likelihood"] == pytest.approx(log_lik)
    standardized = stats.norm.logpdf(split.y_test, mean_s, std_s).mean()
    assert metrics["test_log_likelihood"] == pytest.approx(standardized - math.log(split.y_std))
    z = (raw - mean) / std
    crps = std * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))
    assert metrics["test_crps"] == pytest.approx(crps.mean())
    assert metrics["test_coverage_95"] == pytest.approx(np.mean(np.abs(z) <= 1.959963984540054))
    assert 0 <= metrics["test_miscalibration_area"] <= 0.5


def test_benchmark_trains_the_library_methods():
    """No private engine: each method is the library's class, with the YAML's settings."""
    from uq_box.losses import NLL
    from uq_box.methods import (
        BNNVIRegression,
        DeepEnsembleRegression,
        MCDropoutRegression,
        MVERegression,
    )
    from uq_box.nn import BayesianLinear, MCDropout

    config = load_config()
    classes = {
        "mve": MVERegression, "deep_ensemble": DeepEnsembleRegression,
        "mc_dropout": MCDropoutRegression, "bnn_vi": BNNVIRegression,
    }  # fmt: skip
    for name, cls in classes.items():
        method = build_method(name, 3, 7, {**config, **config["methods"][name]}, 10, 0.5)
        assert type(method) is cls
        assert isinstance(method.criterion, NLL) and float(method.criterion.resolution) == 0.5
    bnn = build_method("bnn_vi", 3, 7, {**config, **config["methods"]["bnn_vi"]}, 10)
    layers = [m for m in bnn.modules() if isinstance(m, BayesianLinear)]
    assert len(layers) == 2 and all(m.estimator == "local" for m in layers)
    assert bnn.num_mc_samples_test == config["eval_samples"]
    dropout = build_method("mc_dropout", 3, 7, {**config, **config["methods"]["mc_dropout"]}, 10)
    assert [m.p for m in dropout.modules() if isinstance(m, MCDropout)] == [0.05]
    ensemble = build_method(
        "deep_ensemble", 3, 7, {**config, **config["methods"]["deep_ensemble"]}, 10
    )
    assert ensemble.num_members == 5


@pytest.mark.parametrize("method", ["mve", "mve_student_t", "mdn", "der"])
def test_integer_targets_do_not_collapse(uci_root, method):
    """Wine quality is an integer score: without the rounding variance in the likelihood, the
    scale collapses on some splits (MVE: test log-likelihood -164 on split 10, -6 on split 7;
    the Student-t MVE: -1751 on split 10; the MDN's density +4.6 on split 4; the evidential
    model: -2.30 on one split, the rest about -1.2)."""
    config = load_config()
    rows = fit_dataset(uci_root, "wine-quality-red", method, [4, 7, 10], config)
    for row in rows:
        assert row["test_log_likelihood"] > -1.5, row
        assert -1.5 < row["test_ll_density"] < 0.0, row


def test_fit_dataset_rows(uci_root):
    config = load_config()
    rows = fit_dataset(uci_root, "yacht", "deep_ensemble", [0, 3], config, epochs=2)
    assert [r["split"] for r in rows] == [0, 3]
    for row in rows:
        assert row["epochs"] == 2 and row["fit_seconds"] > 0
        assert all(np.isfinite(v) for k, v in row.items() if k.startswith("test_"))


def test_cli_two_datasets_two_splits_two_epochs(uci_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["uq-box"])
    args = ["benchmark", "uci", "--methods", ",".join(METHODS), "--datasets", "yacht,bostonHousing"]
    args += ["--splits", "0,1", "--epochs", "2", "--root", str(uci_root), "--output", str(tmp_path)]
    args += ["--workers", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    results = pd.read_csv(tmp_path / "uci_results.csv")
    assert len(results) == 2 * 2 * len(METHODS)
    assert set(results["dataset"]) == {"yacht", "bostonHousing"}
    assert set(results["split"]) == {0, 1}
    for column in ("test_rmse", "test_log_likelihood", "test_crps", "test_coverage_95",
                   "test_miscalibration_area", "fit_seconds"):  # fmt: skip
        assert results[column].notna().all()
    report = (tmp_path / "uci.md").read_text()
    assert "uq-box benchmark uci --methods" in report and "Wall time" in report
    assert "-2.41 ± 0.25" in report  # deep ensembles paper, Boston LL
    assert report.count("**") >= 2 * 2 * 2  # a best entry per data set and table
    assert "lr:" in report  # the config is printed with the results
    assert (tmp_path / "uci.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "lr_schedule" in out and "| yacht |" in out


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--datasets", "boston", "`--datasets` got unknown"),
        ("--methods", "swag", "`--methods` got unknown"),
        ("--splits", "a", "`--splits` must be"),
        ("--splits", "25", "selects no split of yacht"),
    ],
)
def test_cli_errors_name_the_argument(uci_root, option, value, message):
    args = ["benchmark", "uci", "--root", str(uci_root), "--datasets", "yacht", option, value]
    with pytest.raises(SystemExit, match=message):
        main(args)


def test_published_results_and_best_marked():
    published = published_results()
    assert {"dataset", "method", "metric", "mean", "standard_error"} <= set(published.columns)
    assert len(published) == 108
    fake = pd.DataFrame(
        {"dataset": ["yacht"] * 2, "method": ["mve"] * 2, "split": [0, 1],
         "test_log_likelihood": [-0.5, -0.7], "test_rmse": [0.9, 1.1]}
    )  # fmt: skip
    table = markdown_table(fake, "test_log_likelihood")
    assert "**-0.60 ± 0.10**" in table
    assert "**1.00 ± 0.10**" in markdown_table(fake, "test_rmse")  # lowest RMSE; PBP has 1.02
    fake["test_log_likelihood"] = [-5.0, -6.0]
    assert "**-1.18 ± 0.21**" in markdown_table(fake, "test_log_likelihood")  # the paper's


def test_config_is_the_yaml_and_overrides_are_checked(tmp_path):
    assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.parent.name == "benchmarks"
    config = load_config()
    assert config["methods"]["deep_ensemble"]["num_members"] == 5
    override = tmp_path / "fast.yaml"
    override.write_text("lr: 0.02\nmethods: {mc_dropout: {dropout_p: 0.1}}\n")
    changed = load_config(override)
    assert changed["lr"] == 0.02 and changed["methods"]["mc_dropout"]["dropout_p"] == 0.1
    assert changed["methods"]["mve"] == config["methods"]["mve"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("per_dataset: {boston: {lr: 0.1}}\n")
    with pytest.raises(ValueError, match="unknown data sets"):
        load_config(bad)
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(bad)


def test_fit_is_reproducible(uci_root):
    config = load_config()
    first = fit_dataset(uci_root, "yacht", "mc_dropout", [0, 1], config, epochs=2)
    second = fit_dataset(uci_root, "yacht", "mc_dropout", [0, 1], config, epochs=2)
    for a, b in zip(first, second, strict=True):
        assert {k: v for k, v in a.items() if k != "fit_seconds"} == {
            k: v for k, v in b.items() if k != "fit_seconds"
        }
