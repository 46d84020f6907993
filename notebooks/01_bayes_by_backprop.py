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
# # Bayes by Backprop on toy heteroscedastic regression
#
# Bayes by Backprop (Blundell et al. 2015) is mean-field variational inference over the weights
# of a neural network: every chosen weight gets a Gaussian posterior
# $q(w) = \mathcal{N}(\mu, \sigma^2)$ with $\sigma = \mathrm{softplus}(\rho)$, and training
# maximizes the evidence lower bound (ELBO)
#
# $$\mathcal{L}(q) = \mathbb{E}_{q(w)}\Big[\sum_{i=1}^N \log p(y_i \mid x_i, w)\Big]
#   - \beta\,\mathrm{KL}\big(q(w)\,\|\,p(w)\big)$$
#
# by stochastic gradients, with the reparameterization trick $w = \mu + \sigma \epsilon$.
# Here the network outputs a mean and a scale, so each weight sample $w_s$ gives a Gaussian
# $\mathcal{N}(\mu_s(x), \sigma_s(x)^2)$; the prediction is the mixture of these Gaussians. Its
# variance splits (law of total variance) into
#
# - the **aleatoric** part $\frac{1}{S}\sum_s \sigma_s(x)^2$: the noise in the data, and
# - the **epistemic** part $\mathrm{Var}_s\,\mu_s(x)$: what the model does not know.
#
# Only the last layer is Bayesian here (a *partially stochastic* network,
# `stochastic_module_names=[-1]`): it is cheaper, and often as good as a full BNN.
#
# Set `UQ_BOX_FAST=1` to run this notebook in seconds with fewer epochs (what the tests do).

# %%
import os
import tempfile
from functools import partial
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from lightning import Trainer
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from uq_box.datamodules import ToyHeteroscedasticDatamodule
from uq_box.losses import NLL
from uq_box.methods import BNNVIRegression
from uq_box.metrics.functional import gaussian_nll, interval_coverage, miscalibration_area
from uq_box.models import MLP
from uq_box.viz import (
    plot_calibration,
    plot_predictions_regression,
    plot_toy_regression_data,
    plot_training_metrics,
)

FAST = os.environ.get("UQ_BOX_FAST", "0") == "1"  # the tests' quick mode
FIGURES = os.environ.get("UQ_BOX_FIGURES")  # folder for the figures the docs show


def show(fig: plt.Figure, name: str) -> None:
    """Save ``fig`` for the docs when ``UQ_BOX_FIGURES`` is set; close it outside Jupyter."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIGURES) / f"01_{name}.png", dpi=80, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)


seed_everything(0)
log_dir = tempfile.mkdtemp()

# %% [markdown]
# ## Data
#
# `ToyHeteroscedasticDatamodule` draws $y = \sin(x) + 0.3x + \varepsilon$ with a noise level
# that changes with $x$ (between 0.05 and 0.45). `X_test`/`Y_test` are independent noisy draws
# for the metrics; `X_gtext`/`Y_gtext` are a dense noise-free grid that extends past the training
# range on both sides, to see what the model does where it has no data.

# %%
dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=500)
fig = plot_toy_regression_data(dm.X_train, dm.Y_train, dm.X_test, dm.Y_test)
show(fig, "data")

# %% [markdown]
# ## Model
#
# Any backbone works; here an MLP with two hidden layers of 50 units and two outputs, the mean
# and the (softplus) scale that `NLL()` reads. `BNNVIRegression` converts the layers named by
# `stochastic_module_names` into Bayesian layers (`[-1]`: the last parameter-owning layer).
# The first `burnin_epochs` fit the mean only (MSE), so the scale head does not explain the data
# away as noise before the mean has found it.

# %%
network = MLP(n_inputs=1, n_hidden=[50, 50], n_outputs=2, activation_fn=nn.ReLU())
model = BNNVIRegression(
    network,
    criterion=NLL(),
    optimizer=partial(torch.optim.Adam, lr=3e-3),
    stochastic_module_names=[-1],
    num_mc_samples_train=10,
    num_mc_samples_test=25,
    burnin_epochs=20,
)
print(model.model)

# %% [markdown]
# ## Training
#
# A plain Lightning `Trainer`. The loss per step is the negative ELBO per training point:
# `mean NLL + beta * KL / N`, with `N` the size of the training set.

# %%
trainer = Trainer(
    max_epochs=80 if FAST else 150,
    logger=CSVLogger(log_dir),
    log_every_n_steps=10,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(model, dm)

# %%
fig = plot_training_metrics(log_dir, ["train_loss", "train_kl", "train_rmse"])
show(fig, "training")

# %% [markdown]
# ## Predictions
#
# `predict_step` returns the predictive mean `pred`, the total std `pred_uct` and its two parts.
# On the dense grid the aleatoric band follows the noise of the data; the epistemic band is
# narrow where the training data are and widens outside $[-4, 4]$, where the model has seen
# nothing.

# %%
preds = model.predict_step(dm.X_gtext)
fig = plot_predictions_regression(
    dm.X_train,
    dm.Y_train,
    dm.X_gtext,
    dm.Y_gtext,
    preds["pred"],
    preds["pred_uct"],
    epistemic=preds["epistemic_uct"],
    aleatoric=preds["aleatoric_uct"],
    title="Bayes by Backprop (last layer Bayesian)",
)
show(fig, "predictions")

# %% [markdown]
# The split adds up: `pred_uct**2 == aleatoric_uct**2 + epistemic_uct**2`. Far to the right of
# the training range, where the ReLU features grow without bound, the epistemic part is several
# times what it is on the data.

# %%
total2 = preds["aleatoric_uct"] ** 2 + preds["epistemic_uct"] ** 2
assert torch.allclose(preds["pred_uct"] ** 2, total2, rtol=1e-4, atol=1e-6)
x = dm.X_gtext.squeeze(-1)
epistemic_in = preds["epistemic_uct"][(x > -4) & (x < 4)].mean().item()
epistemic_far = preds["epistemic_uct"][x > 5].mean().item()
print(f"mean epistemic std on the data: {epistemic_in:.3f}, beyond x = 5: {epistemic_far:.3f}")
assert epistemic_far > 1.5 * epistemic_in

# %% [markdown]
# ## Calibration
#
# On the noisy test points: a calibrated model's central $p$ intervals hold a fraction $p$ of
# the targets, for every $p$. The calibration curve plots the observed fraction against $p$; the
# area between it and the diagonal is the *miscalibration area* (0 is perfect). See the user
# guide for how to read it.

# %%
test_preds = model.predict_step(dm.X_test)
fig = plot_calibration(test_preds["pred"], test_preds["pred_uct"], dm.Y_test, dm.X_test)
show(fig, "calibration")

# %%
metrics = {
    "nll": gaussian_nll(test_preds["pred"], test_preds["pred_uct"], dm.Y_test).item(),
    "coverage_95": interval_coverage(test_preds["pred"], test_preds["pred_uct"], dm.Y_test).item(),
    "miscalibration_area": miscalibration_area(
        test_preds["pred"], test_preds["pred_uct"], dm.Y_test
    ).item(),
}
print(metrics)
# loose bounds that hold in the fast mode too (the full run does better)
assert metrics["nll"] < 0.5
assert 0.85 < metrics["coverage_95"] <= 1.0
assert metrics["miscalibration_area"] < 0.15

# %% [markdown]
# The same run as one command: `uq-box fit --config configs/toy_heteroscedastic/bnn_vi.yaml`
# (it also writes these plots and the test metrics into the run folder).
