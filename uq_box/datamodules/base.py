"""In-memory data modules.

Small and medium UQ data sets fit in memory, where a ``DataLoader`` over a ``TensorDataset``
collates every batch sample by sample and costs as much as the training step itself. The
:class:`InMemoryLoader` slices a random permutation of the stored tensors instead (one index
operation per batch), and shards that permutation by rank under DDP so that every process sees a
disjoint part of each epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning import LightningDataModule
from torch import Tensor

from uq_box.checks import positive_int

ArrayLike = Any  # numpy array, torch tensor or nested sequence


def as_tensor(value: ArrayLike, name: str, *, target: bool = False) -> Tensor:
    """Convert ``value`` to a tensor and check it is finite.

    Floating point data become float32 unless they are float64 already; integer targets (class
    labels) stay integer. One-dimensional regression targets become a column ``[N, 1]``.
    """
    try:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be an array or tensor, got {type(value).__name__}") from err
    if tensor.ndim == 0:
        raise ValueError(f"`{name}` must have a batch dimension, got a scalar")
    if tensor.is_floating_point():
        if tensor.dtype != torch.float64:
            tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"`{name}` contains {bad} non-finite values (NaN or inf); expected finite data"
            )
        if target and tensor.ndim == 1:
            tensor = tensor.unsqueeze(-1)
    elif tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(
            f"`{name}` must be real numbers or integer labels, got dtype {tensor.dtype}"
        )
    return tensor


def target_resolution(
    y: ArrayLike, min_relative_step: float = 0.1, tolerance: float = 1e-6
) -> float:
    """The grid step of coarsely recorded targets (1 for integer scores), else 0.

    The smallest gap ``Δ`` between distinct values, when every value lies on the grid
    ``min(y) + k Δ`` (within ``tolerance`` of a step) and the grid is coarse: ``Δ`` at least
    ``min_relative_step`` times the targets' std (wine quality scores: 1.25 std). Finer grids
    (prices to the cent, sensor readings to three decimals) return 0: their rounding error is
    small beside the targets' spread, and a model may resolve them as if continuous. Continuous
    targets and fewer than two distinct values return 0 too. Pass it to
    :class:`uq_box.losses.NLL` (``resolution``), so that the predicted std accounts for the
    rounding (see there).
    """
    raw = np.asarray(y, dtype=np.float64).ravel()
    values = np.unique(raw[np.isfinite(raw)])
    if len(values) < 2:
        return 0.0
    step = float(np.diff(values).min())
    steps = (values - values[0]) / step
    if np.abs(steps - np.round(steps)).max() > tolerance * max(1.0, steps.max()):
        return 0.0
    return step if step >= min_relative_step * float(raw.std()) else 0.0


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class InMemoryLoader:
    """Batches of ``{"input": X, "target": y}`` sliced from tensors held in memory.

    Args:
        inputs: ``[N, ...]`` inputs.
        targets: ``[N, ...]`` targets.
        batch_size: points per batch (per process under DDP).
        shuffle: draw a new permutation every epoch (seeded by ``seed`` and the epoch count,
            so all processes agree on it).
        seed: seed of the permutations.

    The epoch count is the number of passes so far, or what :meth:`set_epoch` says: Lightning's
    loops call ``set_epoch(trainer.current_epoch)`` on a loader's ``sampler`` before every
    training epoch (as for a ``DistributedSampler``), and ``sampler`` is the loader itself, so a
    run resumed from a checkpoint draws the permutations of the uninterrupted run. The loader is
    also stateful (:meth:`state_dict`, :meth:`load_state_dict`): a checkpoint taken mid-epoch
    records how many batches of the epoch were drawn, and the resumed run skips them.
    """

    #: Lightning reads ``batch_sampler`` next to ``sampler``; this loader has none.
    batch_sampler = None

    def __init__(
        self, inputs: Tensor, targets: Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> None:
        positive_int(batch_size, "batch_size")
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._drawn = (0, 0)  # (epoch, batches) of the current pass
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) from a checkpoint

    @property
    def sampler(self) -> InMemoryLoader:
        """The loader itself, where Lightning looks for ``set_epoch``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Draw the permutation of epoch ``epoch`` in the next pass (and count on from there)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """The epoch of the current pass and the batches drawn from it so far."""
        epoch, batches = self._drawn
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip the batches a checkpoint's pass drew when that epoch's pass runs next."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        self._resume = (epoch, batches) if 0 < batches < len(self) else None
        self.epoch = epoch + 1 if batches >= len(self) else epoch

    @property
    def num_samples(self) -> int:
        """Size of the whole data set, across all processes."""
        return len(self.inputs)

    def _indices(self) -> Tensor | None:
        rank, world = _distributed_rank_and_size()
        if not self.shuffle and world == 1:
            return None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        if world > 1:
            # pad by wrapping so every rank gets the same number of batches
            per_rank = -(-self.num_samples // world)
            order = torch.cat([order, order[: per_rank * world - self.num_samples]])
            order = order[rank::world]
        return order

    def __len__(self) -> int:
        _, world = _distributed_rank_and_size()
        per_rank = -(-self.num_samples // world)
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        order = self._indices()
        epoch, skip = self.epoch, 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        self.epoch += 1
        self._drawn = (epoch, skip)
        length = self.num_samples if order is None else order.shape[-1]
        for start in range(skip * self.batch_size, length, self.batch_size):
            self._drawn = (epoch, self._drawn[1] + 1)
            yield self._batch(order, start)

    def _batch(self, order: Tensor | None, start: int) -> dict[str, Tensor]:
        """The batch of the rows ``start:start + batch_size`` of ``order`` (in order: None)."""
        if order is None:
            stop = start + self.batch_size
            return {"input": self.inputs[start:stop], "target": self.targets[start:stop]}
        index = order[start : start + self.batch_size]
        return {"input": self.inputs[index], "target": self.targets[index]}


class SplitStore:
    """The splits a data module holds in memory: ``_data[split] = (inputs, targets)``."""

    _data: dict[str, tuple[Tensor, Tensor]]

    def has_split(self, split: str) -> bool:
        """Whether the data module holds ``split`` (``"train"``, ``"val"``, ``"test"``, ``"calib"``)."""
        return split in self._data

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        """The ``(inputs, targets)`` of ``split``; a clear error when it is missing."""
        if split not in self._data:
            raise ValueError(
                f"{type(self).__name__} has no '{split}' split; it has {sorted(self._data)}"
            )
        return self._data[split]


class ArrayDataModule(SplitStore, LightningDataModule):
    """Wrap arrays or tensors into a data module, so any method trains on a user's data.

    Args:
        X_train: training inputs ``[N, ...]``.
        y_train: training targets ``[N]`` or ``[N, ...]``.
        X_val: optional validation inputs.
        y_val: optional validation targets.
        X_test: optional test inputs.
        y_test: optional test targets.
        batch_size: training batch size.
        eval_batch_size: batch size of the validation, test, calibration and predict loaders.
        seed: seed of the training shuffle.
        X_calib: optional calibration inputs, held out from training and validation for
            post-hoc calibration (e.g. :class:`uq_box.methods.posthoc.ConformalRegression`).
        y_calib: optional calibration targets.
    """

    splits = ("train", "val", "test", "calib")

    def __init__(
        self,
        X_train: ArrayLike,  # noqa: N803 -- the field's usual name for a design matrix
        y_train: ArrayLike,
        X_val: ArrayLike | None = None,  # noqa: N803
        y_val: ArrayLike | None = None,
        X_test: ArrayLike | None = None,  # noqa: N803
        y_test: ArrayLike | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 1024,
        seed: int = 0,
        X_calib: ArrayLike | None = None,  # noqa: N803
        y_calib: ArrayLike | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = positive_int(batch_size, "batch_size")
        self.eval_batch_size = positive_int(eval_batch_size, "eval_batch_size")
        self.seed = seed
        self._data: dict[str, tuple[Tensor, Tensor]] = {}
        for split, x, y in (
            ("train", X_train, y_train),
            ("val", X_val, y_val),
            ("test", X_test, y_test),
            ("calib", X_calib, y_calib),
        ):
            self._set_split(split, x, y)

    def _set_split(self, split: str, x: ArrayLike | None, y: ArrayLike | None) -> None:
        x_name, y_name = f"X_{split}", f"y_{split}"
        if x is None and y is None:
            if split == "train":
                raise ValueError("`X_train` and `y_train` are required")
            self._data.pop(split, None)
            return
        if x is None or y is None:
            given, missing = (x_name, y_name) if y is None else (y_name, x_name)
            raise ValueError(f"`{given}` was given without `{missing}`; pass both or neither")
        x_t, y_t = as_tensor(x, x_name), as_tensor(y, y_name, target=True)
        if len(x_t) != len(y_t):
            raise ValueError(
                f"`{x_name}` has {len(x_t)} rows but `{y_name}` has {len(y_t)}; expected the same"
            )
        if len(x_t) == 0:
            raise ValueError(f"`{x_name}` is empty; expected at least one row")
        self._data[split] = (x_t, y_t)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> InMemoryLoader | list:
        if split not in self._data:
            return []
        x, y = self._data[split]
        return InMemoryLoader(x, y, batch_size=batch_size, shuffle=shuffle, seed=self.seed)

    def train_dataloader(self) -> InMemoryLoader:
        """Shuffled training batches."""
        x, y = self.split("train")
        return InMemoryLoader(x, y, batch_size=self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> InMemoryLoader | list:
        """Validation batches (an empty list when there is no validation split)."""
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> InMemoryLoader:
        """Test batches."""
        x, y = self.split("test")
        return InMemoryLoader(x, y, batch_size=self.eval_batch_size, shuffle=False)

    def calib_dataloader(self) -> InMemoryLoader:
        """Calibration batches (in order); a clear error when there is no calibration split."""
        x, y = self.split("calib")
        return InMemoryLoader(x, y, batch_size=self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> InMemoryLoader:
        """Batches of the test inputs, for ``Trainer.predict``."""
        return self.test_dataloader()

    # Convenience attributes in the field's usual names.
    @property
    def X_train(self) -> Tensor:  # noqa: N802
        return self.split("train")[0]

    @property
    def Y_train(self) -> Tensor:  # noqa: N802
        return self.split("train")[1]

    @property
    def X_val(self) -> Tensor:  # noqa: N802
        return self.split("val")[0]

    @property
    def Y_val(self) -> Tensor:  # noqa: N802
        return self.split("val")[1]

    @property
    def X_test(self) -> Tensor:  # noqa: N802
        return self.split("test")[0]

    @property
    def Y_test(self) -> Tensor:  # noqa: N802
        return self.split("test")[1]

    @property
    def X_calib(self) -> Tensor:  # noqa: N802
        return self.split("calib")[0]

    @property
    def Y_calib(self) -> Tensor:  # noqa: N802
        return self.split("calib")[1]
