"""Small data, backbones and state comparisons shared by the reliability tests.

The methods themselves, built small, are the entries of ``uq_box.methods.registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from uq_box.datamodules import ArrayDataModule
from uq_box.models import MLP

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


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"entries differ: {different}"
