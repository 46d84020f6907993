"""Array conversion, argument checks and the prediction panel shared by the plotting functions."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.axes import Axes
from numpy.typing import ArrayLike


def to_numpy(values: torch.Tensor | ArrayLike) -> np.ndarray:
    """Return ``values`` as a numpy array with trailing size-1 dimensions removed.

    Args:
        values: a torch tensor (on any device, with or without grad) or anything numpy accepts.

    Returns:
        A numpy array; ``[N, 1]`` becomes ``[N]``.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    while array.ndim > 1 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def to_flat_1d(name: str, values: torch.Tensor | ArrayLike) -> np.ndarray:
    """Return ``values`` as a 1-D numpy array, or raise naming the argument.

    Args:
        name: argument name used in the error message.
        values: a tensor or array of shape ``[N]`` or ``[N, 1]``.

    Returns:
        A 1-D numpy array.
    """
    array = to_numpy(values)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must have shape [N] or [N, 1], got {list(array.shape)}")
    return array


def check_length(expected: int, **arrays: np.ndarray | None) -> None:
    """Raise naming the first array whose length differs from ``expected``."""
    for name, array in arrays.items():
        if array is not None and len(array) != expected:
            raise ValueError(f"`{name}` has {len(array)} values, expected {expected}")


def training_points(
    X_train: torch.Tensor | ArrayLike,  # noqa: N803 -- the seed tutorials' names
    Y_train: torch.Tensor | ArrayLike,  # noqa: N803
) -> tuple[np.ndarray, np.ndarray]:
    """1-D training inputs and targets of equal length, or raise naming the argument."""
    x, y = to_flat_1d("X_train", X_train), to_flat_1d("Y_train", Y_train)
    check_length(len(x), Y_train=y)
    return x, y


def sorted_by_input(
    X_test: torch.Tensor | ArrayLike,  # noqa: N803
    columns: dict[str, torch.Tensor | ArrayLike | None],
) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """1-D test inputs in increasing order and each column (one value per input) in that order.

    A column that is ``None`` stays ``None``; any other must have one value per test input.
    """
    x = to_flat_1d("X_test", X_test)
    flat = {name: None if v is None else to_flat_1d(name, v) for name, v in columns.items()}
    check_length(len(x), **flat)
    order = np.argsort(x, kind="stable")
    return x[order], {name: None if v is None else v[order] for name, v in flat.items()}


def draw_predictions(
    ax: Axes,
    train: tuple[np.ndarray, np.ndarray],
    x: np.ndarray,
    truth: np.ndarray | None,
    mean: np.ndarray,
    total: np.ndarray,
    parts: list[tuple[str, np.ndarray, str]],
    point_size: float = 10,
) -> None:
    """One panel of 1-D predictions: the training data, the test targets, ±2 std bands of the
    total std and of each ``(name, std, colour)`` part, and the predictive mean.
    """
    ax.scatter(*train, s=point_size, color="tab:gray", alpha=0.6, zorder=3, label="training data")
    if truth is not None:
        ax.plot(x, truth, color="black", lw=0.8, alpha=0.4, label="test targets")
    ax.fill_between(
        x, mean - 2 * total, mean + 2 * total, color="tab:blue", alpha=0.15, label="±2 std total"
    )
    for name, std, color in parts:
        ax.fill_between(
            x, mean - 2 * std, mean + 2 * std, color=color, alpha=0.25, label=f"±2 std {name}"
        )
    ax.plot(x, mean, color="tab:blue", lw=2, label="predictive mean")
