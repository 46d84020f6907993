# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The UCI regression benchmark
#
# The standard benchmark of Bayesian deep learning for regression (Hernández-Lobato & Adams
# 2015; Gal & Ghahramani 2016; Lakshminarayanan et al. 2017): nine UCI data sets, 20 fixed
# train/test splits each (5 for protein), one hidden layer of 50 ReLU units, features and
# targets standardized with the training statistics, and two numbers per split, both in the
# original units of the target:
#
# - the **test log-likelihood** per point (higher is better): it rewards a predictive
#   distribution that is both accurate and honest about its uncertainty;
# - the **test RMSE** of the predictive mean (lower is better): accuracy alone.
#
# `uq-box benchmark uci` runs it and writes a CSV of every split, a Markdown report and a plot.
# This notebook runs a small subset (2 data sets, 2 splits) and then reads the full table of
# [the benchmark page](../benchmarks/uci.md).
#
# The data live in a folder in the standard layout (`<root>/<dataset>/data.txt`,
# `index_train_<k>.txt`, ...): by default the user cache `~/.cache/uq_box/uci`, where missing
# data sets are downloaded with checksums; `UQ_BOX_UCI_ROOT` (or `--root`) names another folder.
# `UQ_BOX_FAST=1` trains fewer epochs (what the tests do).

# %%
import os
import tempfile
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from uq_box.benchmarks.uci import main as uci_benchmark
from uq_box.datamodules.uci import default_uci_root

FAST = os.environ.get("UQ_BOX_FAST", "0") == "1"  # the tests' quick mode
FIGURES = os.environ.get("UQ_BOX_FIGURES")  # folder for the figures the docs show


def show(fig: plt.Figure, name: str) -> None:
    """Save ``fig`` for the docs when ``UQ_BOX_FIGURES`` is set; close it outside Jupyter."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIGURES) / f"07_{name}.png", dpi=80, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)


def find_docs() -> Path | None:
    """The repository's ``docs`` folder, seen from the repository or from ``notebooks/``."""
    here = [Path(__file__).resolve().parent] if "__file__" in globals() else []
    for folder in [*here, Path.cwd(), *Path.cwd().parents, *[p.parent for p in here]]:
        if (folder / "docs" / "benchmarks").is_dir():
            return folder / "docs"
    return None


root = default_uci_root()  # $UQ_BOX_UCI_ROOT, else ~/.cache/uq_box/uci (downloaded there)
output = Path(tempfile.mkdtemp()) / "uci"
print(f"data: {root}\noutput: {output}")

# %% [markdown]
# ## Running a subset
#
# The same command line as `uq-box benchmark uci ...`: four methods (MVE, deep ensemble, MC
# dropout, Bayes by Backprop) on two data sets and two splits, one worker process. Every
# (data set, method) trains its splits as stacked runs of the library's method
# (`uq_box.methods.StackedRuns`): one vectorized model in one `Trainer.fit`, so this takes
# seconds. Drop `--datasets`, `--splits` and `--epochs` for the full protocol.

# %%
args = [
    "--datasets", "bostonHousing,yacht",
    "--splits", "0,1",
    "--methods", "mve,deep_ensemble,mc_dropout,bnn_vi",
    "--output", str(output),
    "--workers", "1",
    "--no-progress",
]  # fmt: skip
if FAST:
    args += ["--epochs", "20"]
assert uci_benchmark(args) == 0
print(sorted(p.name for p in output.iterdir()))

# %% [markdown]
# ## What it wrote
#
# `uci_results.csv` has one row per (data set, method, split) with the test RMSE, the test
# log-likelihood, the CRPS, the coverage of the central 95% interval, the miscalibration area,
# the fit time and the epochs; `uci.md` the tables of the benchmark page; `uci.png` the plot.

# %%
results = pd.read_csv(output / "uci_results.csv")
print(results.round(3).to_string(index=False))

# %%
summary = results.groupby(["dataset", "method"])[["test_log_likelihood", "test_rmse"]].mean()
print(summary.round(3).to_string())

# %% [markdown]
# `uci.png` plots every method against the published numbers; here the same means ± standard
# errors of the subset, drawn from the CSV.

# %%
stats = results.groupby(["dataset", "method"])[["test_log_likelihood", "test_rmse"]].agg(
    ["mean", "sem"]
)
datasets = list(results["dataset"].unique())
fig, axes = plt.subplots(
    2, len(datasets), figsize=(4.5 * len(datasets), 6), constrained_layout=True, squeeze=False
)
for col, dataset in enumerate(datasets):
    for row, metric in enumerate(["test_log_likelihood", "test_rmse"]):
        ax = axes[row, col]
        table = stats.loc[dataset, metric]
        ax.errorbar(range(len(table)), table["mean"], yerr=table["sem"], fmt="o", capsize=4)
        ax.set_xticks(range(len(table)), table.index, rotation=20)
        ax.set_title(f"{dataset}: {metric.removeprefix('test_').replace('_', ' ')}")
        ax.grid(alpha=0.3)
show(fig, "subset")

# %% [markdown]
# ## Reading the table
#
# The full run (all nine data sets, all splits) is on [the benchmark page](../benchmarks/uci.md).
# Each cell is the mean over the splits ± its standard error, in the target's original units,
# next to the numbers the papers report (PBP, MC dropout, deep ensembles); the best value of a
# row is bold. How to read it:
#
# - **Differences smaller than the standard errors are noise.** On the small data sets (Boston,
#   concrete, energy, wine, yacht: a few hundred points) the split-to-split spread is large.
# - **The log-likelihood depends on the scale of the target.** It is not comparable across
#   data sets, only across methods on one data set; naval has tiny targets, so large values.
# - **A good RMSE with a bad log-likelihood** means overconfident (or badly underconfident)
#   uncertainty: look at the 95% coverage and the miscalibration area in the third table.
# - **A single wild split can ruin a mean**: a log-likelihood far below the other methods' with a
#   standard error as large as the mean says that one split predicted a tiny variance for a
#   large error; the CSV shows which.
#
# The `met` column of the last table checks the target the benchmark was written for: some
# `uq_box` method at least as good as the deep ensembles paper's log-likelihood minus its
# standard error.

# %%
docs = find_docs()
full_csv = docs / "benchmarks" / "uci_results.csv" if docs else None
if full_csv is not None and full_csv.is_file():
    full = pd.read_csv(full_csv)
    table = full.pivot_table(
        index="dataset", columns="method", values="test_log_likelihood", aggfunc="mean"
    )
    print("mean test log-likelihood of the full run:\n" + table.round(2).to_string())
else:
    print("the full results are on the benchmark page (docs/benchmarks/uci.md)")

# %%
# four methods x two data sets x two splits, all finite; Boston is learned even in the fast mode
assert len(results) == 16 and results["test_log_likelihood"].notna().all()
boston = results[results["dataset"] == "bostonHousing"]
assert (boston["test_rmse"] < 4.5).all(), boston
assert (boston["test_log_likelihood"] > -3.5).all(), boston
