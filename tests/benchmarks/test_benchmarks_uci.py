import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from uq_box.benchmarks.uci import (
    DEFAULT_CONFIG,
    DEFAULTS,
    METHODS,
    StackedMLP,
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


def test_members_of_the_stacked_model_are_independent():
    """A loss on one network of the stack gives no gradient to the others."""
    model = StackedMLP.create(4, 3, 5, torch.Generator().manual_seed(0), bayesian=True)
    out = model.forward(torch.randn(4, 7, 3))
    out[2].sum().backward()
    for value in model.params.values():
        assert value.grad[2].abs().sum() > 0
        assert value.grad[[0, 1, 3]].abs().sum() == 0


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


def test_default_config_file_matches_the_built_in_defaults(tmp_path):
    assert DEFAULT_CONFIG.is_file()
    assert load_config(DEFAULT_CONFIG) == DEFAULTS
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
