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
# # Data with a gap: a NUTS reference, variational inference, and Bayesian updating
#
# Observations on two intervals with nothing in between (the data of the Pyro BNN tutorial).
# A good posterior is confident on the data and uncertain in the gap: *in-between
# uncertainty*. Two questions:
#
# 1. **How close does variational inference get to the true posterior?** The reference is NUTS,
#    the No-U-Turn sampler, a Hamiltonian Monte Carlo method that samples the exact posterior of
#    the same small network (`uq_box.reference.NUTSReference`, through Pyro). Mean-field VI
#    (`BNNVIRegression`) is the approximation under test.
# 2. **Can a posterior become the next prior?** When new data arrive (here: in the gap), Bayes'
#    rule says $p(w \mid D, D') \propto p(D' \mid w)\, p(w \mid D)$: train on the new data alone
#    with the old posterior as the prior (`uq_box.nn.posterior_as_prior`).
#
# NUTS needs the `pyro` extra (`pip install 'uq_box[pyro]'`). Set `UQ_BOX_FAST=1` for a quick run
# with short chains and fewer epochs (what the tests do); the full run takes a few minutes, most
# of it NUTS.

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

from uq_box.datamodules import ToyGapDatamodule
from uq_box.losses import NLL
from uq_box.methods import BNNVIRegression
from uq_box.models import MLP
from uq_box.nn import posterior_as_prior
from uq_box.reference import NUTSReference
from uq_box.viz import plot_predictions_comparison
from uq_box.viz.mcmc import plot_traces

FAST = os.environ.get("UQ_BOX_FAST", "0") == "1"  # the tests' quick mode
FIGURES = os.environ.get("UQ_BOX_FIGURES")  # folder for the figures the docs show


