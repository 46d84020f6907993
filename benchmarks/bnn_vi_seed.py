"""Speed and quality of Bayes by Backprop on the seed workload.

MLP 1-50-50-2, last layer Bayesian, batch 32, 150 epochs (20 of burn-in), S=10 weight samples in
training and 25 in prediction, one thread. Fits of the same math, measured in one run:

- ``eager``: a hand-written PyTorch loop (no Lightning, no uq_box), S samples as one batched matmul;
  the floor.
- ``lightning``: the eager math as a minimal ``LightningModule`` (no logging, no metrics) under the
  same ``Trainer``: what Lightning's loop alone costs, the floor of any Lightning-based library.
- ``uq_box``: ``BNNVIRegression`` with a plain ``lightning.Trainer``.
- ``loop``: the same uq_box model with a Python loop over the S samples (each runs the whole
  network, as peers do).
- ``eager+val`` and ``uq_box+val``: the first two with validation after every epoch (150
  points): the loss terms with S=10 and the predictive with S=25, scored by NLL, RMSE, CRPS, 95%
  coverage and miscalibration area, as ``BNNVIRegression``'s validation does; the eager loop
  takes the metric math from ``uq_box.metrics.functional`` (pure functions, one call per epoch).

Run: ``python benchmarks/bnn_vi_seed.py [--repeats 3]``; prints medians and ratios, and the test
metrics of the uq_box fit. ``--hidden 200 200 200 --batch-size 256 --n-points 5000`` measures a
deeper, wider workload where the Monte Carlo samples, not the per-step overhead, dominate.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F  # noqa: N812
from lightning import LightningModule, Trainer, seed_everything
from torch import nn

from uq_box.datamodules import ToyHeteroscedasticDatamodule
from uq_box.losses import NLL
from uq_box.methods import BNNVIRegression
from uq_box.metrics import functional
from uq_box.models import MLP

EPOCHS, BURNIN, BATCH, S_TRAIN, S_TEST, LR = 150, 20, 32, 10, 25, 3e-3
HIDDEN = [50, 50]


class EagerBNN(nn.Module):
    """The seed workload's math by hand: deterministic body, Bayesian last layer, exact ELBO."""

    def __init__(self) -> None:
        super().__init__()
        layers, width = [], 1
        for hidden in HIDDEN:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        last = nn.Linear(width, 2)
        self.w_mu = nn.Parameter(last.weight.detach().clone())
        self.b_mu = nn.Parameter(last.bias.detach().clone())
        self.w_rho = nn.Parameter(torch.full_like(self.w_mu, -5.0))
        self.b_rho = nn.Parameter(torch.full_like(self.b_mu, -5.0))

    def outputs(self, x: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and stds ``[S, B, 1]``: S weight samples of the last layer as one matmul."""
        h = self.body(x)
        w = self.w_mu + F.softplus(self.w_rho) * torch.randn(num_samples, *self.w_mu.shape)
        b = self.b_mu + F.softplus(self.b_rho) * torch.randn(num_samples, *self.b_mu.shape)
        out = torch.matmul(h, w.transpose(1, 2)) + b[:, None]
        return out[..., :1], F.softplus(out[..., 1:]) + 1e-6

    @staticmethod
    def nll(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean Gaussian NLL over samples and points."""
        return (0.5 * math.log(2 * math.pi) + std.log() + 0.5 * ((y - mean) / std) ** 2).mean()

    def kl(self) -> torch.Tensor:
        """KL of the last layer's posterior from N(0, 1), summed."""
        return sum(
            (torch.log(1.0 / s) + (s**2 + m**2) / 2 - 0.5).sum()
            for m, s in ((self.w_mu, F.softplus(self.w_rho)), (self.b_mu, F.softplus(self.b_rho)))
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor, n: int, burnin: bool) -> torch.Tensor:
        """The per-point negative ELBO (the mean's MSE in burn-in) of one batch."""
        mean, std = self.outputs(x, S_TRAIN)
        data = ((mean - y) ** 2).mean() if burnin else self.nll(mean, std, y)
        return data + self.kl() / n


def eager_fit(dm: ToyHeteroscedasticDatamodule, validate: bool = False) -> float:
    """The same math by hand in a plain loop."""
    x_all, y_all = dm.X_train, dm.Y_train
    x_val, y_val = dm.split("val")
    n = len(x_all)
    model = EagerBNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        order = torch.randperm(n)
        for i in range(0, n, BATCH):
            idx = order[i : i + BATCH]
            loss = model.loss(x_all[idx], y_all[idx], n, epoch < BURNIN)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if validate:
            eager_validation(model.outputs, model.nll, model.kl, x_val, y_val, n, epoch < BURNIN)
    return time.perf_counter() - start


class LightningFloor(LightningModule):
    """The eager math as a minimal LightningModule (no logging, no metrics): what Lightning's
    loop alone adds to the eager loop under the same ``Trainer``.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.net, self.n = EagerBNN(), n

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:  # noqa: D102
        burnin = self.current_epoch < BURNIN
        return self.net.loss(batch["input"], batch["target"], self.n, burnin)

    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: D102
        return torch.optim.Adam(self.parameters(), lr=LR)


def eager_validation(outputs, nll, kl, x_val, y_val, n, burnin) -> dict[str, torch.Tensor]:
    """One validation epoch by hand: the loss terms (batch-size weighted means) and the
    predictive's metrics over all validation points.
    """
    terms, preds = [], []
    with torch.no_grad():
        for i in range(0, len(x_val), BATCH):
            x, y = x_val[i : i + BATCH], y_val[i : i + BATCH]
            mean, std = outputs(x, S_TRAIN)
            data_nll = nll(mean, std, y)
            data = ((mean - y) ** 2).mean() if burnin else data_nll
            divergence = kl()
            mse = ((mean.mean(0) - y) ** 2).mean()
            terms.append(torch.stack([data + divergence / n, data_nll, divergence, mse]) * len(x))
            mean, std = outputs(x, S_TEST)
            pred = mean.mean(0)
            uct = (mean.var(0, unbiased=False) + (std**2).mean(0)).sqrt()
            preds.append((pred, uct))
        pred, uct = (torch.cat(p) for p in zip(*preds, strict=True))
        loss, data_nll, divergence, mse = torch.stack(terms).sum(0) / len(x_val)
        return {
            "val_loss": loss,
            "val_kl": divergence,
            "val_nll": functional.gaussian_nll(pred, uct, y_val),
            "val_rmse": ((pred - y_val) ** 2).mean().sqrt(),
            "val_crps": functional.gaussian_crps(pred, uct, y_val),
            "val_coverage_95": functional.interval_coverage(pred, uct, y_val, 0.95),
            "val_miscalibration_area": functional.miscalibration_area(pred, uct, y_val),
        }


class LoopBNN(BNNVIRegression):
    """The same model, sampling with a Python loop over full forward passes."""

    def sample_outputs(self, x, num_samples):  # noqa: D102
        return torch.stack([self.model(x) for _ in range(num_samples)])


def uq_box_fit(
    dm: ToyHeteroscedasticDatamodule, cls: type = BNNVIRegression, validate: bool = False
):
    network = MLP(n_inputs=1, n_hidden=HIDDEN, n_outputs=2, activation_fn=nn.ReLU())
    model = cls(
        network,
        optimizer=partial(torch.optim.Adam, lr=LR),
        criterion=NLL(),
        stochastic_module_names=[-1],
        num_mc_samples_train=S_TRAIN,
        num_mc_samples_test=S_TEST,
        burnin_epochs=BURNIN,
    )
    trainer = _trainer(validate)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    return seconds, model, trainer


def floor_fit(dm: ToyHeteroscedasticDatamodule) -> float:
    """:class:`LightningFloor` fed by the same data module, under the same ``Trainer``."""
    model, trainer = LightningFloor(len(dm.X_train)), _trainer(False)
    start = time.perf_counter()
    trainer.fit(model, dm)
    return time.perf_counter() - start


def _trainer(validate: bool) -> Trainer:
    return Trainer(
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1.0 if validate else 0,
        num_sanity_val_steps=0,
    )


def main() -> None:
    global HIDDEN, BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, nargs="+", default=HIDDEN, help="hidden widths")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--n-points", type=int, default=500)
    args = parser.parse_args()
    HIDDEN, BATCH = args.hidden, args.batch_size
    torch.set_num_threads(1)
    seed_everything(0, verbose=False)
    dm = ToyHeteroscedasticDatamodule(batch_size=BATCH, n_points=args.n_points)
    steps = EPOCHS * len(dm.train_dataloader())
    times: dict[str, list[float]] = {
        "eager": [],
        "lightning": [],
        "uq_box": [],
        "loop": [],
        "eager+val": [],
        "uq_box+val": [],
    }
    for repeat in range(args.repeats):
        seed_everything(repeat, verbose=False)
        times["eager"].append(eager_fit(dm))
        seed_everything(repeat, verbose=False)
        times["lightning"].append(floor_fit(dm))
        seed_everything(repeat, verbose=False)
        seconds, model, trainer = uq_box_fit(dm)
        times["uq_box"].append(seconds)
        seed_everything(repeat, verbose=False)
        times["loop"].append(uq_box_fit(dm, LoopBNN)[0])
        seed_everything(repeat, verbose=False)
        times["eager+val"].append(eager_fit(dm, validate=True))
        seed_everything(repeat, verbose=False)
        times["uq_box+val"].append(uq_box_fit(dm, validate=True)[0])
        if repeat == 0:
            metrics = trainer.test(model, dm, verbose=False)[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    arch = "-".join(map(str, [1, *HIDDEN, 2]))
    print(
        f"MLP {arch}, last layer Bayesian: {len(dm.X_train)} training points, batch {BATCH}, "
        f"{steps} steps, S={S_TRAIN}, 1 thread"
    )
    for name, value in med.items():
        print(
            f"  {name:10s} fit {value:6.2f} s  {1000 * value / steps:6.3f} ms/step  (runs: "
            + ", ".join(f"{t:.2f}" for t in times[name])
            + ")"
        )
    print(f"  uq_box / eager = {med['uq_box'] / med['eager']:.2f}x (target <= 1.5x)")
    print(
        f"  lightning / eager = {med['lightning'] / med['eager']:.2f}x (Lightning's loop alone), "
        f"uq_box / lightning = {med['uq_box'] / med['lightning']:.2f}x (uq_box's own cost)"
    )
    print(
        f"  uq_box+val / eager+val = {med['uq_box+val'] / med['eager+val']:.2f}x (target <= 1.7x)"
    )
    print(f"  loop / uq_box  = {med['loop'] / med['uq_box']:.2f}x (target >= 5x)")
    print("test metrics of the uq_box fit (1000 test points, S=25):")
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))


if __name__ == "__main__":
    main()
