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
# # Digits: MAP, MC dropout, BNN, deep ensembles and SGLD under rotation
#
# The experiments of the Bayesian-Neural-Networks repository (MNIST) on scikit-learn's 8x8
# digits, which ship with scikit-learn and need no download: five ways to train one small CNN,
# their test accuracy and calibration, and what happens to their uncertainty when the test
# digits are rotated further and further away from anything seen in training (an
# out-of-distribution shift).
#
# - **MAP**: one network, cross-entropy (plus the implicit prior of weight decay: none here).
# - **MC dropout**: dropout kept on at test time, 30 masks.
# - **BNN**: Bayes by Backprop, every layer mean-field Gaussian, local reparameterization.
# - **Deep ensemble**: 5 networks from different random initializations, trained together.
# - **SGLD**: preconditioned stochastic gradient Langevin dynamics; the posterior samples it
#   visits after burn-in are the ensemble.
#
# Set `UQ_BOX_FAST=1` for a quick run with fewer epochs and angles (what the tests do).

# %%
import os
from functools import partial
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import torch
from lightning import Trainer
from lightning.pytorch import seed_everything

from uq_box.datamodules import DigitsDatamodule
from uq_box.methods import (
    BNNVIClassification,
    DeepEnsembleClassification,
    DeterministicClassification,
    MCDropoutClassification,
    SGMCMCClassification,
)
from uq_box.metrics.functional_classification import (
    expected_calibration_error,
    multiclass_nll,
    ood_auroc,
)
from uq_box.models import CNN
from uq_box.nn import pruning_curve, sample_forward
from uq_box.optim import SGLD
from uq_box.viz import (
    plot_reliability_diagram,
    plot_rotated_examples,
    plot_uncertainty_vs_rotation,
    plot_weight_histograms,
)

FAST = os.environ.get("UQ_BOX_FAST", "0") == "1"  # the tests' quick mode
FIGURES = os.environ.get("UQ_BOX_FIGURES")  # folder for the figures the docs show


