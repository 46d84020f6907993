"""uq_box against lightning-uq-box 0.2.0 on the Bayes-by-Backprop seed workload, in one run.

The workload of ``benchmarks/bnn_vi_seed.py``: the arrays of
``uq_box.datamodules.ToyHeteroscedasticDatamodule`` (seed 0: 350 training points, 1000 test
points), MLP 1-50-50-2, last layer Bayesian (Bayes by Backprop, reparameterization), S=10 weight
samples in training, batch 32, 150 epochs with 20 of burn-in (MSE of the mean), Adam lr 3e-3, 25
samples in prediction, one thread. Both libraries fit the same tensors with a plain
``lightning.Trainer`` (logger, checkpointing, progress bar, model summary and validation off, CPU)
in one process, from the same initial weights of the deterministic layers:

- ``uq_box``: ``BNNVIRegression`` with ``uq_box.losses.NLL`` fed by the data module itself
  (``InMemoryLoader``, batches ``{"input", "target"}``).
- ``lightning-uq-box``: ``BNN_VI_ELBO_Regression`` with its ``NLL`` loss,
  ``stochastic_module_names=[-1]``, ``num_mc_samples_train=10``, ``num_mc_samples_test=25``,
  ``burnin_epochs=20``, fed as its own data modules feed it: a ``DataLoader`` over a
  ``TensorDataset`` (batch 32, shuffled) that collates batches into ``{"input", "target"}``. It
  draws the S samples as S full forward passes in a Python loop.

Only ``trainer.fit`` is timed, after a 2-epoch warm-up fit of each; the order of the two fits
alternates between repeats. The test NLL of both is the mean Gaussian NLL (with the
``0.5 log 2 pi`` constant) of the 1000 test targets under each library's own predictive, the
moment-matched Gaussian of the 25-sample mixture (``pred`` and ``pred_uct`` of its
``predict_step``); both libraries compute that predictive the same way.

Where the settings differ (what lightning-uq-box's API does not let us match):

- Output noise: lightning-uq-box's ``NLL`` reads the second output as ``log sigma^2``
  (``sigma = exp(s / 2)``); uq_box's as ``sigma = softplus(s) + 1e-6``.
- Posterior means of the Bayesian layer: lightning-uq-box re-initializes them from
  ``N(0, 0.1^2)``; uq_box keeps the layer's initial weights. The deterministic layers start from
  the same weights in both (copied before the conversion); ``rho`` starts at -5 and the prior is
  ``N(0, 1)`` in both.
- KL weight: lightning-uq-box minimizes ``N * mean_s(loss_s) + beta * KL'``, where ``KL'`` is the
  *mean* KL per weight plus the mean KL per bias; uq_box minimizes the exact per-point negative
  ELBO ``mean_s(loss_s) + KL / N`` (``KL`` summed). With ``beta`` = the number of weights of the
  Bayesian layer (100, also its default) the weight term is exactly ``N`` times uq_box's; the 2
  biases' KL is weighted 50x more, which pulls their posterior std towards the prior's (about
  0.3-0.5 after the fit, uq_box's 0.03) and costs lightning-uq-box test NLL. No ``beta`` weights
  both terms as the ELBO does; ``--peer-beta`` sets another. The factor ``N`` on the whole loss
  makes no difference to Adam (up to its ``eps``).
- Weight decay: lightning-uq-box applies ``weight_decay=1e-5`` to the deterministic layers
  (``hparams["weight_decay"]``); it is set to 0 here, as uq_box uses none. ``--peer-weight-decay``
  restores it.
- Sample count in the loss: lightning-uq-box averages the S per-sample losses, uq_box averages
  over samples and points at once; the same number for equal batch sizes.
- Both libraries run their per-step training metrics and logging calls (lightning-uq-box's
  torchmetrics regression metrics, uq_box's running sums); nothing is switched off in either.

Run (lightning-uq-box needs its own environment, torch 2.14.1 + torchvision 0.29.1, with uq_box
installed too)::

    bash scripts/setup.sh --peer && .venv-peer/bin/python benchmarks/peer_speed.py --repeats 3

Prints the median fit times, their ratio (target: uq_box at least 5x faster) and both test NLLs
(target: uq_box no worse), medians over the repeats.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from functools import partial

import torch
from lightning import LightningDataModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from uq_box.datamodules import ToyHeteroscedasticDatamodule
from uq_box.losses import NLL
from uq_box.methods import BNNVIRegression
from uq_box.metrics.functional import gaussian_nll
from uq_box.models import MLP

try:
    with warnings.catch_warnings():  # its import scripts a function with torch.jit
        warnings.simplefilter("ignore", FutureWarning)
        from lightning_uq_box import uq_methods as luq
except ImportError as err:  # pragma: no cover - depends on the environment
    raise SystemExit(
        "lightning-uq-box is not installed here; build its environment with "
        "`bash scripts/setup.sh --peer` and run `.venv-peer/bin/python benchmarks/peer_speed.py`"
    ) from err

EPOCHS, BURNIN, BATCH, S_TRAIN, S_TEST, LR = 150, 20, 32, 10, 25, 3e-3
HIDDEN = [50, 50]


def collate_dict(batch: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """lightning-uq-box's batch format (its ``collate_fn_tensordataset``)."""
    return {
        "input": torch.stack([item[0] for item in batch]),
        "target": torch.stack([item[1] for item in batch]),
    }


