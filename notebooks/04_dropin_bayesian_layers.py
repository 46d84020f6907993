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
# # Drop-in Bayesian layers: a Bayesian LeNet with `.kl`
#
# `uq_box.nn` is a drop-in for `torch.nn` (the flow of the `vinn` package): write a network as
# usual, swap `nn.Linear`/`nn.Conv2d`/`nn.Module` for `vinn.Linear`/`vinn.Conv2d`/`vinn.Module`,
# and every weight gets a mean-field Gaussian posterior, a prior from `torch.distributions`, and
# a `.kl`: the KL divergence of the posterior from the prior, on every Bayesian layer and, summed
# over all of them, on every `vinn.Module`. Training is a plain PyTorch loop on the ELBO; no
# Lightning needed.
#
# Then the uncertainty of the predictions, split as Kendall & Gal (2017) do into an aleatoric
# and an epistemic variance, and turned into a confidence score $c = 1 - 2\sqrt{u}$
# (Deodato et al. 2020).
#
# Set `UQ_BOX_FAST=1` for a quick run with fewer epochs (what the tests do).

# %%
import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F  # noqa: N812 -- the usual name
from torch import nn
from torch.distributions import Normal

import uq_box.nn as vinn
from uq_box.datamodules import DigitsDatamodule
from uq_box.methods.predictive_classification import confidence_score, variance_decomposition

FAST = os.environ.get("UQ_BOX_FAST", "0") == "1"  # the tests' quick mode
FIGURES = os.environ.get("UQ_BOX_FIGURES")  # folder for the figures the docs show


def show(fig: plt.Figure, name: str) -> None:
    """Save ``fig`` for the docs when ``UQ_BOX_FIGURES`` is set; close it outside Jupyter."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIGURES) / f"04_{name}.png", dpi=80, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)


EPOCHS = 8 if FAST else 15
torch.manual_seed(0)

# %% [markdown]
# ## The network
#
# LeNet, sized for scikit-learn's 8x8 digits (padding keeps 8x8 -> 4x4 -> 2x2). The comments
# show the plain `torch.nn` version: only the prefixes change. Each layer takes `torch.nn`'s
# arguments plus keyword-only Bayesian ones: `prior` (any `torch.distributions` object with a
# location and a scale; default `Normal(0, 1)`), `posterior_rho_init` and `estimator` (the local
# reparameterization trick by default).


# %%
class LeNet(vinn.Module):  # class LeNet(nn.Module):
    """LeNet for 8x8 images with Bayesian convolutions and linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = vinn.Conv2d(1, 6, 3, padding=1)  # nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = vinn.Conv2d(6, 16, 3, padding=1)  # nn.Conv2d(6, 16, 3, padding=1)
        self.fc1 = vinn.Linear(64, 120)  # nn.Linear(64, 120)
        self.fc2 = vinn.Linear(120, 84)  # nn.Linear(120, 84)
        self.fc3 = vinn.Linear(84, 10, prior=Normal(0.0, 1.0))  # nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


net = LeNet()
print(net)
print(f"KL of the posterior from the prior at initialization: {net.kl.item():.1f}")
print("per layer:", {name: round(layer.kl.item(), 1) for name, layer in net.named_children()
                     if hasattr(layer, "kl")})  # fmt: skip

# %% [markdown]
# `net.kl` is the sum of the layers' `.kl`, a differentiable scalar.

# %%
layers = [net.conv1, net.conv2, net.fc1, net.fc2, net.fc3]
torch.testing.assert_close(net.kl, sum(layer.kl for layer in layers))

# %% [markdown]
# ## Data
#
# The 8x8 digits, 1257 training images; `DigitsDatamodule.train_dataloader()` yields shuffled
# `{"input": x, "target": y}` batches sliced from tensors in memory.

# %%
dm = DigitsDatamodule(batch_size=32, seed=0)
data_loader = dm.train_dataloader()
print(f"{len(dm.X_train)} training images in {len(data_loader)} batches of up to 32")

# %% [markdown]
# ## The ELBO loop
#
# The negative ELBO is the negative log-likelihood of the whole training set plus the KL. On
# minibatch $i$ of $M$ it is estimated without bias by
# $\sum_{n \in B_i} -\log p(y_n \mid x_n, w) + \frac{1}{M}\,\mathrm{KL}(q \,\|\, p)$: the
# criterion must *sum* over the batch (`reduction="sum"`) and the KL is weighted by
# $\beta = 1/M$. (`uq_box.methods.BNNVIClassification` minimizes the same objective divided by
# the number of training points $N$, `mean NLL + KL / N`, which only rescales the gradient.)
# Every forward pass draws new weights.

