"""The UCI regression benchmark: ``uq-box benchmark uci`` reproduces the published table.

Protocol (Hernández-Lobato & Adams 2015; Gal & Ghahramani 2016; Lakshminarayanan et al. 2017): one
hidden layer of 50 ReLU units (100 for protein), the standard splits, features and target
standardized with each split's training statistics, test RMSE and test log-likelihood per point in
the original units, mean ± standard error over the splits.

The benchmark trains uq_box's own methods (:class:`~uq_box.methods.MVERegression`,
:class:`~uq_box.methods.DeepEnsembleRegression`, :class:`~uq_box.methods.MCDropoutRegression`,
:class:`~uq_box.methods.BNNVIRegression`) with a plain ``lightning.Trainer``. The ``K`` splits of
a data set are stacked runs (:class:`~uq_box.methods.StackedRuns`): one vectorized model, one
``Trainer.fit``, each split with its own parameters, its own shuffled batches
(:class:`~uq_box.datamodules.StackedDataModule` of the splits' :class:`UCIRegressionDatamodule`)
and its own Monte Carlo noise. The hyperparameters are ``uci.yaml`` beside this module (``--config``
replaces it).

Per-split fit time is the stacked fit time of the (data set, method) divided by its splits.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from functools import partial
from importlib import resources
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from uq_box.datamodules.stacked import StackedDataModule
from uq_box.datamodules.uci import (
    UCI_DATASETS,
    UCIRegressionDatamodule,
    UCISplit,
    _complete,
    default_uci_root,
    download_uci,
    uci_info,
)
from uq_box.losses import NLL, GaussianMixtureNLL, NormalInverseGammaNLL, StudentTNLL
from uq_box.methods import (
    BNNVIRegression,
    DeepEnsembleRegression,
    DERRegression,
    DUERegression,
    MCDropoutRegression,
    MDNRegression,
    MVERegression,
    SNGPRegression,
    UQMethod,
)
from uq_box.methods.stacked import StackedRuns
from uq_box.metrics.density import mixture_log_prob
from uq_box.metrics.functional import (
    gaussian_crps,
    gaussian_nll,
    interval_coverage,
    miscalibration_area,
)
from uq_box.models import MLP

__all__ = [
    "METHODS",
    "build_method",
    "fit_dataset",
    "load_config",
    "main",
    "markdown_table",
    "metrics_table",
    "original_units_metrics",
    "plot_results",
    "published_results",
    "run_benchmark",
    "split_metrics",
]

METHODS = (
    "mve", "deep_ensemble", "mc_dropout", "bnn_vi", "mdn", "der", "mve_student_t", "sngp", "due",
)  # fmt: skip
"""Methods the benchmark knows (new ones go last: a method's seed depends on its position)."""

METHOD_LABELS = {
    "mve": "MVE (uq_box)",
    "deep_ensemble": "Deep ensemble (uq_box)",
    "mc_dropout": "MC dropout (uq_box)",
    "bnn_vi": "BNN VI (uq_box)",
    "mdn": "MDN (uq_box)",
    "der": "Evidential (uq_box)",
    "mve_student_t": "Student-t MVE (uq_box)",
    "sngp": "SNGP (uq_box)",
    "due": "DUE (uq_box)",
}

PUBLISHED_SHORT = {
    "PBP": "PBP (Hernandez-Lobato & Adams 2015)",
    "MC dropout (paper)": "MC dropout (Gal & Ghahramani 2016, arXiv v6 Table 1)",
    "Deep ensembles (paper)": (
        "Deep ensembles (Lakshminarayanan et al. 2017, Table 1; +- may be a std dev)"
    ),
}
"""Published rows shown in the table: short label -> ``method`` in ``published_results.csv``."""

DEEP_ENSEMBLES_PAPER = PUBLISHED_SHORT["Deep ensembles (paper)"]

DEFAULT_CONFIG = Path(__file__).with_name("uci.yaml")
"""The benchmark's hyperparameters (the one place they are written down)."""

_GLOBAL_KEYS = {
    "seed", "threads", "workers", "epoch_multiplier", "batch_size", "lr", "lr_schedule",
    "weight_decay", "min_std", "eval_samples", "methods", "per_dataset",
}  # fmt: skip


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"`--config` file {path} does not exist")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"`--config` {path} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def _merged_config(
    default: Path, path: str | Path | None, known_keys: set[str], methods: Sequence[str]
) -> dict[str, Any]:
    """The YAML ``default``, updated from the YAML ``path`` (its ``methods`` method-wise).

    ``path`` may set only ``known_keys`` and options of the ``methods``; ``None`` (or
    ``default`` itself) gives ``default`` unchanged.
    """
    config = _read_yaml(default)
    if path is None or Path(path).resolve() == default.resolve():
        return config
    path = Path(path)
    loaded = _read_yaml(path)
    unknown = set(loaded) - known_keys
    if unknown:
        raise ValueError(
            f"`--config` {path}: unknown keys {sorted(unknown)}; known {sorted(known_keys)}"
        )
    for key, value in loaded.items():
        if key == "methods":
            for method, options in (value or {}).items():
                if method not in methods:
                    raise ValueError(
                        f"`--config` {path}: unknown method {method!r}; known {methods}"
                    )
                config["methods"][method].update(options or {})
        else:
            config[key] = value
    return config


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The benchmark hyperparameters: ``uci.yaml``, updated (method-wise) from ``path``."""
    config = _merged_config(DEFAULT_CONFIG, path, _GLOBAL_KEYS, METHODS)
    unknown = set(config.get("per_dataset") or {}) - set(UCI_DATASETS)
    if unknown:
        raise ValueError(
            f"`--config` {path}: `per_dataset` has unknown data sets {sorted(unknown)}; "
            f"known {', '.join(UCI_DATASETS)}"
        )
    return config


def _dataset_options(config: dict[str, Any], dataset: str, method: str) -> dict[str, Any]:
    """Global options, then the method's, then ``per_dataset[dataset]`` (and its method part)."""
    options = {k: v for k, v in config.items() if k not in ("methods", "per_dataset")}
    options.update(config["methods"][method])
    override = (config.get("per_dataset") or {}).get(dataset) or {}
    options.update({k: v for k, v in override.items() if k != "methods"})
    options.update((override.get("methods") or {}).get(method) or {})
    return options