def show(fig: plt.Figure, name: str) -> None:
    """Save ``fig`` for the docs when ``UQ_BOX_FIGURES`` is set; close it outside Jupyter."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIGURES) / f"05_{name}.png", dpi=80, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)


EPOCHS = 8 if FAST else 30
ANGLES = list(range(0, 181, 45 if FAST else 15))
adam = partial(torch.optim.Adam, lr=3e-3)

# %% [markdown]
# ## Data
#
# 1797 images of 8x8 pixels, split 70/10/20 into training, validation and test sets (stratified
# by class). `rotated_test(angle)` rotates the test images; at 90 degrees and more most digits
# no longer look like any training digit.

# %%
dm = DigitsDatamodule(batch_size=64, seed=0)
print({split: len(dm.split(split)[0]) for split in ("train", "val", "test")})
examples = [dm.rotated_test(angle)[0][:8] for angle in (0, 45, 90, 135, 180)]
fig = plot_rotated_examples(examples, [0, 45, 90, 135, 180], labels=dm.Y_test[:8])
show(fig, "rotated_examples")

# %% [markdown]
# ## Training
#
# The backbone: `uq_box.models.CNN`, two 3x3 convolution blocks (16 and 32 channels) and a
# hidden layer of 64 units. For MC dropout it has dropout after every activation.


# %%
def fit(method, epochs=EPOCHS):
    """Train with a quiet Trainer (validation each epoch); return the method."""
    seed_everything(0, verbose=False)
    Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(method, dm)
    return method


seed_everything(0)
methods = {
    "MAP": fit(DeterministicClassification(CNN(), optimizer=adam)),
    "MC dropout": fit(
        MCDropoutClassification(CNN(dropout_p=0.25), optimizer=adam, num_mc_samples_test=30)
    ),
    "BNN": fit(
        BNNVIClassification(
            CNN(),
            optimizer=partial(torch.optim.Adam, lr=1e-2),
            stochastic_module_names=None,
            prior=1.0,
            posterior_rho_init=-5.0,
            estimator="local",
            num_mc_samples_train=2,
            num_mc_samples_test=30,
        ),
        epochs=2 * EPOCHS,
    ),
    "Deep ensemble": fit(DeepEnsembleClassification(CNN(), optimizer=adam, num_members=5)),
    "SGLD": fit(
        SGMCMCClassification(
            CNN(),
            optimizer=partial(SGLD, lr=1e-3, preconditioned=True),
            prior=1.0,
            burnin_epochs=EPOCHS // 2,
            thinning=4,
            max_num_samples=30,
        ),
        epochs=2 * EPOCHS,
    ),
}

# %% [markdown]
# ## Test accuracy and calibration
#
# Accuracy, negative log-likelihood and expected calibration error (ECE: the gap between
# confidence and accuracy, averaged over confidence bins) on the unrotated test set.

# %%
test_preds = {name: m.predict_step(dm.X_test) for name, m in methods.items()}
table = pd.DataFrame(
    {
        name: {
            "accuracy": (p["pred"].argmax(-1) == dm.Y_test).float().mean().item(),
            "NLL": multiclass_nll(p["pred"], dm.Y_test).item(),
            "ECE": expected_calibration_error(p["pred"], dm.Y_test).item(),
        }
        for name, p in test_preds.items()
    }
).T.round(4)
print(table.to_string())

# %%
fig = plot_reliability_diagram(test_preds["MAP"]["pred"], dm.Y_test, title="MAP network")
show(fig, "reliability_map")

# %% [markdown]
# ## Rotation: uncertainty out of distribution
#
# For every angle: the accuracy on the rotated test set and the mean of the three
# uncertainties of the prediction contract: the predictive entropy (total), the expected
# entropy (aleatoric) and the mutual information (epistemic).

# %%
curves = {name: {"accuracy": [], "total": [], "aleatoric": [], "epistemic": []} for name in methods}
for angle in ANGLES:
    x, y = dm.rotated_test(angle)
    for name, method in methods.items():
        p = method.predict_step(x)
        curves[name]["accuracy"].append((p["pred"].argmax(-1) == y).float().mean().item())
        curves[name]["total"].append(p["pred_uct"].mean().item())
        curves[name]["aleatoric"].append(p["aleatoric_uct"].mean().item())
        curves[name]["epistemic"].append(p["epistemic_uct"].mean().item())

fig = plot_uncertainty_vs_rotation(
    ANGLES, {name: c["accuracy"] for name, c in curves.items()}, ylabel="test accuracy",
    title="Accuracy on rotated digits",
)  # fmt: skip
show(fig, "rotation_accuracy")

# %% [markdown]
# Accuracy falls for every method as the digits rotate. What differs is whether the model
# notices: the entropy decomposition below shows the total uncertainty and its two parts.
# The MAP network has no epistemic part at all; its only way to be uncertain is a flatter
# softmax. The methods that average over several networks (samples, masks or members) show a
# mutual information that grows as the digits rotate: the networks agree on the digits they were
# trained on and disagree on rotated ones. It peaks at intermediate angles; some digits rotated
# by 180 degrees look like digits again (a 6 becomes a 9, a 0 stays a 0).

# %%
fig = plot_uncertainty_vs_rotation(
    ANGLES,
    {
        name: {
            "total (predictive entropy)": c["total"],
            "aleatoric (expected entropy)": c["aleatoric"],
            "epistemic (mutual information)": c["epistemic"],
        }
        for name, c in curves.items()
    },
    ylabel="mean uncertainty (nats)",
    title="Entropy decomposition on rotated digits",
)
show(fig, "rotation_entropy")

# %% [markdown]
# ## Detecting rotated digits
#
# How well does each method's uncertainty separate the unrotated test digits (in
# distribution) from the same digits rotated by 60 degrees? The AUROC of the predictive
# entropy as a detector: 0.5 is chance, 1 is perfect.

# %%
rotated_x, _ = dm.rotated_test(60)
auroc = {}
for name, method in methods.items():
    rotated = method.predict_step(rotated_x)
    auroc[name] = ood_auroc(test_preds[name]["pred_uct"], rotated["pred_uct"]).item()
table["AUROC rot. 60°"] = pd.Series(auroc).round(3)
print(table.to_string())

# %% [markdown]
# ## Weight distributions
#
# Histograms of the weights of each trained network: the posterior means of the BNN and 10
# draws from its posterior per weight, the last SGLD sample, and the plain weights of the others
# (all members of the ensemble). The right panel shows the BNN's signal-to-noise ratio
# $|\mu| / \sigma$ per weight, in decibels, which pruning ranks weights by.

# %%
networks = {name: method.model for name, method in methods.items()}
fig = plot_weight_histograms(networks, num_samples=10, snr=True, log_density=True)
show(fig, "weights")

# %% [markdown]
# ## Pruning by signal-to-noise ratio
#
# Blundell et al. (2015) remove the weights of lowest signal-to-noise ratio first: a weight whose
# posterior is wide compared to its mean carries little. `uq_box.nn.pruning_curve` prunes a
# copy of the network at each fraction and evaluates it; random pruning of as many weights is the
# control.

# %%
bnn_network = methods["BNN"].model
test_x, test_y = dm.X_test, dm.Y_test


def bnn_accuracy(network) -> float:
    """Test accuracy of the averaged prediction of 30 weight samples."""
    with torch.no_grad():
        probs = sample_forward(network, test_x, 30).softmax(-1).mean(0)
    return (probs.argmax(-1) == test_y).float().mean().item()


fractions = [0.0, 0.5, 0.75, 0.9, 0.95, 0.98]
by_snr = pruning_curve(bnn_network, fractions, bnn_accuracy, method="snr")
at_random = pruning_curve(
    bnn_network, fractions, bnn_accuracy, method="random",
    generator=torch.Generator().manual_seed(0),
)  # fmt: skip
fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
ax.plot([100 * f for f in fractions], by_snr, marker="o", label="lowest SNR first")
ax.plot([100 * f for f in fractions], at_random, marker="o", label="at random")
ax.set_xlabel("weights pruned (%)")
ax.set_ylabel("test accuracy")
ax.set_title("Pruning the BNN")
ax.legend()
show(fig, "pruning")
print(
    {
        f"{100 * f:g}%": (round(a, 3), round(b, 3))
        for f, a, b in zip(fractions, by_snr, at_random, strict=True)
    }
)

# %%
# every method learns the digits, even in the fast mode
assert (table["accuracy"] > 0.85).all(), table
# accuracy falls and the uncertainty grows as the digits rotate away
for name, c in curves.items():
    assert c["accuracy"][ANGLES.index(90)] < c["accuracy"][0] - 0.3, name
    assert c["total"][ANGLES.index(90)] > c["total"][0], name
# the averaging methods have an epistemic part, and it grows under rotation
for name in ("MC dropout", "BNN", "Deep ensemble", "SGLD"):
    rotated_mean = sum(curves[name]["epistemic"][1:]) / (len(ANGLES) - 1)
    assert rotated_mean > 1.5 * curves[name]["epistemic"][0], name
assert all(value == 0 for value in curves["MAP"]["epistemic"])
# the uncertainty flags rotated digits better than chance
assert all(value > 0.6 for value in auroc.values()), auroc
# half of the BNN's weights go at almost no cost when the lowest SNR go first, unlike at random
assert by_snr[fractions.index(0.5)] > by_snr[0] - 0.05, by_snr
assert by_snr[fractions.index(0.75)] > at_random[fractions.index(0.75)], (by_snr, at_random)