# %%
criterion = nn.CrossEntropyLoss(reduction="sum")
optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
beta = torch.tensor(1.0 / len(data_loader))
history = []
for epoch in range(EPOCHS):
    totals = {"nll": 0.0, "kl": 0.0}
    for batch in data_loader:
        inputs, targets = batch["input"], batch["target"]
        optimizer.zero_grad()
        outputs = net(inputs)
        nll = criterion(outputs, targets)
        kl = net.kl
        elbo = nll + beta * kl
        elbo.backward()
        optimizer.step()
        totals["nll"] += nll.item()
        totals["kl"] += beta.item() * kl.item()
    history.append({k: v / len(dm.X_train) for k, v in totals.items()})
    if epoch % max(EPOCHS // 5, 1) == 0 or epoch == EPOCHS - 1:
        print(f"epoch {epoch:3d}: NLL per point {history[-1]['nll']:.3f}, KL per point "
              f"{history[-1]['kl']:.3f}")  # fmt: skip

# %%
fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
ax.plot([h["nll"] for h in history], label="NLL per training point")
ax.plot([h["kl"] for h in history], label="KL per training point")
ax.plot([h["nll"] + h["kl"] for h in history], label="negative ELBO per point", color="black")
ax.set_xlabel("epoch")
ax.set_yscale("log")
ax.legend()
show(fig, "training")

# %% [markdown]
# ## Predictions
#
# Every forward pass is one sample of the predictive distribution; `vinn.sample_forward` runs
# `S` of them as one batched call and returns the logits `[S, N, C]`.

# %%
num_samples = 50 if FAST else 100
with torch.no_grad():
    probs = vinn.sample_forward(net, dm.X_test, num_samples).softmax(-1)  # [S, N, C]
mean_probs = probs.mean(0)
predicted = mean_probs.argmax(-1)
correct = predicted == dm.Y_test
accuracy = correct.float().mean().item()
print(f"test accuracy of the averaged prediction: {accuracy:.3f}")

# %% [markdown]
# ## Aleatoric, epistemic, confidence
#
# With $\bar p = \frac{1}{S}\sum_s p_s$, the variance of the one-hot label splits into
#
# - aleatoric $\frac{1}{S}\sum_s \big(p_s - p_s^2\big)$: each sample's own doubt;
# - epistemic $\frac{1}{S}\sum_s (p_s - \bar p)^2$: the disagreement between samples.
#
# The total $u$ of the predicted class lies in $[0, 1/4]$, so $c = 1 - 2\sqrt{u}$ is a
# confidence score in $[0, 1]$.


# %%
def confidence(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aleatoric and epistemic variance of the predicted class, and the confidence score."""
    aleatoric, epistemic = variance_decomposition(probs)  # [N, C] each
    k = probs.mean(0).argmax(-1, keepdim=True)
    aleatoric, epistemic = aleatoric.gather(-1, k).squeeze(-1), epistemic.gather(-1, k).squeeze(-1)
    return aleatoric, epistemic, confidence_score(aleatoric + epistemic)


aleatoric, epistemic, score = confidence(probs)
print(f"confidence of correct predictions: {score[correct].mean():.3f}, "
      f"of wrong ones: {score[~correct].mean():.3f}")  # fmt: skip

# %% [markdown]
# The confidence separates right from wrong predictions: the wrong ones sit at low confidence.
# On digits rotated by 90 degrees, unlike anything in training, the confidence drops, and the
# epistemic share of the variance grows.

# %%
rotated_x, rotated_y = dm.rotated_test(90)
with torch.no_grad():
    rotated_probs = vinn.sample_forward(net, rotated_x, num_samples).softmax(-1)
rot_aleatoric, rot_epistemic, rot_score = confidence(rotated_probs)
rotated_accuracy = (rotated_probs.mean(0).argmax(-1) == rotated_y).float().mean().item()

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
bins = torch.linspace(0, 1, 26).numpy()
axes[0].hist(score[correct].numpy(), bins=bins, alpha=0.6, label="correct", density=True)
axes[0].hist(score[~correct].numpy(), bins=bins, alpha=0.6, label="wrong", density=True)
axes[0].set_title(f"Test digits (accuracy {accuracy:.2f})")
axes[1].hist(score.numpy(), bins=bins, alpha=0.6, label="test digits", density=True)
axes[1].hist(rot_score.numpy(), bins=bins, alpha=0.6, label="rotated 90°", density=True)
axes[1].set_title(f"Rotated by 90° (accuracy {rotated_accuracy:.2f})")
for ax in axes:
    ax.set_xlabel("confidence score c = 1 - 2 sqrt(u)")
    ax.legend()
axes[0].set_ylabel("density")
show(fig, "confidence")

# %%
summary = {
    "test: epistemic share": (epistemic / (aleatoric + epistemic)).mean().item(),
    "rotated: epistemic share": (rot_epistemic / (rot_aleatoric + rot_epistemic)).mean().item(),
    "test: mean confidence": score.mean().item(),
    "rotated: mean confidence": rot_score.mean().item(),
}
print({k: round(v, 3) for k, v in summary.items()})

# %%
assert accuracy > 0.8, accuracy
assert history[-1]["nll"] < history[0]["nll"]
assert score[correct].mean() > score[~correct].mean()
assert summary["rotated: mean confidence"] < summary["test: mean confidence"]
assert summary["rotated: epistemic share"] > summary["test: epistemic share"]