# ----------------------------------------------------------------------------------------------
# The library's methods, stacked over the splits


def build_method(
    method: str,
    num_features: int,
    num_hidden: int,
    options: dict[str, Any],
    num_epochs: int,
    resolution: float = 0.0,
) -> UQMethod:
    """One run of ``method`` for the protocol's MLP ``D -> hidden -> O`` and ``options``.

    ``O`` is 2 (a Gaussian's mean and scale), ``3 K`` for the MDN's ``K`` components, 4 for
    deep evidential regression, 2 or 3 for the Student-t MVE (fixed or learned ``df``).
    ``resolution`` is the grid step of the standardized targets (wine quality's integer scores;
    see :class:`uq_box.losses.NLL`); the Gaussian, Student-t, mixture and evidential heads widen
    their scales by its rounding error (DUE's GP has one learned noise for all points, which
    cannot collapse onto single targets).
    """
    lr, schedule = float(options["lr"]), str(options["lr_schedule"])
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"`lr_schedule` must be 'constant' or 'cosine', got {schedule!r}")
    common: dict[str, Any] = {
        "criterion": NLL(min_std=float(options["min_std"]), resolution=resolution),
        # the fused kernel: one pass over each stacked tensor per step (the same Adam update;
        # 8-17% less fit time than `foreach` on these small steps)
        "optimizer": partial(
            torch.optim.Adam, lr=lr, weight_decay=float(options["weight_decay"]), fused=True
        ),
    }
    if schedule == "cosine":  # per epoch, from lr down to lr / 100
        common["lr_scheduler"] = partial(
            torch.optim.lr_scheduler.CosineAnnealingLR,
            T_max=max(num_epochs - 1, 1),
            eta_min=lr / 100,
        )
    dropout = float(options.get("dropout_p", 0.0)) if method == "mc_dropout" else 0.0
    samples = int(options["eval_samples"])
    min_std = float(options["min_std"])
    if method == "mdn":
        k = int(options["num_components"])
        network = MLP(num_features, (num_hidden,), 3 * k)
        common["criterion"] = GaussianMixtureNLL(k, min_std=min_std, resolution=resolution)
        return MDNRegression(network, num_components=k, **common)
    if method == "der":
        common["criterion"] = NormalInverseGammaNLL(
            coeff=float(options["coeff"]), resolution=resolution
        )
        return DERRegression(MLP(num_features, (num_hidden,), 4), **common)
    if method == "mve_student_t":
        df = options.get("df")
        common["criterion"] = StudentTNLL(
            df=None if df is None else float(df),
            min_scale=min_std,
            min_df=float(options["min_df"]),
            resolution=resolution,
        )
        width = common["criterion"].num_outputs
        return MVERegression(MLP(num_features, (num_hidden,), width), **common)
    if method == "due":  # the output layer becomes the sparse GP; its likelihood is its own
        del common["criterion"]
        return DUERegression(
            MLP(num_features, (num_hidden,), 1),
            coefficient=float(options["coefficient"]),
            num_inducing=int(options["num_inducing"]),
            num_mc_samples_test=samples,
            **common,
        )
    network = MLP(num_features, (num_hidden,), 2, dropout_p=dropout)
    if method == "sngp":  # the output layer becomes the random-feature GP of mean and scale
        return SNGPRegression(
            network,
            coefficient=float(options["coefficient"]),
            num_features=int(options["num_random_features"]),
            lengthscale=float(options["lengthscale"]),
            ridge_penalty=float(options["ridge_penalty"]),
            num_mc_samples_test=samples,
            **common,
        )
    if method == "mve":
        return MVERegression(network, **common)
    if method == "deep_ensemble":
        return DeepEnsembleRegression(network, num_members=int(options["num_members"]), **common)
    if method == "mc_dropout":
        return MCDropoutRegression(network, num_mc_samples_test=samples, **common)
    if method == "bnn_vi":
        return BNNVIRegression(
            network,
            prior=float(options["prior_std"]),
            posterior_rho_init=float(options["posterior_rho_init"]),
            estimator=str(options["estimator"]),
            num_mc_samples_train=int(options["num_mc_samples_train"]),
            num_mc_samples_test=samples,
            **common,
        )
    raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")