class PeerData(LightningDataModule):
    """The training arrays as lightning-uq-box's toy data modules serve them."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.x, self.y),
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=collate_dict,
        )


def trainer(epochs: int) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def backbone() -> MLP:
    return MLP(n_inputs=1, n_hidden=HIDDEN, n_outputs=2, activation_fn=nn.ReLU())


def uq_box_model(network: nn.Module) -> BNNVIRegression:
    return BNNVIRegression(
        network,
        optimizer=partial(torch.optim.Adam, lr=LR),
        criterion=NLL(),
        stochastic_module_names=[-1],
        num_mc_samples_train=S_TRAIN,
        num_mc_samples_test=S_TEST,
        burnin_epochs=BURNIN,
    )


def peer_model(
    network: nn.Module, weight_decay: bool, beta: float | None = None
) -> luq.BNN_VI_ELBO_Regression:
    if beta is None:  # the number of weights of the Bayesian (last) layer
        beta = [m for m in network.modules() if isinstance(m, nn.Linear)][-1].weight.numel()
    model = luq.BNN_VI_ELBO_Regression(
        network,
        criterion=luq.NLL(),
        burnin_epochs=BURNIN,
        beta=beta,
        num_mc_samples_train=S_TRAIN,
        num_mc_samples_test=S_TEST,
        prior_mu=0.0,
        prior_sigma=1.0,
        posterior_rho_init=-5.0,
        bayesian_layer_type="reparameterization",
        stochastic_module_names=[-1],
        optimizer=partial(torch.optim.Adam, lr=LR),
    )
    if not weight_decay:
        model.hparams["weight_decay"] = 0.0
    return model


def fit(model: nn.Module, data: LightningDataModule, epochs: int = EPOCHS) -> float:
    run = trainer(epochs)
    start = time.perf_counter()
    run.fit(model, data)
    return time.perf_counter() - start


def test_nll(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        preds = model.predict_step(x)
    return float(gaussian_nll(preds["pred"].reshape(-1), preds["pred_uct"].reshape(-1), y[:, 0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--peer-weight-decay",
        action="store_true",
        help="keep lightning-uq-box's weight_decay=1e-5 on the deterministic layers",
    )
    parser.add_argument(
        "--peer-beta",
        type=float,
        default=None,
        help="lightning-uq-box's KL weight (default: the Bayesian layer's number of weights, 100)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|jit.script).*")
    warnings.filterwarnings("ignore", message=".*(validation_step.*val_dataloader|LeafSpec).*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    seed_everything(0, verbose=False)
    dm = ToyHeteroscedasticDatamodule(batch_size=BATCH)
    x_train, y_train = dm.X_train, dm.Y_train
    x_test, y_test = dm.X_test, dm.Y_test
    peer_data = PeerData(x_train, y_train, BATCH)
    steps = EPOCHS * len(dm.train_dataloader())
    if steps != EPOCHS * len(peer_data.train_dataloader()):
        raise RuntimeError("the two loaders give different numbers of steps per epoch")

    # one short fit of each first, so that neither pays the first-call costs in the timings
    fit(uq_box_model(backbone()), dm, epochs=2)
    fit(peer_model(backbone(), args.peer_weight_decay, args.peer_beta), peer_data, epochs=2)

    times: dict[str, list[float]] = {"uq_box": [], "lightning-uq-box": []}
    nlls: dict[str, list[float]] = {"uq_box": [], "lightning-uq-box": []}
    for repeat in range(args.repeats):
        seed_everything(repeat, verbose=False)
        network = backbone()
        twin = backbone()
        twin.load_state_dict(copy.deepcopy(network.state_dict()))
        ours = uq_box_model(network)
        peer = peer_model(twin, args.peer_weight_decay, args.peer_beta)
        runs = [("uq_box", ours, dm), ("lightning-uq-box", peer, peer_data)]
        for name, model, data in runs if repeat % 2 == 0 else runs[::-1]:
            seed_everything(repeat, verbose=False)
            times[name].append(fit(model, data))
        seed_everything(repeat, verbose=False)
        nlls["uq_box"].append(test_nll(ours, x_test, y_test))
        seed_everything(repeat, verbose=False)
        nlls["lightning-uq-box"].append(test_nll(peer, x_test, y_test))
        print(
            f"repeat {repeat}: uq_box {times['uq_box'][-1]:.2f} s, NLL {nlls['uq_box'][-1]:.3f}; "
            f"lightning-uq-box {times['lightning-uq-box'][-1]:.2f} s, "
            f"NLL {nlls['lightning-uq-box'][-1]:.3f}",
            flush=True,
        )

    med_t = {k: statistics.median(v) for k, v in times.items()}
    med_nll = {k: statistics.median(v) for k, v in nlls.items()}
    arch = "-".join(map(str, [1, *HIDDEN, 2]))
    print(
        f"MLP {arch}, last layer Bayesian: {len(x_train)} training points, batch {BATCH}, "
        f"{steps} steps, S={S_TRAIN} (25 in prediction), 1 thread, torch {torch.__version__}, "
        f"median of {args.repeats}"
    )
    for name in times:
        print(
            f"  {name:16s} fit {med_t[name]:6.2f} s  {1000 * med_t[name] / steps:6.3f} ms/step  "
            f"test NLL {med_nll[name]:.3f}  (runs: "
            + ", ".join(f"{t:.2f}" for t in times[name])
            + " s; NLL "
            + ", ".join(f"{v:.3f}" for v in nlls[name])
            + ")"
        )
    ratio = med_t["lightning-uq-box"] / med_t["uq_box"]
    per_repeat = [p / o for p, o in zip(times["lightning-uq-box"], times["uq_box"], strict=True)]
    print(
        f"  lightning-uq-box / uq_box fit time = {ratio:.2f}x (target >= 5x; per repeat: "
        + ", ".join(f"{r:.2f}x" for r in per_repeat)
        + ")"
    )
    print(
        f"  test NLL: uq_box {med_nll['uq_box']:.3f} vs lightning-uq-box "
        f"{med_nll['lightning-uq-box']:.3f}, difference "
        f"{med_nll['uq_box'] - med_nll['lightning-uq-box']:+.3f} (target: uq_box no worse)"
    )


if __name__ == "__main__":
    main()
