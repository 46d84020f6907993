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
# # Bayesian classification on the spiral: entropy and mutual information
#
# Three interleaved spiral arms, one class each (the data of the NumPyro BNN lecture). A plain
# network fits them and then stays confident everywhere, also far from any data: after (almost)
# every training point is classified correctly, the cross-entropy keeps falling by making the
# softmax sharper. A Bayesian network averages the softmax over weight samples instead, and
# where the samples disagree it is uncertain.
#
# For a classifier `uq_box` splits the uncertainty of the averaged prediction
# $\bar p = \frac{1}{S}\sum_s p_s$ into
#
# - total: the **predictive entropy** $H[\bar p]$ (`pred_uct`);
# - aleatoric: the **expected entropy** $\frac{1}{S}\sum_s H[p_s]$ (`aleatoric_uct`), high where
#   every sample is unsure (class overlap);
# - epistemic: the **mutual information** $H[\bar p] - \frac{1}{S}\sum_s H[p_s]$
#   (`epistemic_uct`), high where the samples are each sure but disagree.
#
# Set `UQ_BOX_FAST=1` for a quick run with fewer epochs (what the tests do).

# %%
import os
from functools import partial
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from lightning import Trainer
from lightning.pytorch import seed_everything
from torch import nn

from uq_box.datamodules import SpiralDatamodule
from uq_box.methods import BNNVIClassification, DeterministicClassification
from uq_box.models import MLP
from uq_box.viz import plot_decision_surface

FAST = os.environ.get("UQ_BOX_FAST", "0") == "1"  # the tests' quick mode
FIGURES = os.environ.get("UQ_BOX_FIGURES")  # folder for the figures the docs show


