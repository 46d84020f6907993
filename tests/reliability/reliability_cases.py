"""Small data and one small configuration of every method, shared by the reliability tests.

Each method is built from a fresh backbone by ``make(network)``; ``network()`` builds that
backbone again (what ``load_from_checkpoint`` needs as ``model=``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from uq_box.datamodules import ArrayDataModule
from uq_box.methods import (
    BNNVIClassification,
    BNNVIRegression,
    DeepEnsembleClassification,
    DeepEnsembleRegression,
    DeterministicClassification,
    DeterministicRegression,
    MCDropoutClassification,
    MCDropoutRegression,
    MVERegression,
    QuantileRegression,
    SGMCMCClassification,
    SGMCMCRegression,
    SWAGClassification,
    SWAGRegression,
)
from uq_box.models import MLP
from uq_box.optim import SGLD

N_TRAIN, N_VAL, N_TEST = 64, 16, 16
BATCH_SIZE = 16  # 4 training batches per epoch


def toy_arrays(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``[96, 2]``, regression targets ``[96, 1]`` and class labels ``[96]``."""
    generator = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_VAL + N_TEST
    x = torch.randn(n, 2, generator=generator)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:] + 0.1 * torch.randn(n, 1, generator=generator)
    labels = (x[:, 0] + 0.3 * torch.randn(n, generator=generator) > 0).long()
    return x, y, labels


def datamodule(task: str, batch_size: int = BATCH_SIZE) -> ArrayDataModule:
    """Train/val/test (and, for regression, calib = val) splits of :func:`toy_arrays`."""
    x, y, labels = toy_arrays()
    t = y if task == "regression" else labels
    a, b = N_TRAIN, N_TRAIN + N_VAL
    calib = {"X_calib": x[a:b], "y_calib": t[a:b]} if task == "regression" else {}
    return ArrayDataModule(
        x[:a], t[:a], x[a:b], t[a:b], x[b:], t[b:], batch_size=batch_size, **calib
    )


def mlp(n_outputs: int, dropout_p: float = 0.0) -> Callable[[], nn.Module]:
    return partial(MLP, 2, [8], n_outputs, dropout_p=dropout_p)


@dataclass
class MethodCase:
    """A method, how to build it, its backbone and its task."""

    name: str
    make: Callable[[nn.Module], object]
    network: Callable[[], nn.Module]
    task: str  # "regression" or "classification"


METHODS = [
    MethodCase("DeterministicRegression", DeterministicRegression, mlp(1), "regression"),
    MethodCase("MVERegression", MVERegression, mlp(2), "regression"),
    MethodCase("QuantileRegression", QuantileRegression, mlp(3), "regression"),
    MethodCase(
        "BNNVIRegression",
        partial(
            BNNVIRegression,
            stochastic_module_names=[-1],
            num_mc_samples_train=2,
            num_mc_samples_test=4,
        ),
        mlp(2),
        "regression",
    ),
    MethodCase(
        "MCDropoutRegression",
        partial(MCDropoutRegression, num_mc_samples_train=2, num_mc_samples_test=4),
        mlp(2, 0.2),
        "regression",
    ),
    MethodCase(
        "DeepEnsembleRegression",
        partial(DeepEnsembleRegression, num_members=3),
        mlp(2),
        "regression",
    ),
    MethodCase(
        "SWAGRegression",
        partial(SWAGRegression, max_num_samples=3, num_mc_samples_test=4, burnin_epochs=1),
        mlp(2),
        "regression",
    ),
    MethodCase(
        "SGMCMCRegression",
        partial(
            SGMCMCRegression,
            optimizer=partial(SGLD, lr=1e-3),
            burnin_epochs=1,
            thinning=3,
            max_num_samples=4,
        ),
        mlp(2),
        "regression",
    ),
    MethodCase(
        "DeterministicClassification", DeterministicClassification, mlp(2), "classification"
    ),
    MethodCase(
        "BNNVIClassification",
        partial(BNNVIClassification, num_mc_samples_train=2, num_mc_samples_test=4, prior=0.5),
        mlp(2),
        "classification",
    ),
    MethodCase(
        "MCDropoutClassification",
        partial(MCDropoutClassification, num_mc_samples_test=4),
        mlp(2, 0.2),
        "classification",
    ),
    MethodCase(
        "DeepEnsembleClassification",
        partial(DeepEnsembleClassification, num_members=2),
        mlp(2),
        "classification",
    ),
    MethodCase(
        "SWAGClassification",
        partial(
            SWAGClassification,
            stochastic_module_names=[-1],
            max_num_samples=3,
            num_mc_samples_test=4,
        ),
        mlp(2),
        "classification",
    ),
    MethodCase(
        "SGMCMCClassification",
        partial(SGMCMCClassification, thinning=2, max_num_samples=5, num_mc_samples_test=3),
        mlp(2),
        "classification",
    ),
]
METHOD_IDS = [case.name for case in METHODS]


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"entries differ: {different}"


def assert_same_predictions(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"predictions differ in {different}"
