"""Cost of the parameter-efficient ensembles (issue #15 item 6), one thread, one run.

On scikit-learn's 8x8 digits, for the digits CNN (``uq_box.models.CNN``, channels 16, 32, hidden
64) and a small residual CNN (a BatchNorm stem and two residual blocks, 16 and 32 channels, global
average pooling), it reports for a deterministic network, a 4-member deep ensemble and the five
parameter-efficient ensembles of ``uq_box.methods.efficient_ensembles`` (4 members each):

- the parameters, and their ratio to one deterministic network;
- the training time per epoch: the median time of a training step (epochs after the first) times
  the steps of an epoch (Adam, batch 64, the method's own ``loss``, so each method's objective
  and batch handling, without the Trainer; the methods step in turns on the same batches);
- the prediction time per sample at batch 64: ``predict_step`` (members and the predictive
  distribution) and the network forward alone (``sample_outputs``), each the fastest of
  ``--repeats`` calls taken in turns across the methods (so that all see the same load of a
  shared machine), and the forward's ratio to one deterministic forward;
- the test accuracy after these few epochs (a sanity check, not a quality benchmark).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/efficient_ensembles.py`` (``--epochs``,
``--repeats``); it prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from uq_box.methods import (
    BatchEnsembleClassification,
    DeepEnsembleClassification,
    DeterministicClassification,
    MasksemblesClassification,
    MIMOClassification,
    PackedEnsembleClassification,
    Rank1BNNClassification,
)
from uq_box.models import CNN

MEMBERS = 4
BATCH = 64


class Block(nn.Module):
    def __init__(self, width_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential()
        if stride != 1 or width_in != width:
            self.shortcut = nn.Sequential(
                nn.Conv2d(width_in, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResidualCNN(nn.Module):
    """Stem (conv 16 + BatchNorm), blocks of 16 and 32 channels, average pooling, linear head."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.block1 = Block(16, 16, 1)
        self.block2 = Block(16, 32, 2)
        self.fc = nn.Linear(32, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block2(self.block1(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


NETWORKS = {"digits CNN": CNN, "residual CNN": ResidualCNN}

METHODS = {
    "deterministic": (DeterministicClassification, {}),
    "deep ensemble (4)": (DeepEnsembleClassification, {"num_members": MEMBERS}),
    "BatchEnsemble": (BatchEnsembleClassification, {"num_members": MEMBERS}),
    "Packed-Ensembles (alpha 2)": (
        PackedEnsembleClassification,
        {"num_members": MEMBERS, "alpha": 2},
    ),
    "MIMO": (MIMOClassification, {"num_members": MEMBERS}),
    "Masksembles (scale 2)": (MasksemblesClassification, {"num_members": MEMBERS}),
    "rank-1 BNN": (Rank1BNNClassification, {"num_members": MEMBERS}),
}


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    train, test = train_test_split(
        np.arange(len(images)), test_size=0.2, stratify=data.target, random_state=0
    )
    x, y = torch.from_numpy(images), torch.from_numpy(data.target.astype(np.int64))
    return x[train], y[train], x[test], y[test]


def train_in_turns(network, data, epochs: int) -> tuple[dict, dict[str, dict[str, float]]]:
    """Every method trained on the same batches, one step of each in turn (so that all see the
    same load of a shared machine); a training epoch's time is the median step time (epochs
    after the first) times the steps of an epoch."""
    x_train, y_train, x_test, y_test = data
    methods, optimizers, step_times = {}, {}, {}
    for name, (cls, kwargs) in METHODS.items():
        torch.manual_seed(0)
        extra = {"num_training_points": len(x_train)} if cls is Rank1BNNClassification else {}
        methods[name] = cls(network(), **kwargs, **extra)
        optimizers[name] = torch.optim.Adam(methods[name].parameters(), lr=3e-3)
        step_times[name] = []
    generator = torch.Generator().manual_seed(0)
    steps = 0
    for epoch in range(epochs):
        for method in methods.values():
            method.train()
        order = torch.randperm(len(x_train), generator=generator)
        steps = 0
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            x, y = x_train[idx], y_train[idx]
            for name, method in methods.items():
                start = time.perf_counter()
                optimizers[name].zero_grad(set_to_none=True)
                terms, _ = method.loss(x, y)
                terms["loss"].backward()
                optimizers[name].step()
                if epoch > 0 or epochs == 1:  # the first epoch warms up
                    step_times[name].append(time.perf_counter() - start)
            steps += 1
    rows = {}
    for name, method in methods.items():
        method.eval()
        pred = method.predict_step(x_test)["pred"]
        rows[name] = {
            "params": sum(p.numel() for p in method.parameters()),
            "epoch_s": statistics.median(step_times[name]) * steps,
            "accuracy": float((pred.argmax(-1) == y_test).float().mean()),
        }
    return methods, rows


def time_in_turns(methods: dict, batch: Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Fastest ``predict_step`` and forward of every method, the calls taken in turns."""

    def forward(method) -> None:
        with torch.no_grad():
            method.sample_outputs(batch, method.num_mc_samples_test)

    calls = {
        (name, kind): (lambda m=method: m.predict_step(batch))
        if kind == "predict"
        else (lambda m=method: forward(m))
        for name, method in methods.items()
        for kind in ("predict", "forward")
    }
    best = {key: float("inf") for key in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            best[key] = min(best[key], time.perf_counter() - start)
    return {
        name: {
            f"{kind}_us": best[(name, kind)] / len(batch) * 1e6 for kind in ("predict", "forward")
        }
        for name in methods
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = digits()
    for net_name, network in NETWORKS.items():
        methods, rows = train_in_turns(network, data, args.epochs)
        times = time_in_turns(methods, data[2][:BATCH], args.repeats)
        rows = {name: {**row, **times[name]} for name, row in rows.items()}
        base = rows["deterministic"]
        header = (
            "| method | parameters | x one model | train s / epoch | x det. | predict us / sample "
            "| forward us / sample | forward x det. | test accuracy |"
        )
        print(f"\n### {net_name} (batch {BATCH}, 1 thread, {args.epochs} epochs)\n")
        print(header)
        print("| --- " * 9 + "|")
        for name, r in rows.items():
            print(
                f"| {name} | {r['params']:,} | {r['params'] / base['params']:.2f} | "
                f"{r['epoch_s']:.3f} | {r['epoch_s'] / base['epoch_s']:.1f} | "
                f"{r['predict_us']:.1f} | {r['forward_us']:.1f} | "
                f"{r['forward_us'] / base['forward_us']:.2f} | {r['accuracy']:.3f} |"
            )


if __name__ == "__main__":
    main()