def show(fig: plt.Figure, name: str) -> None:
    """Save ``fig`` for the docs when ``UQ_BOX_FIGURES`` is set; close it outside Jupyter."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIGURES) / f"03_{name}.png", dpi=80, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)


EPOCHS = 150 if FAST else 300
SWEEP_EPOCHS = 40 if FAST else 300  # per model of the prior-scale and width sweeps

# %% [markdown]
# ## Data
#
# 300 points (100 per arm), 240 for training; `grid()` covers the data and a margin around it,
# for the maps.

# %%
dm = SpiralDatamodule(n_points=300, batch_size=64, seed=0)
grid = dm.grid(resolution=80, margin=0.75)
extent = dm.grid_extent(margin=0.75)
# grid points farther than 0.25 from every training point: "far from the data"
far = torch.cdist(grid, dm.X_train).min(1).values > 0.25
print(f"{len(dm.X_train)} training points; {int(far.sum())} of {len(grid)} grid points are far")


def fit(method, epochs):
    """Train without validation (the checks use the test split and the grid)."""
    Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    ).fit(method, dm)
    return method


def accuracy(method) -> float:
    """Test accuracy of the mean prediction."""
    return (method.predict_step(dm.X_test)["pred"].argmax(-1) == dm.Y_test).float().mean().item()


# %% [markdown]
# ## A deterministic network
#
# Two hidden layers of 64 ReLU units, cross-entropy, Adam.

# %%
seed_everything(0)
deterministic = fit(
    DeterministicClassification(
        MLP(n_inputs=2, n_hidden=[64, 64], n_outputs=3, activation_fn=nn.ReLU()),
        optimizer=partial(torch.optim.Adam, lr=2e-2),
    ),
    EPOCHS,
)
det = deterministic.predict_step(grid)
fig = plot_decision_surface(
    dm.X_train, dm.Y_train, grid, det["pred"], det["pred_uct"], grid_extent=extent,
    title=f"Deterministic network (test accuracy {accuracy(deterministic):.2f})",
)  # fmt: skip
show(fig, "deterministic")

# %% [markdown]
# Its entropy is high only on thin lines between the arms (where the logits of two classes
# cross) and low everywhere else, however far from the data. One network, one sample: its
# mutual information is zero by construction.

# %% [markdown]
# ## A Bayesian network
#
# The same architecture with every layer mean-field Gaussian (`stochastic_module_names=None`),
# a $\mathcal{N}(0, 3^2)$ prior on every weight, the local reparameterization trick
# (`estimator="local"`: it samples the pre-activations instead of the weights, a cheaper and
# less noisy gradient) and 50 weight samples per prediction.

# %%


def bnn(n_hidden=(64, 64), prior=3.0):
    """A fully Bayesian MLP classifier for the spiral."""
    return BNNVIClassification(
        MLP(n_inputs=2, n_hidden=list(n_hidden), n_outputs=3, activation_fn=nn.ReLU()),
        optimizer=partial(torch.optim.Adam, lr=2e-2),
        stochastic_module_names=None,
        prior=prior,
        posterior_rho_init=-3.0,
        estimator="local",
        num_mc_samples_train=4,
        num_mc_samples_test=50,
    )


seed_everything(0)
bayesian = fit(bnn(), EPOCHS)
bay = bayesian.predict_step(grid)
bnn_accuracy = accuracy(bayesian)
fig = plot_decision_surface(
    dm.X_train, dm.Y_train, grid, bay["pred"], bay["pred_uct"], grid_extent=extent,
    title=f"Bayesian network (test accuracy {bnn_accuracy:.2f})",
)  # fmt: skip
show(fig, "bnn_entropy")

# %% [markdown]
# The predictive entropy now grows away from the arms. Its epistemic part, the mutual
# information, shows where this comes from: the weight samples agree on the data and disagree
# away from it.

# %%
fig = plot_decision_surface(
    dm.X_train, dm.Y_train, grid, bay["pred"], bay["epistemic_uct"], grid_extent=extent,
    title="Bayesian network: mutual information (epistemic)",
    uncertainty_label="mutual information",
)  # fmt: skip
show(fig, "bnn_mutual_information")

# %%
on_train = bayesian.predict_step(dm.X_train)
summary = {
    "deterministic entropy far": det["pred_uct"][far].mean().item(),
    "BNN entropy far": bay["pred_uct"][far].mean().item(),
    "BNN mutual information far": bay["epistemic_uct"][far].mean().item(),
    "BNN mutual information on the training points": on_train["epistemic_uct"].mean().item(),
}
print({k: round(v, 3) for k, v in summary.items()}, "BNN accuracy", bnn_accuracy)
assert accuracy(deterministic) > 0.85 and bnn_accuracy > 0.85
assert summary["BNN entropy far"] > summary["deterministic entropy far"]
assert (
    summary["BNN mutual information far"]
    > 2 * summary["BNN mutual information on the training points"]
)

# %% [markdown]
# ## The prior scale
#
# The prior's standard deviation sets how large the weights may be. Too small and the network
# cannot bend enough to follow the arms (extreme regularization: the maps stay uncertain
# everywhere); large enough and the arms are fitted, with uncertainty growing away from them.
# The maps below show the predictive entropy of one BNN per prior scale.


# %%
def entropy_maps(models: dict, title: str) -> plt.Figure:
    """One predictive-entropy map per fitted model, with the training data on top."""
    fig, axes = plt.subplots(
        1, len(models), figsize=(3.4 * len(models), 3.4), constrained_layout=True, squeeze=False
    )
    side = int(len(grid) ** 0.5)
    for ax, (name, model) in zip(axes[0], models.items(), strict=True):
        entropy = model.predict_step(grid)["pred_uct"].reshape(side, side)
        image = ax.imshow(
            entropy, origin="lower", extent=extent, cmap="viridis", vmin=0, vmax=torch.log(
                torch.tensor(3.0)).item(), aspect="auto",
        )  # fmt: skip
        ax.scatter(*dm.X_train.T, c=[f"C{k}" for k in dm.Y_train], s=5, edgecolors="black",
                   linewidths=0.3)  # fmt: skip
        ax.set_title(f"{name}\ntest accuracy {accuracy(model):.2f}", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes[0].tolist(), label="predictive entropy")
    fig.suptitle(title)
    return fig


prior_models = {}
for prior in (0.1, 1.0, 3.0, 10.0):
    seed_everything(0)
    prior_models[f"prior N(0, {prior:g}²)"] = fit(bnn(prior=prior), SWEEP_EPOCHS)
show(entropy_maps(prior_models, "Effect of the prior scale"), "prior_scale")

# %% [markdown]
# ## The width
#
# One hidden layer of 2, 10 or 100 units. Too few units cannot represent three arms; more units
# add flexibility, and the prior keeps the wider network from overfitting: the uncertainty away
# from the data stays.

# %%
width_models = {}
for width in (2, 10, 100):
    seed_everything(0)
    width_models[f"{width} hidden units"] = fit(bnn(n_hidden=(width,)), SWEEP_EPOCHS)
show(entropy_maps(width_models, "Effect of the width (prior N(0, 3²))"), "width")

# %%
prior_acc = {name: accuracy(m) for name, m in prior_models.items()}
width_acc = {name: accuracy(m) for name, m in width_models.items()}
print(prior_acc, width_acc)
# a tiny prior scale and a 2-unit layer both underfit the spiral
assert prior_acc["prior N(0, 0.1²)"] < prior_acc["prior N(0, 3²)"]
assert width_acc["2 hidden units"] < width_acc["100 hidden units"]