def show(fig: plt.Figure, name: str) -> None:
    """Save ``fig`` for the docs when ``UQ_BOX_FIGURES`` is set; close it outside Jupyter."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIGURES) / f"06_{name}.png", dpi=80, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)


VI_EPOCHS = 1200 if FAST else 3000  # full-batch steps of VI on the first data
UPDATE_EPOCHS = 400 if FAST else 1000  # steps on the new data
NUTS = dict(num_chains=2, num_warmup=50, num_samples=50, max_tree_depth=6) if FAST else dict(
    num_chains=4, num_warmup=200, num_samples=200, max_tree_depth=8
)  # fmt: skip
seed_everything(0)

# %% [markdown]
# ## Data
#
# `ToyGapDatamodule`: $y = x + 0.3\sin(2\pi x) + 0.3\sin(4\pi x) + \varepsilon$ with noise std
# 0.02, observed on $[-0.2, 0.2]$ and $[0.6, 1.0]$. 100 training points keep NUTS fast.
# `X_gap`/`Y_gap` are new observations inside the gap, for the updating experiment.

# %%
dm = ToyGapDatamodule(n_points=100, batch_size=100, n_gap=50)
x, truth = dm.X_gtext, dm.Y_gtext
in_gap = dm.in_gap(x).squeeze(-1)
on_data = ((x > -0.2) & (x < 0.2) | (x > 0.6) & (x < 1.0)).squeeze(-1)

fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
ax.plot(x, truth, color="tab:blue", lw=2, label="true function")
ax.scatter(dm.X_train, dm.Y_train, s=10, color="black", label="observations", zorder=3)
ax.scatter(dm.X_gap, dm.Y_gap, s=10, color="tab:red", label="new observations (later)", zorder=3)
ax.axvspan(*dm.gap_bounds, color="gray", alpha=0.15, label="gap")
ax.set_xlabel("x")
ax.set_ylabel("y")
ax.legend(loc="lower right")
show(fig, "data")

# %% [markdown]
# ## The model
#
# One hidden layer of 10 tanh units, a $\mathcal{N}(0, 5^2)$ prior on every weight and bias, and
# a Gaussian likelihood with the known noise std 0.02, for both NUTS and VI.

# %%
PRIOR_SCALE = 5.0


def backbone() -> MLP:
    """The small network both methods share."""
    return MLP(n_inputs=1, n_hidden=[10], n_outputs=1, activation_fn=nn.Tanh())


# %% [markdown]
# ## The reference: NUTS
#
# `NUTSReference` samples the flat parameter vector of the backbone with Pyro's NUTS (step size
# and diagonal mass matrix adapted during warmup), several chains one after another.

# %%
reference = NUTSReference(
    backbone(), prior_scale=PRIOR_SCALE, noise=dm.noise_std, seed=0, **NUTS
).fit(dm.X_train, dm.Y_train)
print(f"{reference.num_parameters} parameters, {reference.num_divergences} divergences")
for diagnostics in reference.chain_diagnostics:
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in diagnostics.items()})

# %% [markdown]
# **Diagnostics.** `r_hat` compares the variance within and between chains (about 1 when they
# agree); `n_eff` is the effective number of independent draws. For the *weights* of a network
# `r_hat` is often large even when all is well: hidden units can be permuted or flip sign, and
# each chain keeps to one of these equivalent modes. The *predictions* are free of these
# symmetries: their `r_hat` is the one to check. Below, at an input on the data, in the gap, on
# the data again and beyond the data: the chains agree where there are data, and may disagree
# in the gap and beyond. That is no symmetry but a multimodal posterior, several different
# explanations of the missing data, which one chain of a few hundred draws does not cross
# between. Pooling the chains gives a rough mixture of these modes; more and longer chains a
# better one.

# %%
weights = reference.summary()
print(weights.head(8).round(3).to_string())
checkpoints = torch.tensor([[-0.1], [0.4], [0.8], [1.3]])  # data, gap, data, beyond
outputs = reference.prediction_summary(checkpoints)
print(outputs.round(3).to_string())

# %%
fig = plot_traces(reference.samples, reference.flat_names, max_params=4)
show(fig, "traces")

# %% [markdown]
# ## Variational inference
#
# Bayes by Backprop with every layer mean-field Gaussian and the same prior and likelihood
# (`NLL(std=0.02)` with a one-output network), trained full batch.

# %%
vi = BNNVIRegression(
    backbone(),
    criterion=NLL(std=dm.noise_std),
    optimizer=partial(torch.optim.Adam, lr=3e-2),
    stochastic_module_names=None,
    prior=PRIOR_SCALE,
    num_mc_samples_train=4,
    num_mc_samples_test=100,
)


def fit(method, datamodule, epochs):
    """Train quietly, without validation."""
    Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    ).fit(method, datamodule)
    return method


fit(vi, dm, VI_EPOCHS)

# %% [markdown]
# ## NUTS against VI
#
# Both fit the data. NUTS is several times more uncertain in the gap than on the data, and far
# more beyond the data; mean-field VI is about as confident in the gap as on the data, and
# confident beyond it. This is a known failure of factorized Gaussian
# posteriors for one-hidden-layer networks (Foong et al. 2019, "In-between uncertainty in
# Bayesian neural networks"): a diagonal Gaussian cannot express the correlated weight
# uncertainty that widens the predictive in between.

# %%
preds = {"NUTS (reference)": reference.predict(x), "mean-field VI": vi.predict_step(x)}
fig = plot_predictions_comparison(dm.X_train, dm.Y_train, x, truth, preds, ncols=2)
for ax in fig.axes:
    ax.axvspan(*dm.gap_bounds, color="gray", alpha=0.1)
    ax.set_ylim(-1.5, 2.5)
show(fig, "nuts_vs_vi")


# %%
def report(p: dict) -> dict:
    """Mean epistemic std in the gap and on the data, and the RMSE on the data."""
    return {
        "epistemic gap": p["epistemic_uct"][in_gap].mean().item(),
        "epistemic data": p["epistemic_uct"][on_data].mean().item(),
        "RMSE data": (p["pred"] - truth)[on_data].square().mean().sqrt().item(),
        "RMSE gap": (p["pred"] - truth)[in_gap].square().mean().sqrt().item(),
    }


summary = {name: report(p) for name, p in preds.items()}
for name, values in summary.items():
    print(f"{name:18s}", {k: round(v, 4) for k, v in values.items()})
ratio = {name: s["epistemic gap"] / s["epistemic data"] for name, s in summary.items()}
print("epistemic std, gap / data:", {k: round(v, 2) for k, v in ratio.items()})

# %% [markdown]
# ## Bayesian updating: the posterior as the next prior
#
# New observations arrive in the gap. Instead of training on all the data again, set every
# Bayesian layer's prior to its current posterior, $\mathcal{N}(\mu, \sigma^2)$ elementwise, and
# train on the new data alone: the prior now carries what the old data taught. For comparison,
# the same network trained on the new data alone from the original prior.

# %%
before = vi.predict_step(x)
posterior_as_prior(vi)
vi.optimizer = partial(torch.optim.Adam, lr=3e-3)  # small steps from the old posterior
new_data = dm.gap_datamodule(batch_size=len(dm.X_gap))
fit(vi, new_data, UPDATE_EPOCHS)
updated = vi.predict_step(x)

seed_everything(0)
scratch = BNNVIRegression(
    backbone(),
    criterion=NLL(std=dm.noise_std),
    optimizer=partial(torch.optim.Adam, lr=3e-2),
    stochastic_module_names=None,
    prior=PRIOR_SCALE,
    num_mc_samples_train=4,
    num_mc_samples_test=100,
)
fit(scratch, new_data, UPDATE_EPOCHS)

updates = {
    "VI on the first data": before,
    "updated with the new data": updated,
    "new data only, original prior": scratch.predict_step(x),
}
fig = plot_predictions_comparison(
    torch.cat([dm.X_train, dm.X_gap]), torch.cat([dm.Y_train, dm.Y_gap]), x, truth, updates
)
for ax in fig.axes:
    ax.axvspan(*dm.gap_bounds, color="gray", alpha=0.1)
    ax.set_ylim(-1.5, 2.5)
show(fig, "updating")
update_summary = {name: report(p) for name, p in updates.items()}
for name, values in update_summary.items():
    print(f"{name:30s}", {k: round(v, 4) for k, v in values.items()})

# %% [markdown]
# The update fits the gap and keeps much of the old fit, far more than the network that saw
# only the new data, which knows nothing about the two intervals. It does not keep all of it: a
# mean-field posterior as prior remembers each weight's range but not how the weights varied
# together, so fitting the gap moves the function on the old data too. Training on all the data
# at once, or a richer posterior, does better; the recursive update is the cheap approximation.

# %%
nuts, mfvi = summary["NUTS (reference)"], summary["mean-field VI"]
# NUTS fits the data and is clearly more uncertain in the gap than on the data ...
assert nuts["RMSE data"] < 0.2, nuts
assert ratio["NUTS (reference)"] > 2.0, ratio
# ... much more so than mean-field VI
assert ratio["NUTS (reference)"] > 1.5 * ratio["mean-field VI"], ratio
# the update learns the gap, and remembers the old data better than starting over
first, after = update_summary["VI on the first data"], update_summary["updated with the new data"]
assert after["RMSE gap"] < first["RMSE gap"], update_summary
assert after["RMSE data"] < update_summary["new data only, original prior"]["RMSE data"]