def split_metrics(mean: Tensor, std: Tensor, target: Tensor) -> dict[str, float]:
    """Test metrics in the units given (pass original units): RMSE, LL, CRPS, coverage, area.

    ``test_log_likelihood`` is the Gaussian with the predictive mean and std (moment-matched),
    as the published deep ensembles table; the real predictive density's is
    ``test_ll_density`` (:func:`original_units_metrics`).
    """
    mean, std, target = (t.to(torch.float64).reshape(-1) for t in (mean, std, target))
    return {
        "test_rmse": float((mean - target).square().mean().sqrt()),
        "test_log_likelihood": -float(gaussian_nll(mean, std, target)),
        "test_crps": float(gaussian_crps(mean, std, target)),
        "test_coverage_95": float(interval_coverage(mean, std, target, 0.95)),
        "test_miscalibration_area": float(miscalibration_area(mean, std, target)),
    }


def original_units_metrics(
    mean: Tensor, std: Tensor, split: UCISplit, log_density: Tensor | None = None
) -> dict[str, float]:
    """:func:`split_metrics` of a standardized prediction on ``split``'s test targets, in the
    original units: ``mean * y_std + y_mean`` and ``std * y_std`` against the raw targets (so the
    log-likelihood is the standardized one minus ``log(y_std)``).

    ``log_density``: the predictive log-density of each standardized test target (the method's
    family, mixed over its samples or members); its mean minus ``log(y_std)`` is
    ``test_ll_density``.
    """
    target = torch.as_tensor(split.y_test * split.y_std + split.y_mean)
    metrics = split_metrics(mean * split.y_std + split.y_mean, std * split.y_std, target)
    if log_density is not None:
        metrics["test_ll_density"] = float(log_density.double().mean()) - math.log(split.y_std)
    return metrics


