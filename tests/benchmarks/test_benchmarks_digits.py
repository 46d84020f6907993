"""`uq-box benchmark digits`: a fast run through the CLI and the pieces it is built from.

The full run (every method, 5 seeds) is never part of the tests; it is the command in
docs/benchmarks/digits.md.
"""

import math

import pandas as pd
import pytest
import torch

from uq_box.benchmarks import digits
from uq_box.benchmarks.digits import (
    COLUMNS,
    METHODS,
    NOT_BENCHMARKED,
    POSTHOC,
    SAMPLING,
    TRAINED,
    WRAPPED,
    build_method,
    datamodule,
    load_config,
    markdown_table,
    run_benchmark,
)
from uq_box.cli import main
from uq_box.methods import registry
from uq_box.models import CNN


def test_fast_run_through_the_cli_writes_the_table(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "benchmark", "digits", "--methods", "mc_dropout,temperature_scaling",
                "--seeds", "0", "--epochs", "1", "--train-points", "120",
                "--output", str(tmp_path), "--no-progress",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 0
    results = pd.read_csv(tmp_path / "digits_results.csv")
    # the post-hoc row wraps a deterministic network that is trained but not reported
    assert list(results["method"]) == ["mc_dropout", "temperature_scaling"]
    assert (results["train_points"] == 120).all() and (results["epochs"] == 1).all()
    for key, _, _ in COLUMNS:
        assert key in results, key
    for key in ("accuracy", "set_coverage", "ece", "adaptive_ece", "aurc", "ood_auroc_entropy"):
        assert results[key].between(0, 1).all(), (key, results[key])
    assert results["set_size"].between(0, 10).all()  # LAC sets may be empty
    assert (results["nll"] > 0).all() and results["brier"].between(0, 2).all()
    assert (results["fit_seconds"] > 0).all()
    mc_dropout, scaled = results.iloc[0], results.iloc[1]
    assert 0 <= mc_dropout["ood_auroc_mi"] <= 1
    assert math.isnan(scaled["ood_auroc_mi"])  # one network: no mutual information

    page = (tmp_path / "digits.md").read_text()
    assert "uq-box benchmark digits --methods mc_dropout,temperature_scaling" in page
    assert "Wall time:" in page and "## How it was run" in page and "```yaml" in page
    header = next(line for line in page.splitlines() if line.startswith("| method |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "class", "seeds", *(h for _, h, _ in COLUMNS)
    ]  # fmt: skip
    rows = [line for line in page.splitlines() if line.startswith("| MC dropout")]
    assert len(rows) == 1 and "`MCDropoutClassification`" in rows[0]
    assert "| + temperature scaling | `TemperatureScaling` | 1 |" in page
    assert rows[0].rstrip(" |").split("|")[-1].strip() != "–"  # MI AUROC is there


def test_every_classification_method_of_the_registry_has_a_row():
    """A classification class of the registry is benchmarked, or says why not."""
    benchmarked = {
        cls.__name__ for cls in (*TRAINED.values(), *WRAPPED.values(), *POSTHOC.values())
    }
    assert not [reason for reason in NOT_BENCHMARKED.values() if "not yet" in reason]
    for item in registry.METHODS:
        if item.task != "classification":
            continue
        declared = {item.name, item.cls.__name__} & set(NOT_BENCHMARKED)
        assert item.name in benchmarked or declared, (
            f"{item.name} is a classification method of the registry without a row in "
            f"`uq-box benchmark digits`: add it to uq_box/benchmarks/digits.py (TRAINED or "
            f"POSTHOC, and digits.yaml) or to NOT_BENCHMARKED with the reason"
        )


def test_each_row_is_the_library_class_with_the_yaml_settings():
    from uq_box.optim import SGHMC, SGLD

    config = load_config()
    assert tuple(config["methods"]) == METHODS
    deterministic = build_method("deterministic", digits._options(config, "deterministic"))
    for method in METHODS:
        options = digits._options(config, method)
        if method == "laplace" and not digits.laplace_available():
            continue
        model = build_method(method, options, base=deterministic)
        assert isinstance(model, (TRAINED | WRAPPED | POSTHOC)[method]), method
        if method in TRAINED and method != "deep_ensemble":  # one CNN, converted in place
            assert any(isinstance(m, CNN) for m in model.modules()), method
    mcbn = build_method("mc_batchnorm", digits._options(config, "mc_batchnorm"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in mcbn.modules())
    tta = build_method("tta", digits._options(config, "tta"), base=deterministic)
    assert (
        tta.model is deterministic and tta.transforms.std == config["methods"]["tta"]["noise_std"]
    )
    sgld = build_method("sgld", digits._options(config, "sgld"))
    optimizer = sgld.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert isinstance(optimizer, SGLD)
    sghmc = build_method("sghmc", digits._options(config, "sghmc"))
    optimizer = sghmc.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert isinstance(optimizer, SGHMC)
    with pytest.raises(ValueError, match="needs the fitted `base`"):
        build_method("temperature_scaling", digits._options(config, "temperature_scaling"))


def test_new_rows_run_on_a_few_images():
    """The rows added after the first run (MC BatchNorm, TTA, the parameter-efficient ensembles,
    DUE), one epoch on 120 images: every metric in range, MI for all of them.
    """
    new = ["mc_batchnorm", "batch_ensemble", "packed_ensemble", "masksembles", "mimo"]
    new += ["rank1_bnn", "due", "tta"]
    config = load_config()
    config["eval_samples"] = 4
    config["ood_angles"] = [90]
    config["methods"]["rank1_bnn"]["samples_per_member"] = 1
    results = run_benchmark(new, [0], config, epochs=1, train_points=120, progress=False)
    assert list(results["method"]) == [m for m in METHODS if m in new]
    for key in ("accuracy", "set_coverage", "ece", "aurc", "ood_auroc_entropy", "ood_auroc_mi"):
        assert results[key].between(0, 1).all(), (key, results[key])
    assert set(new) <= set(SAMPLING)
    assert results.set_index("method").loc["tta", "fit_seconds"] == 0.0  # nothing fitted
    table = markdown_table(results)
    assert "| MC BatchNorm (CNN with BatchNorm) | `MCBatchNormClassification` | 1 |" in table
    assert "| + test-time augmentation (noise) | `TTAClassification` | 1 |" in table
    assert "| DUE | `DUEClassification` | 1 |" in table


def test_splits_are_disjoint_and_the_held_out_part_is_halved():
    config = load_config()
    dm = datamodule(config, seed=1)
    sizes = {s: len(dm.split(s)[1]) for s in ("train", "val", "calib", "test")}
    assert sum(sizes.values()) == 1797
    assert abs(sizes["val"] - sizes["calib"]) <= 1
    assert sizes["val"] + sizes["calib"] == pytest.approx(0.2 * 1797, abs=2)
    flat = {s: dm.split(s)[0].flatten(1) for s in sizes}
    for a in sizes:  # no image in two splits (the digits hold a few duplicates: compare rows)
        for b in sizes:
            if a < b:
                same = torch.cdist(flat[a], flat[b]).eq(0).any(1).float().mean()
                assert same < 0.02, (a, b)
    # every class in both calibration halves (stratified)
    assert len(torch.unique(dm.split("val")[1])) == len(torch.unique(dm.split("calib")[1])) == 10


def test_laplace_row_says_it_needs_the_extra(monkeypatch):
    monkeypatch.setattr(digits, "laplace_available", lambda: False)
    results = run_benchmark(["laplace"], [0, 1], load_config(), progress=False)
    assert list(results["note"]) == ["needs the laplace extra"] * 2
    row = "| Laplace (last layer, KFAC) | `LaplaceClassification` | 0 | needs the laplace extra |"
    assert row in markdown_table(results)


def test_config_updates_and_errors(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("seeds: [3]\nmethods:\n  swag: {burnin_epochs: 5}\n")
    config = load_config(override)
    assert config["seeds"] == [3]
    assert config["methods"]["swag"]["burnin_epochs"] == 5
    assert config["methods"]["swag"]["max_num_samples"] == 20  # kept from digits.yaml
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  nope: {}\n")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        load_config(bad)
    with pytest.raises(SystemExit, match="unknown"):
        digits.main(["--methods", "deterministic,nope"])
    with pytest.raises(SystemExit, match="benchmark name: uci or digits"):
        main(["benchmark", "mnist"])


@pytest.mark.laplace
def test_laplace_row_with_the_extra():
    results = run_benchmark(["laplace"], [0], load_config(), epochs=1, train_points=120)
    row = results.iloc[0]
    assert row["method"] == "laplace" and not row["note"]
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["ood_auroc_mi"] <= 1
    assert 0 <= row["set_size"] <= 10
