"""Per-run data for stacked runs: ``K`` data modules as one stream of ``[K, B, ...]`` batches.

:class:`uq_box.methods.StackedRuns` trains ``K`` independent runs of a method (splits, folds,
seeds) as one vectorized model. Each run keeps its own data: :class:`StackedDataModule` takes one
:class:`~uq_box.datamodules.ArrayDataModule` per run (a UCI split, a cross-validation fold, the
same data with another seed) and yields batches whose leading dimension is the run. Run ``k``'s
training batches are exactly the batches its own data module would give a separate fit: the same
permutation of its training set every epoch (seeded by its ``seed`` and the epoch), in the same
batch size. :func:`kfold_datamodules` builds the per-run data modules of ``K``-fold
cross-validation from a user's arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from lightning import LightningDataModule
from torch import Tensor

from uq_box.checks import positive_int
from uq_box.datamodules.base import ArrayDataModule, ArrayLike, InMemoryLoader, SplitStore

__all__ = ["StackedDataModule", "StackedLoader", "kfold_datamodules"]


class StackedLoader(InMemoryLoader):
    """Batches ``{"input": [K, B, ...], "target": [K, B, ...]}`` of ``K`` runs' own tensors.

    Args:
        inputs: ``[K, N, ...]``, run ``k``'s inputs in ``inputs[k]``.
        targets: ``[K, N, ...]``.
        batch_size: points per run and batch.
        shuffle: a new permutation per run and epoch.
        seeds: one seed per run: run ``k`` draws the permutation that an
            :class:`~uq_box.datamodules.InMemoryLoader` with ``seed=seeds[k]`` draws, so a stacked
            fit sees each run's batches of a separate fit.

    Epoch counting, ``set_epoch`` and the mid-epoch resume state are those of
    :class:`~uq_box.datamodules.InMemoryLoader`. One process only (no DDP sharding).
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seeds: Sequence[int] | None = None,
    ) -> None:
        super().__init__(inputs, targets, batch_size, shuffle)
        self.num_runs = inputs.shape[0]
        self.seeds = [0] * self.num_runs if seeds is None else [int(s) for s in seeds]
        if len(self.seeds) != self.num_runs:
            raise ValueError(f"`seeds` must give one seed per run ({self.num_runs}), got {seeds}")

    @property
    def num_samples(self) -> int:
        """Training points of one run (the ``N`` of each run's objective)."""
        return self.inputs.shape[1]

    def _indices(self) -> Tensor | None:
        """Row indices ``[K, N]`` into the runs' rows laid end to end (``None``: in order)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise RuntimeError("stacked runs train in one process; DDP is not supported")
        if not self.shuffle:
            return None
        n = self.num_samples
        orders = [
            torch.randperm(n, generator=torch.Generator().manual_seed(s + self.epoch))
            for s in self.seeds
        ]
        return torch.stack(orders) + torch.arange(self.num_runs).unsqueeze(1) * n

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _batch(self, order: Tensor | None, start: int) -> dict[str, Tensor]:
        """Every run's batch ``[K, B, ...]``: one ``index_select`` into the runs' rows laid end
        to end (``order`` holds those flat indices, see :meth:`_indices`).
        """
        if order is None:
            stop = start + self.batch_size
            return {"input": self.inputs[:, start:stop], "target": self.targets[:, start:stop]}
        index = order[:, start : start + self.batch_size].reshape(-1)
        shape = (self.num_runs, -1)
        return {
            "input": self.inputs.flatten(0, 1).index_select(0, index).unflatten(0, shape),
            "target": self.targets.flatten(0, 1).index_select(0, index).unflatten(0, shape),
        }


class StackedDataModule(SplitStore, LightningDataModule):
    """``K`` data modules, one per run, as one module of per-run batches ``[K, B, ...]``.

    Args:
        datamodules: one :class:`~uq_box.datamodules.ArrayDataModule` (or subclass, such as
            :class:`~uq_box.datamodules.UCIRegressionDatamodule`) per run. Every split that one of
            them holds, all must hold, with the same number of rows and the same shapes (the
            splits of a UCI data set, folds from :func:`kfold_datamodules`).
        batch_size: training batch size of every run (default: the first module's).
        eval_batch_size: batch size of the validation, test and predict loaders (default: the
            first module's).

    Run ``k`` shuffles its training set with ``datamodules[k].seed``, as its separate fit would.
    :meth:`split` gives a split's stacked ``(inputs [K, N, ...], targets [K, N, ...])``.
    """

    def __init__(
        self,
        datamodules: Sequence[ArrayDataModule],
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        modules = list(datamodules)
        if not modules or not all(isinstance(m, ArrayDataModule) for m in modules):
            raise TypeError(
                f"`datamodules` must be a non-empty list of ArrayDataModule, got {datamodules!r}"
            )
        first = modules[0]
        self.datamodules = modules
        self.num_runs = len(modules)
        self.batch_size = positive_int(
            first.batch_size if batch_size is None else batch_size, "batch_size"
        )
        self.eval_batch_size = positive_int(
            first.eval_batch_size if eval_batch_size is None else eval_batch_size,
            "eval_batch_size",
        )
        self.seeds = [int(m.seed) for m in modules]
        self._data: dict[str, tuple[Tensor, Tensor]] = {}
        for split in ArrayDataModule.splits:
            held = [m.has_split(split) for m in modules]
            if not any(held):
                continue
            if not all(held):
                raise ValueError(
                    f"`datamodules`: runs {[i for i, h in enumerate(held) if not h]} have no "
                    f"'{split}' split but others do; give every run the same splits"
                )
            xs, ys = zip(*(m.split(split) for m in modules), strict=True)
            for name, parts in ((f"X_{split}", xs), (f"y_{split}", ys)):
                shapes = {tuple(p.shape) for p in parts}
                dtypes = {p.dtype for p in parts}
                if len(shapes) > 1 or len(dtypes) > 1:
                    raise ValueError(
                        f"`datamodules`: the runs' `{name}` differ in shape or dtype "
                        f"({sorted(shapes)}, {sorted(map(str, dtypes))}); stacked runs need "
                        f"the same number of rows per split (see kfold_datamodules)"
                    )
            self._data[split] = (torch.stack(xs), torch.stack(ys))

    def _loader(self, split: str) -> StackedLoader | list:
        if split not in self._data:
            return []
        return StackedLoader(*self._data[split], batch_size=self.eval_batch_size)

    def train_dataloader(self) -> StackedLoader:
        """Each run's shuffled training batches, stacked."""
        x, y = self.split("train")
        return StackedLoader(x, y, self.batch_size, shuffle=True, seeds=self.seeds)

    def val_dataloader(self) -> StackedLoader | list:
        """Validation batches (an empty list when there is no validation split)."""
        return self._loader("val")

    def test_dataloader(self) -> StackedLoader:
        """Test batches."""
        self.split("test")
        return self._loader("test")

    def calib_dataloader(self) -> StackedLoader:
        """Calibration batches."""
        self.split("calib")
        return self._loader("calib")

    def predict_dataloader(self) -> StackedLoader:
        """Batches of the test inputs, for ``Trainer.predict``."""
        return self.test_dataloader()


def kfold_datamodules(
    X: ArrayLike,  # noqa: N803 -- the field's usual name for a design matrix
    y: ArrayLike,
    num_folds: int = 5,
    seed: int = 0,
    batch_size: int = 32,
    eval_batch_size: int = 1024,
    X_test: ArrayLike | None = None,  # noqa: N803
    y_test: ArrayLike | None = None,
) -> list[ArrayDataModule]:
    """The ``K = num_folds`` data modules of ``K``-fold cross-validation on ``(X, y)``.

    The rows are shuffled with ``seed`` and cut into ``K`` folds of ``N // K`` rows; run ``k``
    validates on fold ``k`` and trains on the rest. The ``N mod K`` remaining rows join every
    run's training set, so that all runs have the same sizes and stack
    (:class:`StackedDataModule`). Run ``k`` shuffles its batches with seed ``seed + k``. A
    held-out ``(X_test, y_test)`` becomes every run's test split.
    """
    num_folds = positive_int(num_folds, "num_folds")
    x_all, y_all = np.asarray(X), np.asarray(y)
    if len(x_all) != len(y_all):
        raise ValueError(f"`X` has {len(x_all)} rows but `y` has {len(y_all)}; expected the same")
    fold = len(x_all) // num_folds
    if num_folds < 2 or fold < 1:
        raise ValueError(
            f"`num_folds` must be at least 2 and at most the number of rows ({len(x_all)}), "
            f"got {num_folds}"
        )
    order = np.random.default_rng(seed).permutation(len(x_all))
    folds = [order[k * fold : (k + 1) * fold] for k in range(num_folds)]
    rest = order[num_folds * fold :]
    modules = []
    for k in range(num_folds):
        train = np.concatenate([f for i, f in enumerate(folds) if i != k] + [rest])
        modules.append(
            ArrayDataModule(
                x_all[train],
                y_all[train],
                x_all[folds[k]],
                y_all[folds[k]],
                X_test,
                y_test,
                batch_size=batch_size,
                eval_batch_size=eval_batch_size,
                seed=seed + k,
            )  # fmt: skip
        )
    return modules