def _trainer(num_epochs: int) -> Any:
    from lightning import Trainer

    # barebones: no logging, checkpoints, progress bar or summary (the benchmark reads the
    # predictions); Lightning's per-step bookkeeping is a large part of a step this small. No
    # validation: no model selection on the held-out splits
    return Trainer(
        max_epochs=num_epochs, accelerator="cpu", devices=1, barebones=True,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """No per-fit banners (devices, barebones notice) among the benchmark's output."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            yield
    finally:
        logger.setLevel(level)


def _predict_in_chunks(
    model: StackedRuns,
    x: Tensor,
    chunk: int = 256,
    y: Tensor | None = None,
    runs: Sequence[UQMethod] = (),
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Predictive mean and std ``[K, T]`` of per-run inputs ``[K, T, D]``, ``chunk`` rows at a time
    (bounded memory with 100 Monte Carlo samples on the larger test sets).

    With the targets ``y`` ``[K, T]`` and the ``runs`` (their criteria), also the predictive
    log-density ``[K, T]``: the criterion's ``log_prob`` mixed over the samples.
    """
    model.eval()
    means, stds, densities = [], [], []
    for start in range(0, x.shape[1], chunk):
        preds = model.predict_step(x[:, start : start + chunk])
        means.append(preds["pred"][..., 0])
        stds.append(preds["pred_uct"][..., 0])
        if y is not None:
            target = y[:, start : start + chunk, None]
            densities.append(_log_density(preds, target, runs))
    if y is None:
        return torch.cat(means, 1), torch.cat(stds, 1)
    return torch.cat(means, 1), torch.cat(stds, 1), torch.cat(densities, 1)


def _log_density(preds: dict[str, Tensor], target: Tensor, runs: Sequence[UQMethod]) -> Tensor:
    """Each run's predictive log-density ``[K, T]`` of the targets ``[K, T, 1]``: the criterion's
    ``log_prob`` mixed over the sampled outputs, or, for a Gaussian process output (SNGP, DUE:
    no ``outputs``), the Gaussian of ``pred`` and ``pred_uct``, its exact predictive.
    """
    if "outputs" not in preds:
        normal = torch.distributions.Normal(preds["pred"], preds["pred_uct"])
        return normal.log_prob(target)[..., 0]
    return torch.stack(
        [
            mixture_log_prob(run.criterion.log_prob(preds["outputs"][i], target[i]))
            for i, run in enumerate(runs)
        ]
    )[..., 0]


def fit_dataset(
    root: str | Path,
    dataset: str,
    method: str,
    splits: Sequence[int],
    config: dict[str, Any],
    epochs: int | None = None,
    val_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """Train ``method`` on ``splits`` of ``dataset`` as stacked runs; one row per split.

    Args:
        root: the UCI folder.
        dataset: a name of :data:`~uq_box.datamodules.uci.UCI_DATASETS`.
        method: one of :data:`METHODS`.
        splits: split numbers.
        config: hyperparameters from :func:`load_config`.
        epochs: override the epochs (``n_epochs.txt`` times ``epoch_multiplier``).
        val_fraction: for hyperparameter selection: train on the first part of each training
            index file and report the metrics on its last ``val_fraction`` (Gal's protocol uses
            0.2) instead of the test split.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")
    opts = _dataset_options(config, dataset, method)
    info = uci_info(root, dataset)
    num_epochs = int(
        epochs if epochs is not None else round(info["n_epochs"] * opts["epoch_multiplier"])
    )
    seed = int(opts["seed"]) + 1000 * METHODS.index(method)
    modules = _split_datamodules(root, dataset, splits, int(opts["batch_size"]), val_fraction, seed)
    torch.manual_seed(seed)
    runs = [
        build_method(
            method, m.num_features, info["n_hidden"], opts, num_epochs, m.target_resolution
        )
        for m in modules
    ]
    model = StackedRuns(runs)
    start = time.perf_counter()
    with _quiet_lightning():
        _trainer(num_epochs).fit(model, datamodule=StackedDataModule(modules))
    fit_seconds = time.perf_counter() - start
    metrics = _test_metrics(model, runs, [m.data for m in modules])
    return [
        {"dataset": dataset, "method": method, "split": int(k), **split_metrics,
         "fit_seconds": fit_seconds / len(modules), "epochs": num_epochs}
        for k, split_metrics in zip(splits, metrics, strict=True)
    ]  # fmt: skip


def _split_datamodules(
    root: str | Path,
    dataset: str,
    splits: Sequence[int],
    batch_size: int,
    val_fraction: float,
    seed: int,
) -> list[UCIRegressionDatamodule]:
    """One data module per split, of equal training sizes (they train as stacked runs); with
    ``val_fraction`` the validation rows stand in for the test split, which is never read.
    """
    modules = [
        UCIRegressionDatamodule(
            dataset,
            int(k),
            root,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed + int(k),
        )  # fmt: skip
        for k in splits
    ]
    if val_fraction > 0:
        for m in modules:
            m.data.x_test, m.data.y_test = m.data.x_val, m.data.y_val
    sizes = {len(m.data.y_train) for m in modules}
    if len(sizes) != 1:
        raise ValueError(f"{dataset}: splits {list(splits)} have different training sizes {sizes}")
    return modules


def _test_metrics(
    model: StackedRuns, runs: Sequence[UQMethod], data: Sequence[UCISplit]
) -> list[dict[str, float]]:
    """Each run's test metrics in the original units of its split."""
    x_test = torch.tensor(np.stack([d.x_test for d in data]), dtype=torch.float32)
    y_test = torch.tensor(np.stack([d.y_test for d in data]), dtype=torch.float32).reshape(
        len(data), -1
    )
    with torch.no_grad():
        mean, std, log_density = _predict_in_chunks(model, x_test, y=y_test, runs=runs)
    return [
        original_units_metrics(mean[i].double(), std[i].double(), d, log_density[i])
        for i, d in enumerate(data)
    ]


def _fit_task(args: tuple) -> list[dict[str, Any]]:
    root, dataset, method, splits, config, epochs, val_fraction = args
    torch.set_num_threads(int(config["threads"]))
    return fit_dataset(root, dataset, method, splits, config, epochs, val_fraction)


# ----------------------------------------------------------------------------------------------
# Published numbers, tables and plots


def published_results() -> Any:
    """The published UCI table (``uq_box/benchmarks/published_results.csv``) as a DataFrame."""
    import pandas as pd

    with resources.files("uq_box.benchmarks").joinpath("published_results.csv").open() as f:
        return pd.read_csv(f, comment="#")


def summarize(results: Any) -> Any:
    """Mean and standard error over splits per (dataset, method) of every metric."""
    metrics = [c for c in results.columns if c.startswith("test_") or c == "fit_seconds"]
    grouped = results.groupby(["dataset", "method"], sort=False)[metrics]
    mean = grouped.mean()
    count = grouped.count()
    se = grouped.std(ddof=1) / np.sqrt(count)
    return mean, se.fillna(0.0), count


def _fmt(mean: float, se: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(results: Any, metric: str = "test_log_likelihood") -> str:
    """Markdown table of mean ± standard error per data set (rows) and method (columns).

    The published PBP, MC dropout and deep ensembles numbers stand beside uq_box's; the best
    entry per data set is bold (highest log-likelihood, lowest RMSE).
    """
    higher_better = metric in ("test_log_likelihood", "test_ll_density")
    mean, se, _ = summarize(results)
    published = published_results()
    published = published[published["metric"] == metric]
    methods = [m for m in METHODS if m in set(results["method"])]
    datasets = [d for d in UCI_DATASETS if d in set(results["dataset"])]
    header = ["dataset", *PUBLISHED_SHORT, *(METHOD_LABELS[m] for m in methods)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in datasets:
        digits = 3 if dataset == "naval-propulsion-plant" and metric == "test_rmse" else 2
        entries: list[tuple[float, str]] = []
        for full in PUBLISHED_SHORT.values():
            row = published[(published["dataset"] == dataset) & (published["method"] == full)]
            if row.empty:
                entries.append((math.nan, "–"))
            else:
                m, s = float(row["mean"].iloc[0]), float(row["standard_error"].iloc[0])
                entries.append((m, _fmt(m, s, 2)))
        for method in methods:
            m, s = mean.loc[(dataset, method), metric], se.loc[(dataset, method), metric]
            entries.append((float(m), _fmt(float(m), float(s), digits)))
        values = np.array([v for v, _ in entries])
        best = np.nanmax(values) if higher_better else np.nanmin(values)
        cells = [f"**{text}**" if value == best else text for value, text in entries]
        lines.append("| " + " | ".join([dataset, *cells]) + " |")
    return "\n".join(lines)


def metrics_table(results: Any) -> str:
    """Markdown table of every metric of uq_box's methods (mean ± standard error over splits)."""
    mean, se, count = summarize(results)
    columns = [
        ("test_crps", "CRPS", 3),
        ("test_coverage_95", "95% coverage", 3),
        ("test_miscalibration_area", "miscal. area", 3),
        ("fit_seconds", "fit s / split", 2),
    ]
    head = "| dataset | method | splits | epochs | " + " | ".join(c[1] for c in columns) + " |"
    lines = [head, "|" + "---|" * (4 + len(columns))]
    epochs = results.groupby(["dataset", "method"], sort=False)["epochs"].first()
    for dataset in [d for d in UCI_DATASETS if d in set(results["dataset"])]:
        for method in [m for m in METHODS if m in set(results["method"])]:
            key = (dataset, method)
            if key not in mean.index:
                continue
            digits = {c: d for c, _, d in columns}
            if dataset == "naval-propulsion-plant":
                digits["test_crps"] = 5
            cells = [_fmt(mean.loc[key, c], se.loc[key, c], digits[c]) for c, _, _ in columns[:-1]]
            cells.append(f"{mean.loc[key, 'fit_seconds']:.2f}")  # the same for every split
            n = int(count.loc[key, "test_rmse"])
            lines.append(
                f"| {dataset} | {METHOD_LABELS[method]} | {n} | {epochs.loc[key]} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def target_check(results: Any) -> tuple[str, list[str]]:
    """Whether some uq_box method matches the deep ensembles paper's test LL within its SE.

    "Matches within its standard error" means ``ours_mean >= paper_mean - paper_se``.
    """
    mean, se, _ = summarize(results)
    published = published_results()
    paper = published[
        (published["metric"] == "test_log_likelihood")
        & (published["method"] == DEEP_ENSEMBLES_PAPER)
    ]
    lines, missed = [], []
    for dataset in [d for d in UCI_DATASETS if d in set(results["dataset"])]:
        row = paper[paper["dataset"] == dataset]
        target = float(row["mean"].iloc[0]) - float(row["standard_error"].iloc[0])
        ours = mean.loc[dataset, "test_log_likelihood"]
        best_method = ours.idxmax()
        ok = bool(ours.max() >= target)
        if not ok:
            missed.append(dataset)
        lines.append(
            f"| {dataset} | {float(row['mean'].iloc[0]):.2f} ± {float(row['standard_error'].iloc[0]):.2f} "
            f"| {METHOD_LABELS[best_method]}: {ours.max():.2f} ± {se.loc[(dataset, best_method), 'test_log_likelihood']:.2f} "
            f"| {'yes' if ok else '**no**'} |"
        )
    head = "| dataset | deep ensembles paper LL | best uq_box LL | met |\n|---|---|---|---|"
    return head + "\n" + "\n".join(lines), missed


# matplotlib's default cycle without its grey (C7), which the published numbers use
_METHOD_COLORS = tuple(f"C{i}" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9))


def plot_results(results: Any, path: str | Path) -> Path:
    """Mean ± standard error of test RMSE and log-likelihood per data set and method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, se, _ = summarize(results)
    published = published_results()
    datasets = [d for d in UCI_DATASETS if d in set(results["dataset"])]
    methods = [m for m in METHODS if m in set(results["method"])]
    entries = [(label, full) for label, full in PUBLISHED_SHORT.items()] + [
        (METHOD_LABELS[m], m) for m in methods
    ]
    fig, axes = plt.subplots(
        2, len(datasets), figsize=(2.3 * len(datasets) + 1, 6.5), squeeze=False
    )
    for col, dataset in enumerate(datasets):
        for row, metric in enumerate(("test_log_likelihood", "test_rmse")):
            ax = axes[row, col]
            for i, (label, key) in enumerate(entries):
                if key in METHODS:
                    m, s = mean.loc[(dataset, key), metric], se.loc[(dataset, key), metric]
                    marker, color = "o", _METHOD_COLORS[methods.index(key) % len(_METHOD_COLORS)]
                else:
                    pub = published[
                        (published["dataset"] == dataset)
                        & (published["method"] == key)
                        & (published["metric"] == metric)
                    ]
                    if pub.empty:
                        continue
                    m, s = float(pub["mean"].iloc[0]), float(pub["standard_error"].iloc[0])
                    # published numbers in greys, so the method colors stay distinct
                    marker, color = "s", str(0.15 + 0.25 * (i % 3))
                ax.errorbar(i, m, yerr=s, fmt=marker, color=color, label=label, capsize=2)
            ax.set_xticks([])
            ax.set_title(dataset if row == 0 else "", fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("test log-likelihood" if row == 0 else "test RMSE")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The command


def _parse_list(value: str, valid: Sequence[str], argument: str) -> list[str]:
    if value == "all":
        return list(valid)
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in valid]
    if unknown or not items:
        raise SystemExit(
            f"error: `{argument}` got unknown {unknown or value!r}; valid: all, {', '.join(valid)}"
        )
    return items


def _parse_ranges(value: str) -> list[int]:
    """The integers of ``"0,1,2"`` or ``"0-2"`` (or a mix); ``ValueError`` when malformed."""
    out: list[int] = []
    for part in value.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def _parse_splits(value: str) -> list[int] | None:
    if value == "all":
        return None
    try:
        return _parse_ranges(value)
    except ValueError:
        raise SystemExit(
            f"error: `--splits` must be 'all', '0,1,2' or '0-4', got {value!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uq-box benchmark uci", description="Run the UCI regression benchmark protocol."
    )
    parser.add_argument(
        "--methods", default="all", help=f"comma list of {', '.join(METHODS)} or all"
    )
    parser.add_argument("--datasets", default="all", help="comma list of data sets or all")
    parser.add_argument(
        "--splits", default="all", help="'all', '0,1' or '0-4' (limited per data set)"
    )
    parser.add_argument(
        "--root", default=None,
        help="UCI folder (default: $UQ_BOX_UCI_ROOT, else ~/.cache/uq_box/uci)",
    )  # fmt: skip
    parser.add_argument("--config", default=None, help="YAML (default: uq_box/benchmarks/uci.yaml)")
    parser.add_argument("--epochs", type=int, default=None, help="override the paper epochs")
    parser.add_argument("--output", default="uci_benchmark", help="folder for CSV, Markdown, plot")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: config)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.0,
        help="tune on validation: train on the first part of each training index file and report "
        "metrics on its last fraction (0.2 in Gal's code) instead of the test split",
    )  # fmt: skip
    parser.add_argument(
        "--download", action="store_true",
        help="download missing data into --root (always done for the default root)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_benchmark(
    root: str | Path,
    datasets: Sequence[str],
    methods: Sequence[str],
    splits: Sequence[int] | None,
    config: dict[str, Any],
    epochs: int | None = None,
    workers: int = 1,
    progress: bool = True,
    val_fraction: float = 0.0,
) -> Any:
    """Every (data set, method) over the chosen splits; a DataFrame of one row per split."""
    import pandas as pd
    from tqdm import tqdm

    tasks = []
    for dataset in datasets:
        n_splits = uci_info(root, dataset)["n_splits"]
        chosen = list(range(n_splits)) if splits is None else [k for k in splits if k < n_splits]
        bad = [k for k in (splits or []) if not 0 <= k]
        if bad:
            raise SystemExit(f"error: `--splits` must be non-negative, got {bad}")
        if not chosen:
            raise SystemExit(
                f"error: `--splits` {splits} selects no split of {dataset} (it has {n_splits})"
            )
        for method in methods:
            tasks.append((str(root), dataset, method, chosen, config, epochs, val_fraction))
    # the largest first, so that two workers finish together
    tasks.sort(key=lambda t: -_cost(t))
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=sum(len(t[3]) for t in tasks), unit="split", disable=not progress, file=sys.stderr
    )
    if workers <= 1:
        torch.set_num_threads(int(config["threads"]))
        for task in tasks:
            bar.set_postfix_str(f"{task[1]} / {task[2]}")
            rows.extend(_fit_task(task))
            bar.update(len(task[3]))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_fit_task, task): task for task in tasks}
            for future in as_completed(futures):
                task = futures[future]
                rows.extend(future.result())
                bar.set_postfix_str(f"done {task[1]} / {task[2]}")
                bar.update(len(task[3]))
    bar.close()
    frame = pd.DataFrame(rows)
    order = {d: i for i, d in enumerate(UCI_DATASETS)}
    frame["_d"] = frame["dataset"].map(order)
    frame["_m"] = frame["method"].map({m: i for i, m in enumerate(METHODS)})
    return (
        frame.sort_values(["_d", "_m", "split"]).drop(columns=["_d", "_m"]).reset_index(drop=True)
    )


_SIZE = {
    "protein-tertiary-structure": 41157 * 20 / 40,
    "naval-propulsion-plant": 10741,
    "power-plant": 8611,
    "kin8nm": 7373,
}


def _cost(task: tuple) -> float:
    _, dataset, method, chosen, config, _, _ = task
    options = _dataset_options(config, dataset, method)
    cost = _SIZE.get(dataset, 1000) * len(chosen) * (1 + 0.3 * options["num_members"])
    return cost * options["epoch_multiplier"] * (2 if method == "bnn_vi" else 1)


def main(argv: Sequence[str] | None = None) -> int:
    """``uq-box benchmark uci [options]``; writes ``uci_results.csv``, ``uci.md``, ``uci.png``."""
    import yaml

    args = build_parser().parse_args(argv)
    methods = _parse_list(args.methods, METHODS, "--methods")
    datasets = _parse_list(args.datasets, UCI_DATASETS, "--datasets")
    splits = _parse_splits(args.splits)
    config = load_config(args.config)
    workers = int(config["workers"] if args.workers is None else args.workers)
    root = default_uci_root() if args.root is None else Path(args.root)
    for dataset in datasets:
        if args.download or (args.root is None and not _complete(root, dataset)):
            download_uci(root, dataset)
    command = "uq-box benchmark uci " + " ".join(sys.argv[3:] if argv is None else argv)
    print(f"config ({args.config or DEFAULT_CONFIG}):\n" + yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    results = run_benchmark(
        root, datasets, methods, splits, config, args.epochs, workers, not args.no_progress,
        args.val_fraction,
    )  # fmt: skip
    wall = time.perf_counter() - start
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "uci_results.csv", index=False)
    plot = plot_results(results, out / "uci.png")
    ll_table = markdown_table(results, "test_log_likelihood")
    density_table = markdown_table(results, "test_ll_density")
    rmse_table = markdown_table(results, "test_rmse")
    check, missed = target_check(results)
    report = "\n\n".join(
        [
            "# UCI regression benchmark",
            f"Command: `{command}`",
            f"Wall time: {wall:.1f} s ({workers} worker(s), {config['threads']} torch thread(s) each)",
            "## Test log-likelihood (higher is better)\n\n"
            "The Gaussian with the predictive mean and standard deviation (moment-matched), as "
            "the published deep ensembles table.\n\n" + ll_table,
            "## Test log-likelihood of the predictive density (higher is better)\n\n"
            "The method's own density: its likelihood family (Gaussian, Student-t, mixture of "
            "Gaussians), mixed over its Monte Carlo samples or members. Published: MC dropout's "
            "(Gal & Ghahramani) is of this kind (a mixture over dropout samples).\n\n"
            + density_table,
            "## Test RMSE (lower is better)\n\n" + rmse_table,
            "## Other metrics of uq_box's methods (original units)\n\n"
            "CRPS in the target's units; fit seconds are the vectorized fit time of all splits "
            "(and members) of a data set and method, divided by the number of splits.\n\n"
            + metrics_table(results),
            "## Target: some uq_box method >= deep ensembles paper LL - its SE\n\n" + check,
            "## Config\n\n```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```",
            f"![UCI results]({plot.name})",
        ]
    )
    (out / "uci.md").write_text(report + "\n")
    print(ll_table + "\n\n" + rmse_table + "\n\n" + check)
    print(f"\nwall time {wall:.1f} s; results in {out}/uci_results.csv, uci.md, uci.png")
    if missed:
        print(f"target not met on: {', '.join(missed)}")
    return 0
