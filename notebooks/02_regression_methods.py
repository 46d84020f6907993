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
# # Every regression method side by side
#
# The same data, the same backbone (an MLP with two hidden layers of 50 ReLU units), and every
# regression method of `uq_box`: their predictions, their calibration and a table of test
# metrics. Every method returns the same prediction dict (`pred`, `pred_uct`, `epistemic_uct`,
# `aleatoric_uct`), so they plug into the same plots and metrics.
#
# | method | uncertainty it models |
# | --- | --- |
# | Deterministic (MSE) | aleatoric only, one noise level for all inputs (the training RMSE) |
# | MVE (mean-variance estimation) | aleatoric, input dependent |
# | Quantile regression | aleatoric, from the predicted 5% and 95% quantiles |
# | Quantile + CQR | the same, made exact on held-out data by conformal prediction |
# | MC dropout | aleatoric + epistemic (dropout masks) |
# | Deep ensemble | aleatoric + epistemic (5 independently initialized networks) |
# | Bayes by Backprop | aleatoric + epistemic (Gaussian posterior over the last layer) |
# | SWAG | aleatoric + epistemic (Gaussian fitted to the SGD trajectory) |
# | SGLD | aleatoric + epistemic (posterior samples of stochastic gradient Langevin dynamics) |
# | Laplace | aleatoric (homoscedastic) + epistemic (Gaussian at the trained weights) |
#
# Laplace needs the `laplace` extra (laplace-torch); the notebook skips it when that is not
# installed. Set `UQ_BOX_FAST=1` for a quick run with fewer epochs (what the tests do).

# %%
import importlib.util
import os
from functools import partial
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import torch
from lightning import Trainer
from lightning.pytorch import seed_everything

from uq_box.datamodules import ToyHeteroscedasticDatamodule
from uq_box.losses import NLL
from uq_box.methods import (
    BNNVIRegression,
    ConformalRegression,
    DeepEnsembleRegression,
    DeterministicRegression,
    MCDropoutRegression,
    MVERegression,
    QuantileRegression,
    SGMCMCRegression,
    SWAGRegression,
)
from uq_box.metrics.functional import (
    calibration_curve,
    gaussian_crps,
    gaussian_nll,
    interval_coverage,
    miscalibration_area,
)
from uq_box.models import MLP
from uq_box.optim import SGLD
from uq_box.viz import plot_predictions_comparison

FAST = os.environ.get("UQ_BOX_FAST", "0") == "1"  # the tests' quick mode
FIGURES = os.environ.get("UQ_BOX_FIGURES")  # folder for the figures the docs show


