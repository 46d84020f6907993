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
# # Dense prediction: uncertainty per pixel and risk-controlling prediction sets
#
# A segmentation network predicts a class distribution for every pixel, so every pixel gets the
# uncertainty split that a classifier's point gets: the predictive entropy (total), the expected
# entropy (aleatoric) and the mutual information (epistemic). This notebook
#
# 1. trains a small U-Net with MC dropout on the toy segmentation data (disks and squares on a
#    striped, noisy background, with soft boundaries whose pixels are labeled at random);
# 2. draws the six-panel plot (image, target, prediction, aleatoric, epistemic, error) and the
#    sparsification curves;
# 3. checks that the aleatoric uncertainty sits on the shapes' edges and the epistemic one on
#    triangles, a shape never seen in training;
# 4. wraps the fitted method in `ConformalSegmentation`: pixel prediction sets whose expected
#    per-image false-negative rate is at most `alpha` (conformal risk control, Angelopoulos et
#    al. 2022).
#
# See the [user guide](../user-guide/dense.md). Set `UQ_BOX_FAST=1` for a quick run with
# smaller images and fewer epochs (what the tests do).

# %%
import os
from functools import partial
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from lightning import Trainer
from lightning.pytorch import seed_everything

from uq_box.datamodules import ToySegmentationDatamodule
from uq_box.methods import ConformalSegmentation, MCDropoutSegmentation
from uq_box.methods.conformal_dense import (
    pixel_false_negative_rate,
    risk_control_threshold,
    segmentation_scores,
)
from uq_box.metrics.dense import dense_sparsification_curves
from uq_box.models import UNet
from uq_box.viz.dense import plot_dense_predictions, plot_sparsification

FAST = os.environ.get("UQ_BOX_FAST", "0") == "1"  # the tests' quick mode
FIGURES = os.environ.get("UQ_BOX_FIGURES")  # folder for the figures the docs show


