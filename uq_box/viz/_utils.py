"""Array conversion shared by the plotting functions."""

from __future__ import annotations

import numpy as np
import torch
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