def show(fig: plt.Figure, name: str) -> None:
    """Save ``fig`` for the docs when ``UQ_BOX_FIGURES`` is set; close it outside Jupyter."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIGURES) / f"02_{name}.png", dpi=80, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)


EPOCHS = 40 if FAST else 150
BURNIN = 10 if FAST else 20  # epochs of MSE on the mean before the NLL takes over
COLLECT_FROM = 25 if FAST else 100  # SWAG and SGLD: epochs before snapshots/samples are kept
seed_everything(0)

# %% [markdown]
# ## Data
#
# The toy heteroscedastic data of the first tutorial, with 500 extra *calibration* points that
# no method trains on: conformal prediction needs them.

# %%
dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=500, n_calib=500)


def mlp(n_outputs: int = 2, dropout_p: float = 0.0) -> MLP:
    """The shared backbone: 1 input, two hidden layers of 50 ReLU units."""
    return MLP(n_inputs=1, n_hidden=[50, 50], n_outputs=n_outputs, dropout_p=dropout_p)


adam = partial(torch.optim.Adam, lr=3e-3)


def fit(method):
    """Train ``method`` on the toy data with a quiet Trainer; return it."""
    Trainer(
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(method, dm)
    return method


# %% [markdown]
# ## Training
#
# Each method is one line around the backbone. Networks with two outputs predict a mean and a
# scale (`NLL()` reads them); the deterministic baseline and Laplace predict the mean only;
# quantile regression predicts one output per quantile level.

# %%
methods = {}
methods["Deterministic"] = fit(DeterministicRegression(mlp(1), optimizer=adam))
methods["MVE"] = fit(MVERegression(mlp(), optimizer=adam, burnin_epochs=BURNIN))
methods["Quantile"] = fit(QuantileRegression(mlp(3), quantiles=[0.05, 0.5, 0.95], optimizer=adam))
methods["MC dropout"] = fit(
    MCDropoutRegression(mlp(dropout_p=0.1), optimizer=adam, burnin_epochs=BURNIN)
)
methods["Deep ensemble"] = fit(
    DeepEnsembleRegression(mlp(), optimizer=adam, num_members=5, burnin_epochs=BURNIN)
)
methods["Bayes by Backprop"] = fit(
    BNNVIRegression(
        mlp(),
        criterion=NLL(),
        optimizer=adam,
        stochastic_module_names=[-1],
        num_mc_samples_train=10,
        num_mc_samples_test=25,
        burnin_epochs=BURNIN,
    )
)
methods["SWAG"] = fit(
    SWAGRegression(mlp(), optimizer=adam, burnin_epochs=COLLECT_FROM, num_mc_samples_test=30)
)
methods["SGLD"] = fit(
    SGMCMCRegression(
        mlp(),
        optimizer=partial(SGLD, lr=1e-3, preconditioned=True),
        prior=1.0,
        burnin_epochs=COLLECT_FROM,
        thinning=2 if FAST else 10,
        max_num_samples=50,
    )
)
if importlib.util.find_spec("laplace") is not None:
    from uq_box.methods import LaplaceRegression

    methods["Laplace"] = fit(LaplaceRegression(mlp(1), optimizer=adam))
else:
    print("laplace-torch is not installed: Laplace is skipped (install the `laplace` extra)")

# %% [markdown]
# Conformal prediction is *post hoc*: it wraps a fitted method and widens or narrows its
# intervals on the calibration split until they hold `1 - alpha` of the targets there. Around
# quantile regression it is CQR (conformalized quantile regression, Romano et al. 2019). With
# `alpha=0.05` its Gaussian-equivalent `pred_uct` has the 95% interval it calibrated.

# %%
methods["Quantile + CQR"] = ConformalRegression(methods["Quantile"], alpha=0.05).calibrate(dm)

# %% [markdown]
# ## Predictions
#
# `plot_predictions_comparison` draws one panel per method on shared axes: the ±2 std band of
# the total uncertainty and, where a method has one, of its epistemic part. Note where the
# bands widen outside the training range $[-4, 4]$ and where they do not: the deterministic,
# MVE and quantile models have no epistemic part and extrapolate with full confidence.

# %%
grid_preds = {name: m.predict_step(dm.X_gtext) for name, m in methods.items()}
fig = plot_predictions_comparison(
    dm.X_train, dm.Y_train, dm.X_gtext, dm.Y_gtext, grid_preds, ncols=4
)
show(fig, "predictions")

# %% [markdown]
# ## Calibration
#
# The interval calibration curve of each method on the test points: the fraction of targets
# inside the central $p$ interval against $p$. Above the diagonal: too wide intervals
# (underconfident); below: too narrow (overconfident).

# %%
test_preds = {name: m.predict_step(dm.X_test) for name, m in methods.items()}
fig, ax = plt.subplots(figsize=(6, 5.5), constrained_layout=True)
ax.plot([0, 1], [0, 1], color="black", ls="--", lw=1, label="ideal")
for name, p in test_preds.items():
    expected, observed = calibration_curve(p["pred"], p["pred_uct"], dm.Y_test)
    ax.plot(expected, observed, lw=1.5, label=name)
ax.set_xlabel("expected proportion in interval")
ax.set_ylabel("observed proportion in interval")
ax.set_title("Interval calibration on the test data")
ax.legend(fontsize="small")
show(fig, "calibration")

# %% [markdown]
# ## Metrics
#
# Negative log-likelihood and CRPS (lower is better; both reward sharp *and* calibrated
# predictions), RMSE of the mean, coverage of the central 95% interval (ideal 0.95) and the
# miscalibration area (ideal 0).

# %%
rows = []
for name, p in test_preds.items():
    mean, std, y = p["pred"], p["pred_uct"], dm.Y_test
    rows.append(
        {
            "method": name,
            "NLL": gaussian_nll(mean, std, y).item(),
            "CRPS": gaussian_crps(mean, std, y).item(),
            "RMSE": (mean - y).square().mean().sqrt().item(),
            "coverage 95%": interval_coverage(mean, std, y, level=0.95).item(),
            "miscal. area": miscalibration_area(mean, std, y).item(),
        }
    )
table = pd.DataFrame(rows).set_index("method").round(3)
print(table.to_string())

# %% [markdown]
# The heteroscedastic methods beat the homoscedastic baseline on NLL by a wide margin: its one
# noise level is too wide where the data are quiet and too narrow where they are noisy. The
# conformalized interval holds close to 95% of the test targets, as it promises.

# %%
assert (table["RMSE"] < 0.5).all(), table["RMSE"]
for name in ("MVE", "Deep ensemble", "Bayes by Backprop"):
    assert table.loc[name, "NLL"] < table.loc["Deterministic", "NLL"], table["NLL"]
assert table.loc["Deep ensemble", "NLL"] < table.loc["Deterministic", "NLL"] - 0.1
assert 0.9 <= table.loc["Quantile + CQR", "coverage 95%"] <= 1.0