def show(fig: plt.Figure, name: str) -> None:
    """Save ``fig`` for the docs when ``UQ_BOX_FIGURES`` is set; close it outside Jupyter."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIGURES) / f"08_{name}.png", dpi=80, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)


SIZE = 24 if FAST else 32
EPOCHS = 10 if FAST else 30
N_TRAIN = 128 if FAST else 256

# %% [markdown]
# ## Data
#
# `ood=True` draws the test images with triangles as well (their pixels are unlabeled and marked
# in `data.ood_mask_test`). The validation split has no triangles: it is the calibration set of
# the conformal step below. `data.boundary_mask_test` marks the ambiguous boundary pixels.

# %%
data = ToySegmentationDatamodule(
    n_train=N_TRAIN, n_val=100, n_test=64, image_size=SIZE, ood=True, batch_size=16, seed=0
)
print(f"train {list(data.X_train.shape)}, labels {list(data.Y_train.shape)}")
print(f"OOD pixels in the test images: {int(data.ood_mask_test.sum())}")

# %% [markdown]
# ## MC dropout on a U-Net
#
# Dropout only in the bottleneck and the decoder (`dropout_at="decoder"`): the encoder runs once
# per batch, and the `S = 16` masks run as one batched call of the decoder.

# %%
seed_everything(0)
method = MCDropoutSegmentation(
    UNet(in_channels=1, out_channels=3, depth=2, width=16, dropout_p=0.2, dropout_at="decoder"),
    optimizer=partial(torch.optim.Adam, lr=3e-3),
    num_mc_samples_test=16,
)
Trainer(
    max_epochs=EPOCHS,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=0,
    num_sanity_val_steps=0,
).fit(method, data)
preds = method.predict_step(data.X_test)
labeled = data.Y_test != data.ignore_index
accuracy = (preds["pred"].argmax(1) == data.Y_test)[labeled].float().mean().item()
print(f"pixel accuracy on the labeled test pixels: {accuracy:.3f}")
assert accuracy > 0.8

# %% [markdown]
# ## Six panels per image
#
# Image, target (unlabeled triangle pixels grey), predicted labels, aleatoric map (expected
# entropy), epistemic map (mutual information) and the wrong pixels.

# %%
order = data.ood_mask_test.flatten(1).sum(1).argsort(descending=True)  # triangles first
shown = torch.cat([order[:2], order[-2:]])
fig = plot_dense_predictions(
    data.X_test[shown], data.Y_test[shown], {k: v[shown] for k, v in preds.items() if k != "logits"},
    title="MC dropout U-Net, test images (top two with triangles)",
)  # fmt: skip
show(fig, "six_panels")

# %% [markdown]
# ## Where the uncertainty sits
#
# The boundary pixels are labeled at random in proportion to the shape's membership: every
# dropout mask is unsure there, so the *aleatoric* part is high on the edges. The triangles were
# never seen in training: the masks disagree there, so the *epistemic* part is high on them
# (per pixel mean, in nats).

# %%
boundary, ood = data.boundary_mask_test, data.ood_mask_test
interior = labeled & ~boundary
aleatoric, epistemic = preds["aleatoric_uct"], preds["epistemic_uct"]
table = {
    "interior": (aleatoric[interior].mean(), epistemic[interior].mean()),
    "boundary": (aleatoric[boundary].mean(), epistemic[boundary].mean()),
    "triangle (OOD)": (aleatoric[ood].mean(), epistemic[ood].mean()),
}
for name, (a, e) in table.items():
    print(f"{name:>15}: aleatoric {a:.3f}, epistemic {e:.4f}")
assert table["boundary"][0] > 2 * table["interior"][0]
assert table["triangle (OOD)"][1] > 2 * table["interior"][1]

# %% [markdown]
# ## Sparsification
#
# Remove the most uncertain pixels first and follow the error of the pixels kept; the oracle
# removes the wrong pixels first. The area between a curve and the oracle (AUSE) is 0 for an
# uncertainty that orders the pixels as their errors do.

# %%
curves = dense_sparsification_curves(preds, data.Y_test, data.ignore_index)
fig = plot_sparsification(curves, title="Sparsification, MC dropout U-Net")
show(fig, "sparsification")
for name, curve in curves.items():
    print(f"AUSE {name}: {float(curve['ause']):.4f}")

# %% [markdown]
# ## Conformal risk control of the false-negative rate
#
# A pixel's prediction set is `{c : p_c >= 1 - lambda}`; the loss of an image is its
# false-negative rate, the share of its labeled pixels whose label is not in the set. On `n`
# calibration images `ConformalSegmentation` picks the smallest `lambda` with
# `n / (n + 1) R(lambda) + 1 / (n + 1) <= alpha` (`R`: the mean FNR over the calibration
# images), and then the expected FNR of a new image is at most `alpha`. The images are the
# exchangeable units, not the pixels (neighbouring pixels share the image's content and errors):
# the guarantee is on the average over images of the per-image FNR.
#
# The validation split (no triangles) calibrates; the in-distribution test images are those of
# the same data module without `ood` (the same seed gives the same training and validation
# images).

# %%
alpha = 0.05
conformal = ConformalSegmentation(method, alpha=alpha).calibrate(data)  # the "val" split
in_distribution = ToySegmentationDatamodule(
    n_train=N_TRAIN, n_val=100, n_test=64, image_size=SIZE, ood=False, seed=0
)
sets = conformal.predict_step(in_distribution.X_test)
fnr = pixel_false_negative_rate(sets["pred_set"], in_distribution.Y_test)
size = sets["pred_set"].sum(1).float()
num_calibration = int(conformal.num_calibration_images)
print(f"lambda_hat = {conformal.threshold.item():.3f} ({num_calibration} calibration images)")
print(f"test FNR {fnr.mean():.4f} (alpha = {alpha}), mean set size {size.mean():.2f} classes")
argmax_fnr = 1 - (sets["pred"].argmax(1) == in_distribution.Y_test).float().flatten(1).mean(1)
print(f"FNR of the argmax label alone: {argmax_fnr.mean():.4f}")

fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
for ax, i in zip(axes, range(4), strict=True):
    image = ax.imshow(size[i], vmin=0, vmax=3, cmap="viridis")
    ax.set_title(f"set size, FNR {fnr[i]:.3f}")
    ax.axis("off")
fig.colorbar(image, ax=axes, shrink=0.8, label="classes in the set")
show(fig, "set_sizes")

# %% [markdown]
# The sets hold two classes on the shapes' edges and one elsewhere. One test set is one draw;
# the guarantee is over calibration sets and test images. With the predictions computed once,
# many random calibration/test splits of the 164 in-distribution images (validation + test)
# show it: the mean FNR over the splits is at most `alpha`.

# %%
pool_x = torch.cat([data.X_val, in_distribution.X_test])
pool_y = torch.cat([data.Y_val, in_distribution.Y_test])
scores = segmentation_scores(method.predict_step(pool_x)["pred"], pool_y)  # [n, H * W]
generator = torch.Generator().manual_seed(0)
risks = []
for _ in range(200 if FAST else 1000):
    perm = torch.randperm(len(scores), generator=generator)
    calib, test = scores[perm[:60]], scores[perm[60:]]
    lam = risk_control_threshold(calib, alpha)
    risks.append(((test > lam).sum(1) / (~test.isnan()).sum(1)).mean().item())
risks = torch.tensor(risks)
print(f"mean test FNR over {len(risks)} splits: {risks.mean():.4f} <= alpha = {alpha}")
assert risks.mean() <= alpha + 4 * risks.std() / len(risks) ** 0.5

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.hist(risks, bins=30, color="tab:blue", alpha=0.7)
ax.axvline(alpha, color="k", linestyle="--", label=f"alpha = {alpha}")
ax.axvline(risks.mean(), color="tab:red", label=f"mean {risks.mean():.4f}")
ax.set_xlabel("mean per-image FNR of the test images")
ax.set_ylabel("splits")
ax.legend()
show(fig, "risk_over_splits")
