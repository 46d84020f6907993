"""A 5-member deep ensemble trained as one vectorized model vs 5 sequential fits.

Seed MLP 1-50-50-2 (MVE members, Gaussian NLL, 20 burn-in epochs), toy heteroscedastic data,
batch 32, 150 epochs, one thread. Both fits use ``lightning.Trainer`` and the same epochs.

Run: ``python benchmarks/ensemble_speed.py [--repeats 3] [--members 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from lightning import Trainer, seed_everything

from uq_box.datamodules import ToyHeteroscedasticDatamodule
from uq_box.methods import DeepEnsembleRegression, MVERegression
from uq_box.models import MLP

EPOCHS, BURNIN, LR = 150, 20, 3e-3


def fit(model, dm) -> tuple[float, Trainer]:
    trainer = Trainer(
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    return time.perf_counter() - start, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=500)
    optimizer = partial(torch.optim.Adam, lr=LR)
    times: dict[str, list[float]] = {"vectorized": [], "sequential": []}
    for repeat in range(args.repeats):
        seed_everything(repeat, verbose=False)
        ensemble = DeepEnsembleRegression(
            MLP(1, [50, 50], 2), optimizer=optimizer, num_members=args.members, burnin_epochs=BURNIN
        )
        seconds, trainer = fit(ensemble, dm)
        times["vectorized"].append(seconds)
        if repeat == 0:
            vectorized_metrics = trainer.test(ensemble, dm, verbose=False)[0]
        seed_everything(repeat, verbose=False)
        members, total = [], 0.0
        for _ in range(args.members):
            member = MVERegression(MLP(1, [50, 50], 2), optimizer=optimizer, burnin_epochs=BURNIN)
            total += fit(member, dm)[0]
            members.append(member.model)
        times["sequential"].append(total)
        if repeat == 0:
            stacked = DeepEnsembleRegression(members, num_members=None)
            sequential_metrics = fit_free_test(stacked, dm)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.members}-member ensemble, MLP 1-50-50-2, {EPOCHS} epochs, 1 thread")
    for name, value in med.items():
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:10s} {value:6.2f} s  (runs: {runs})")
    print(
        f"  sequential / vectorized = {med['sequential'] / med['vectorized']:.2f}x (target >= 3x)"
    )
    for name, metrics in (("vectorized", vectorized_metrics), ("sequential", sequential_metrics)):
        print(f"  {name:10s} " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def fit_free_test(model, dm) -> dict[str, float]:
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.test(model, dm, verbose=False)[0]


if __name__ == "__main__":
    main()
