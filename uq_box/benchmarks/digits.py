"""The digits classification benchmark: ``uq-box benchmark digits`` writes one table.

Every classification method family of :mod:`uq_box.methods.registry` trains the same small CNN
(:class:`uq_box.models.CNN`: two 3x3 convolution blocks of 16 and 32 channels, a hidden layer of
64 units) on scikit-learn's 8x8 digits (:class:`~uq_box.datamodules.DigitsDatamodule`, offline)
with a plain ``lightning.Trainer``, for a fixed number of epochs, once per seed (MC BatchNorm:
the CNN with ``batch_norm=True``; the parameter-efficient ensembles, SNGP, DDU and DUE convert
it in place). Test-time augmentation (Gaussian pixel noise) and the post-hoc calibrators are rows
on top of the deterministic network of the same seed. Each row is scored on the test split by
the library's own metrics:

- accuracy, NLL (:func:`~uq_box.metrics.functional_classification.multiclass_nll`), Brier score
  (:func:`~uq_box.metrics.functional_classification.brier_score`), top-label ECE with equal-width
  bins (:func:`~uq_box.metrics.functional_classification.expected_calibration_error`) and with
  equal-mass bins (:func:`~uq_box.metrics.functional_calibration.adaptive_calibration_error`);
- AURC of the 0/1 error with the predictive entropy ``pred_uct`` as the abstention score
  (:func:`~uq_box.metrics.functional_selective.aurc`);
- mean size and empirical coverage of the conformal sets at ``1 - alpha`` = 90%
  (:class:`~uq_box.methods.ConformalClassification`, LAC score), calibrated on a held-out split
  used neither for training nor by the post-hoc calibrators;
- OOD AUROC of the test digits against the same digits rotated by each of ``ood_angles``
  degrees (:func:`~uq_box.methods.ood.evaluate_ood` with
  :class:`~uq_box.datamodules.ood.RotatedDigitsDatamodule`; the mean over the angles), with the
  predictive entropy as the score, and with the mutual information for the methods that average several networks;
- the wall time of ``Trainer.fit`` (post-hoc rows: of the calibration, on top of the
  deterministic fit).

The hyperparameters are ``digits.yaml`` beside this module (``--config`` updates it). The
results are one row per (method, seed) in ``digits_results.csv`` and mean ± standard error over
the seeds in ``digits.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uq_box.benchmarks.uci import (
    _merged_config,
    _parse_list,
    _parse_ranges,
    _quiet_lightning,
    _trainer,
)
from uq_box.datamodules import DigitsDatamodule
from uq_box.datamodules.ood import RotatedDigitsDatamodule
from uq_box.methods import (
    BatchEnsembleClassification,
    BNNVIClassification,
    ConformalClassification,
    DDUClassification,
    DeepEnsembleClassification,
    DeterministicClassification,
    DirichletCalibration,
    DUEClassification,
    HistogramBinning,
    IsotonicCalibration,
    LaplaceClassification,
    MasksemblesClassification,
    MatrixScaling,
    MCBatchNormClassification,
    MCDropoutClassification,
    MIMOClassification,
    PackedEnsembleClassification,
    Rank1BNNClassification,
    SGMCMCClassification,
    SNGPClassification,
    SWAGClassification,
    TemperatureScaling,
    TTAClassification,
    UQMethod,
    VectorScaling,
)
from uq_box.methods.ood import evaluate_ood
from uq_box.methods.tta import GaussianNoise
from uq_box.metrics.functional_calibration import adaptive_calibration_error
from uq_box.metrics.functional_classification import (
    brier_score,
    expected_calibration_error,
    multiclass_nll,
)
from uq_box.metrics.functional_selective import aurc
from uq_box.metrics.functional_sets import mean_set_size, set_coverage
from uq_box.models import CNN
from uq_box.optim import SGHMC, SGLD

__all__ = [
    "COLUMNS",
    "DEFAULT_CONFIG",
    "METHODS",
    "NOT_BENCHMARKED",
    "POSTHOC",
    "TRAINED",
    "WRAPPED",
    "build_method",
    "evaluate",
    "laplace_available",
    "load_config",
    "main",
    "markdown_table",
    "run_benchmark",
    "write_page",
]

TRAINED = {
    "deterministic": DeterministicClassification,
    "mc_dropout": MCDropoutClassification,
    "mc_batchnorm": MCBatchNormClassification,
    "deep_ensemble": DeepEnsembleClassification,
    "batch_ensemble": BatchEnsembleClassification,
    "packed_ensemble": PackedEnsembleClassification,
    "masksembles": MasksemblesClassification,
    "mimo": MIMOClassification,
    "bnn_vi": BNNVIClassification,
    "rank1_bnn": Rank1BNNClassification,
    "swag": SWAGClassification,
    "sgld": SGMCMCClassification,
    "sghmc": SGMCMCClassification,
    "sngp": SNGPClassification,
    "ddu": DDUClassification,
    "due": DUEClassification,
    "laplace": LaplaceClassification,
}
"""Methods trained by ``Trainer.fit``: name -> class (the SG-MCMC rows: the general class with
the sampler as its optimizer)."""

POSTHOC = {
    "temperature_scaling": TemperatureScaling,
    "vector_scaling": VectorScaling,
    "matrix_scaling": MatrixScaling,
    "dirichlet": DirichletCalibration,
    "histogram_binning": HistogramBinning,
    "isotonic": IsotonicCalibration,
}
"""Post-hoc calibrators, fitted on the ``"val"`` split around the deterministic network."""

WRAPPED = {"tta": TTAClassification}
"""Prediction-time wrappers of the fitted deterministic network (nothing fitted)."""

METHODS = (*TRAINED, *WRAPPED, *POSTHOC)
"""The rows of the table, in order."""

LABELS = {
    "deterministic": "Deterministic",
    "mc_dropout": "MC dropout",
    "mc_batchnorm": "MC BatchNorm (CNN with BatchNorm)",
    "deep_ensemble": "Deep ensemble (5)",
    "batch_ensemble": "BatchEnsemble",
    "packed_ensemble": "Packed-Ensembles",
    "masksembles": "Masksembles",
    "mimo": "MIMO",
    "bnn_vi": "BNN VI (Bayes by Backprop)",
    "rank1_bnn": "Rank-1 BNN",
    "swag": "SWAG",
    "sgld": "SG-MCMC: pSGLD",
    "sghmc": "SG-MCMC: SGHMC",
    "sngp": "SNGP",
    "ddu": "DDU",
    "due": "DUE",
    "laplace": "Laplace (last layer, KFAC)",
    "tta": "+ test-time augmentation (noise)",
    "temperature_scaling": "+ temperature scaling",
    "vector_scaling": "+ vector scaling",
    "matrix_scaling": "+ matrix scaling",
    "dirichlet": "+ Dirichlet calibration",
    "histogram_binning": "+ histogram binning",
    "isotonic": "+ isotonic regression",
}

NOT_BENCHMARKED = {
    "SGLDClassification": "a fixed-sampler alias of SGMCMCClassification (the pSGLD row)",
    "PSGLDClassification": "a fixed-sampler alias of SGMCMCClassification (the pSGLD row)",
    "SGHMCClassification": "a fixed-sampler alias of SGMCMCClassification (the SGHMC row)",
    "ConformalClassification": "the set-size and coverage columns of every row",
    "StackedRuns": "runs several fits of a method as one (every entry); the method has its row",
}
"""Classification entries of the registry (by label, or by class for all its entries) without a
row of their own, and why."""

COLUMNS = (
    ("accuracy", "accuracy ↑", 3),
    ("nll", "NLL ↓", 3),
    ("brier", "Brier ↓", 3),
    ("ece", "ECE ↓", 3),
    ("adaptive_ece", "adaptive ECE ↓", 3),
    ("aurc", "AURC ↓", 4),
    ("set_size", "set size (90%) ↓", 2),
    ("set_coverage", "set coverage", 3),
    ("ood_auroc_entropy", "OOD AUROC, entropy ↑", 3),
    ("ood_auroc_mi", "OOD AUROC, MI ↑", 3),
    ("fit_seconds", "fit s", 2),
)
"""Columns of the table: key in the CSV, header, decimals."""

DEFAULT_CONFIG = Path(__file__).with_name("digits.yaml")
"""The benchmark's hyperparameters (the one place they are written down)."""

_GLOBAL_KEYS = {
    "seeds", "threads", "workers", "val_fraction", "test_fraction", "conformal_fraction",
    "batch_size", "network", "epochs", "lr", "eval_samples", "alpha", "ood_angles", "ece_bins",
    "methods",
}  # fmt: skip


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The benchmark hyperparameters: ``digits.yaml``, updated (method-wise) from ``path``."""
    return _merged_config(DEFAULT_CONFIG, path, _GLOBAL_KEYS, METHODS)


def _options(config: dict[str, Any], method: str) -> dict[str, Any]:
    """Global options, then the method's."""
    options = {k: v for k, v in config.items() if k != "methods"}
    options.update(config["methods"].get(method) or {})
    return options


def laplace_available() -> bool:
    """Whether the ``laplace`` extra imports (the Laplace row needs it)."""
    try:
        import laplace  # noqa: F401
    except Exception:  # ImportError, or a torchvision that does not match torch
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Building and fitting the library's methods


def _network(options: dict[str, Any], dropout_p: float = 0.0, batch_norm: bool = False) -> CNN:
    net = options["network"]
    return CNN(
        channels=tuple(net["channels"]),
        hidden=int(net["hidden"]),
        dropout_p=dropout_p,
        batch_norm=batch_norm,
    )


def build_method(method: str, options: dict[str, Any], base: UQMethod | None = None) -> UQMethod:
    """One fresh instance of ``method`` with ``options`` (:func:`_options`); a post-hoc method
    or a wrapper (TTA) wraps ``base``, the fitted deterministic network. Seed first for a fixed
    initialization.
    """
    if method in POSTHOC or method in WRAPPED:
        return _wrap_fitted(method, options, base)
    if method not in TRAINED:
        raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")
    for family in (_baseline, _ensemble, _single_pass, _bayesian):
        built = family(method, options)
        if built is not None:
            return built
    raise AssertionError(f"no builder for {method!r}")  # every TRAINED method has one


def _wrap_fitted(method: str, options: dict[str, Any], base: UQMethod | None) -> UQMethod:
    """A post-hoc calibrator or the TTA wrapper around the fitted ``base``."""
    if base is None:
        raise ValueError(f"post-hoc `method` {method!r} needs the fitted `base` method")
    if method == "tta":  # noise drawn per copy: eval_samples augmentations per image
        return TTAClassification(
            base,
            transforms=GaussianNoise(float(options["noise_std"])),
            num_mc_samples_test=int(options["eval_samples"]),
        )
    kwargs = {k: options[k] for k in _POSTHOC_KWARGS[method] if k in options}
    return POSTHOC[method](base, **kwargs)


def _adam(options: dict[str, Any]) -> partial:
    return partial(torch.optim.Adam, lr=float(options["lr"]))


def _baseline(method: str, options: dict[str, Any]) -> UQMethod | None:
    """The deterministic network and its MC dropout / MC batch norm variants."""
    adam, samples = _adam(options), int(options["eval_samples"])
    if method == "deterministic":
        return DeterministicClassification(_network(options), optimizer=adam)
    if method == "mc_dropout":
        return MCDropoutClassification(
            _network(options, float(options["dropout_p"])),
            optimizer=adam,
            num_mc_samples_test=samples,
        )
    if method == "mc_batchnorm":
        return MCBatchNormClassification(
            _network(options, batch_norm=True), optimizer=adam, num_mc_samples_test=samples
        )
    return None


def _ensemble(method: str, options: dict[str, Any]) -> UQMethod | None:
    """The deep ensemble and the efficient (one-network) ensembles."""
    adam, members = _adam(options), int(options.get("num_members", 1))
    if method == "deep_ensemble":
        return DeepEnsembleClassification(
            _network(options), optimizer=adam, num_members=int(options["num_members"])
        )
    if method == "batch_ensemble":
        return BatchEnsembleClassification(_network(options), optimizer=adam, num_members=members)
    if method == "packed_ensemble":
        return PackedEnsembleClassification(
            _network(options),
            optimizer=adam,
            num_members=members,
            alpha=int(options["alpha"]),
            gamma=int(options["gamma"]),
        )
    if method == "masksembles":
        return MasksemblesClassification(
            _network(options), optimizer=adam, num_members=members, scale=float(options["scale"])
        )
    if method == "mimo":
        return MIMOClassification(
            _network(options),
            optimizer=adam,
            num_members=members,
            input_repetition=float(options["input_repetition"]),
        )
    if method == "rank1_bnn":
        return Rank1BNNClassification(
            _network(options),
            optimizer=adam,
            num_members=members,
            prior=float(options["prior_std"]),
            posterior_rho_init=float(options["posterior_rho_init"]),
            num_mc_samples_train=int(options["num_mc_samples_train"]),
            num_mc_samples_test=int(options["samples_per_member"]),
        )
    return None


def _single_pass(method: str, options: dict[str, Any]) -> UQMethod | None:
    """The distance-aware single-pass methods: DUE, SNGP, DDU."""
    adam, samples = _adam(options), int(options["eval_samples"])
    if method == "due":
        return DUEClassification(
            _network(options),
            optimizer=adam,
            coefficient=float(options["coefficient"]),
            num_inducing=int(options["num_inducing"]),
            kernel=str(options["kernel"]),
            num_mc_samples_train=int(options["num_mc_samples_train"]),
            num_mc_samples_test=samples,
        )
    if method == "sngp":
        return SNGPClassification(
            _network(options),
            optimizer=adam,
            coefficient=float(options["coefficient"]),
            num_features=int(options["num_features"]),
            lengthscale=float(options["lengthscale"]),
            ridge_penalty=float(options["ridge_penalty"]),
            num_mc_samples_test=samples,
        )
    if method == "ddu":
        return DDUClassification(
            _network(options), optimizer=adam, coefficient=float(options["coefficient"])
        )
    return None


def _sampler(method: str, options: dict[str, Any]) -> partial:
    """The SG-MCMC optimizer of ``"sgld"`` or ``"sghmc"``."""
    if method == "sgld":
        return partial(
            SGLD, lr=float(options["lr"]), preconditioned=bool(options["preconditioned"])
        )
    return partial(
        SGHMC,
        lr=float(options["lr"]),
        mdecay=float(options["mdecay"]),
        num_burn_in_steps=int(options["num_burn_in_steps"]),
    )


def _bayesian(method: str, options: dict[str, Any]) -> UQMethod | None:
    """The approximate posteriors: BNN VI, SWAG, SG-MCMC, Laplace."""
    adam, samples = _adam(options), int(options["eval_samples"])
    if method == "bnn_vi":
        return BNNVIClassification(
            _network(options),
            optimizer=adam,
            stochastic_module_names=None,
            prior=float(options["prior_std"]),
            posterior_rho_init=float(options["posterior_rho_init"]),
            estimator=str(options["estimator"]),
            num_mc_samples_train=int(options["num_mc_samples_train"]),
            num_mc_samples_test=samples,
        )
    if method == "swag":
        return SWAGClassification(
            _network(options),
            optimizer=adam,
            stochastic_module_names=None,
            burnin_epochs=int(options["burnin_epochs"]),
            max_num_samples=int(options["max_num_samples"]),
            num_mc_samples_test=samples,
            scale=float(options["scale"]),
        )
    if method in ("sgld", "sghmc"):
        return SGMCMCClassification(
            _network(options),
            optimizer=_sampler(method, options),
            stochastic_module_names=None,
            prior=float(options["prior_std"]),
            burnin_epochs=int(options["burnin_epochs"]),
            thinning=int(options["thinning"]),
            max_num_samples=int(options["max_num_samples"]),
            num_mc_samples_test=min(samples, int(options["max_num_samples"])),
        )
    if method == "laplace":
        return LaplaceClassification(
            _network(options),
            optimizer=adam,
            subset_of_weights=str(options["subset_of_weights"]),
            hessian_structure=str(options["hessian_structure"]),
            prior_precision=float(options["prior_precision"]),
            optimize_prior_precision=options["optimize_prior_precision"],
            pred_type=str(options["pred_type"]),
            link_approx=str(options["link_approx"]),
            num_mc_samples_test=samples,
        )
    return None


_POSTHOC_KWARGS = {
    "temperature_scaling": ("max_iter",),
    "vector_scaling": ("max_iter", "intercept_reg"),
    "matrix_scaling": ("max_iter", "off_diagonal_reg", "intercept_reg"),
    "dirichlet": ("max_iter", "off_diagonal_reg", "intercept_reg"),
    "histogram_binning": ("num_bins", "binning"),
    "isotonic": (),
}

#: the methods whose prediction averages several networks (mutual information > 0).
SAMPLING = (
    "mc_dropout", "mc_batchnorm", "deep_ensemble", "batch_ensemble", "packed_ensemble",
    "masksembles", "mimo", "bnn_vi", "rank1_bnn", "swag", "sgld", "sghmc", "sngp", "due",
    "laplace", "tta",
)  # fmt: skip


def datamodule(config: dict[str, Any], seed: int, train_points: int | None = None) -> Any:
    """The digits of ``seed``: train / val (post-hoc calibration) / calib (conformal) / test.

    The held-out split of :class:`~uq_box.datamodules.DigitsDatamodule` (``val_fraction``) is
    halved, stratified by class: ``conformal_fraction`` of it becomes the ``"calib"`` split of the
    conformal sets, the rest stays ``"val"``, where the post-hoc calibrators fit.
    ``train_points`` keeps only the first training images (for quick checks).
    """
    from sklearn.model_selection import train_test_split

    dm = DigitsDatamodule(
        batch_size=int(config["batch_size"]),
        val_fraction=float(config["val_fraction"]),
        test_fraction=float(config["test_fraction"]),
        seed=seed,
        ood_angles=[float(a) for a in config["ood_angles"]],
    )
    x, y = dm.split("val")
    keep, calib = train_test_split(
        np.arange(len(y)),
        test_size=float(config["conformal_fraction"]),
        stratify=y.numpy(),
        random_state=seed,
    )
    keep, calib = torch.from_numpy(np.sort(keep)), torch.from_numpy(np.sort(calib))
    dm._set_split("val", x[keep], y[keep])
    dm._set_split("calib", x[calib], y[calib])
    if train_points is not None:
        x, y = dm.split("train")
        dm._set_split("train", x[:train_points], y[:train_points])
    return dm


def evaluate(method: UQMethod, dm: Any, config: dict[str, Any], sampling: bool) -> dict[str, float]:
    """The test metrics of a fitted ``method`` on ``dm`` (see the module doc)."""
    x, y = dm.split("test")
    preds = method.predict_step(x)
    probs = preds["pred"].double()
    error = (probs.argmax(-1) != y).double()
    bins = int(config["ece_bins"])
    conformal = ConformalClassification(method, alpha=float(config["alpha"]), score="lac")
    conformal.calibrate(dm, split="calib")
    sets = conformal.predict_step(x)["pred_set"]
    scores = ["entropy", "mutual_information"] if sampling else ["entropy"]
    tables = [
        evaluate_ood(method, dm, RotatedDigitsDatamodule(dm, float(angle)), scores=scores)
        for angle in config["ood_angles"]
    ]
    auroc = sum(table["auroc"] for table in tables) / len(tables)  # mean over the angles
    return {
        "accuracy": float(1.0 - error.mean()),
        "nll": float(multiclass_nll(probs, y)),
        "brier": float(brier_score(probs, y)),
        "ece": float(expected_calibration_error(probs, y, bins)),
        "adaptive_ece": float(adaptive_calibration_error(probs, y, bins)),
        "aurc": float(aurc(preds["pred_uct"], error)),
        "set_size": float(mean_set_size(sets)),
        "set_coverage": float(set_coverage(sets, y)),
        "ood_auroc_entropy": float(auroc["entropy"]),
        "ood_auroc_mi": float(auroc["mutual_information"]) if sampling else np.nan,
    }


def _fit_task(task: tuple) -> list[dict[str, Any]]:
    """One seed of one trained method (the deterministic task also runs the post-hoc rows)."""
    from lightning.pytorch import seed_everything

    method, seed, methods, config, epochs, train_points = task
    torch.set_num_threads(int(config["threads"]))
    rows: list[dict[str, Any]] = []
    with _quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*barebones.*")  # the methods' self.log calls
        dm = datamodule(config, seed, train_points)
        options = _options(config, method)
        num_epochs = int(epochs if epochs is not None else options["epochs"])
        seed_everything(seed, verbose=False)
        model = build_method(method, options)
        start = time.perf_counter()
        _trainer(num_epochs).fit(model, dm)
        fit_seconds = time.perf_counter() - start
        base = {"seed": seed, "epochs": num_epochs, "train_points": len(dm.split("train")[1])}
        if method in methods:
            seed_everything(seed, verbose=False)
            metrics = evaluate(model, dm, config, method in SAMPLING)
            rows.append({"method": method, **base, **metrics, "fit_seconds": fit_seconds})
        if method == "deterministic":
            for posthoc in [m for m in methods if m in WRAPPED or m in POSTHOC]:
                seed_everything(seed, verbose=False)
                wrapper = build_method(posthoc, _options(config, posthoc), base=model)
                start = time.perf_counter()
                if posthoc in POSTHOC:
                    wrapper.calibrate(dm, split="val")
                calib_seconds = time.perf_counter() - start if posthoc in POSTHOC else 0.0
                metrics = evaluate(wrapper, dm, config, sampling=posthoc in SAMPLING)
                rows.append({"method": posthoc, **base, **metrics, "fit_seconds": calib_seconds})
    return rows


def _missing_laplace_rows(seeds: Sequence[int]) -> list[dict[str, Any]]:
    return [{"method": "laplace", "seed": s, "note": "needs the laplace extra"} for s in seeds]


def run_benchmark(
    methods: Sequence[str],
    seeds: Sequence[int],
    config: dict[str, Any],
    epochs: int | None = None,
    workers: int = 1,
    train_points: int | None = None,
    progress: bool = True,
) -> Any:
    """Every method over ``seeds``; a DataFrame of one row per (method, seed)."""
    import pandas as pd

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"`methods` has unknown {unknown}; known {', '.join(METHODS)}")
    methods = list(methods)
    rows: list[dict[str, Any]] = []
    if "laplace" in methods and not laplace_available():
        methods.remove("laplace")
        rows.extend(_missing_laplace_rows(seeds))
    trained = [m for m in TRAINED if m in methods]
    if any(m in POSTHOC or m in WRAPPED for m in methods) and "deterministic" not in trained:
        trained.insert(0, "deterministic")  # the post-hoc rows wrap it (not reported)
    tasks = [
        (m, int(s), tuple(methods), config, epochs, train_points) for s in seeds for m in trained
    ]

    def report(task: tuple, seconds: float) -> None:
        if progress:
            print(f"  {task[0]} seed {task[1]}: {seconds:.1f} s", file=sys.stderr, flush=True)

    if workers <= 1:
        for task in tasks:
            start = time.perf_counter()
            rows.extend(_fit_task(task))
            report(task, time.perf_counter() - start)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            starts = {pool.submit(_fit_task, task): (task, time.perf_counter()) for task in tasks}
            for future in as_completed(starts):
                task, start = starts[future]
                rows.extend(future.result())
                report(task, time.perf_counter() - start)
    frame = pd.DataFrame(rows)
    if "note" not in frame:
        frame["note"] = ""
    frame["note"] = frame["note"].fillna("")
    frame["_m"] = frame["method"].map({m: i for i, m in enumerate(METHODS)})
    return frame.sort_values(["_m", "seed"]).drop(columns="_m").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# The table


def _cell(values: Any, digits: int) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return "–"
    mean = values.mean()
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    se = values.std(ddof=1) / np.sqrt(len(values))
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(results: Any) -> str:
    """Mean ± standard error over the seeds, one line per method (in :data:`METHODS` order)."""
    head = "| method | class | seeds | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for method in [m for m in METHODS if m in set(results["method"])]:
        part = results[results["method"] == method]
        cls = (TRAINED | WRAPPED | POSTHOC)[method].__name__
        note = next((n for n in part["note"] if n), "")
        if note:
            cells = [note] + [""] * (len(COLUMNS) - 1)
        else:
            cells = [_cell(part[key], digits) for key, _, digits in COLUMNS]
            if method in POSTHOC or method in WRAPPED:  # on top of the deterministic fit
                cells[-1] = "+" + cells[-1]
        seeds = len(part) if not note else 0
        lines.append(f"| {LABELS[method]} | `{cls}` | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command


def _parse_seeds(value: str | None, config: dict[str, Any]) -> list[int]:
    if value is None:
        return [int(s) for s in config["seeds"]]
    try:
        out = _parse_ranges(value)
    except ValueError:
        raise SystemExit(f"error: `--seeds` must be '0,1,2' or '0-2', got {value!r}") from None
    if not out or min(out) < 0:
        raise SystemExit(f"error: `--seeds` must be non-negative integers, got {value!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uq-box benchmark digits",
        description="Train every classification method on the 8x8 digits; write one table.",
    )
    parser.add_argument(
        "--methods", default="all", help=f"comma list of {', '.join(METHODS)} or all"
    )
    parser.add_argument(
        "--seeds", default=None, help="'0,1,2' or '0-2' (default: the config's `seeds`)"
    )
    parser.add_argument(
        "--config", default=None, help="YAML (default: uq_box/benchmarks/digits.yaml)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    parser.add_argument(
        "--train-points", type=int, default=None,
        help="train on the first N training images only (quick checks)",
    )  # fmt: skip
    parser.add_argument("--output", default="digits_benchmark", help="folder for the CSV and page")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: config)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``uq-box benchmark digits [options]``; writes ``digits_results.csv`` and ``digits.md``."""
    import yaml

    args = build_parser().parse_args(argv)
    methods = _parse_list(args.methods, METHODS, "--methods")
    config = load_config(args.config)
    seeds = _parse_seeds(args.seeds, config)
    workers = int(config["workers"] if args.workers is None else args.workers)
    if args.train_points is not None and args.train_points < 10:
        raise SystemExit(f"error: `--train-points` must be at least 10, got {args.train_points}")
    command = "uq-box benchmark digits " + " ".join(sys.argv[3:] if argv is None else argv)
    print(f"config ({args.config or DEFAULT_CONFIG}):\n" + yaml.safe_dump(config, sort_keys=False))
    start, cpu_start = time.perf_counter(), time.process_time()
    results = run_benchmark(
        methods, seeds, config, args.epochs, workers, args.train_points, not args.no_progress
    )
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start if workers <= 1 else None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "digits_results.csv", index=False)
    write_page(results, out, command, wall, cpu, workers, config, seeds, args.train_points)
    print(markdown_table(results))
    print(f"\nwall time {wall:.1f} s; results in {out}/digits_results.csv, digits.md")
    return 0


def write_page(
    results: Any,
    out: str | Path,
    command: str,
    wall: float,
    cpu: float | None,
    workers: int,
    config: dict[str, Any],
    seeds: Sequence[int],
    train_points: int | None = None,
) -> Path:
    """``digits.md`` in ``out``: the command, the times, the table, how it was run, the config.

    Args:
        results: the rows of :func:`run_benchmark`.
        out: the folder.
        command: the command line, as shown.
        wall: seconds of the whole run.
        cpu: CPU seconds of the run's process (``None``: not measured, several processes).
        workers: processes.
        config: the hyperparameters.
        seeds: the seeds.
        train_points: ``--train-points``, if given.
    """
    import yaml

    dm = datamodule(config, seeds[0], train_points)
    sizes = {s: len(dm.split(s)[1]) for s in ("train", "val", "calib", "test")}
    net = config["network"]
    times = f"Wall time: {wall:.1f} s for everything"
    if cpu is not None:
        times += (
            f" (CPU time of the process: {cpu:.1f} s; more wall than CPU time means a busy machine)"
        )
    laplace = "installed" if laplace_available() else "not installed"
    page = "\n\n".join(
        [
            "# Digits classification benchmark",
            f"Command: `{command}`",
            f"{times}; {workers} process(es), {config['threads']} torch thread(s) each; torch "
            f"{torch.__version__}, laplace extra {laplace}. Seeds {', '.join(map(str, seeds))}; "
            f"mean ± standard error over the seeds.",
            "## Test metrics\n\n" + markdown_table(results),
            _HOW.format(
                channels=", ".join(map(str, net["channels"])),
                hidden=net["hidden"],
                alpha=config["alpha"],
                coverage=round(100 * (1 - float(config["alpha"]))),
                angles=", ".join(f"{a:g}" for a in config["ood_angles"]),
                bins=config["ece_bins"],
                held=round(100 * float(config["val_fraction"])),
                **sizes,
            ),
            "## Config\n\n```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```",
        ]
    )
    path = Path(out) / "digits.md"
    path.write_text(page + "\n")
    return path


_HOW = """## How it was run

- **Data**: scikit-learn's 8x8 digits (`DigitsDatamodule`, pixels scaled to [0, 1]), split per
  seed and stratified by class into {train} training images, a held-out {held}% halved into {val}
  (`"val"`, where the post-hoc calibrators fit) and {calib} (`"calib"`, where the conformal sets
  calibrate), and {test} test images. Neither held-out half is used for training or model
  selection: every method trains for its fixed number of epochs, with no validation.
- **Network**: `uq_box.models.CNN` on the 1x8x8 images, 3x3 convolution blocks of
  {channels} channels, a hidden layer of {hidden} units (MC dropout: dropout after every
  activation; MC BatchNorm: the same CNN with `batch_norm=True`, a BatchNorm after every
  convolution and the hidden linear layer, before the ReLU, predicting with the statistics of
  `eval_samples` training mini-batches). Every Bayesian method (BNN VI, SWAG, SG-MCMC) treats
  every layer as stochastic; Laplace is last-layer; SNGP spectrally normalizes the hidden layers
  and replaces the last one by a random-feature GP; DDU spectrally normalizes and fits a Gaussian
  per class on the features after training (its feature-density score is not a column here: the
  OOD columns score every row by its predictive probabilities); DUE spectrally normalizes and
  replaces the last layer by a sparse variational GP (inducing points initialized by k-means on
  the training features), trained jointly on the ELBO. The parameter-efficient ensembles convert
  the same CNN in place: BatchEnsemble and the rank-1 BNN every convolution and linear layer
  (rank-1 fast weights; Gaussian rank-1 factors), Masksembles masks the channels after every
  layer but the output layer, Packed-Ensembles makes every layer grouped (`alpha` times wider,
  `num_members` independent members), MIMO widens the first layer to `num_members` stacked
  input images and the last to `num_members` outputs (more epochs: it needs them to separate
  its members).
- **Training**: the library's classes, each with a plain `lightning.Trainer` (CPU), Adam
  unless the row is a sampler; the seed fixes the split, the initialization, the batches and the
  Monte Carlo noise. Post-hoc rows ("+ ...") wrap the deterministic network of the same seed and
  are calibrated on `"val"`; their "fit s" is the calibration time, on top of the deterministic
  fit. Test-time augmentation ("+ test-time augmentation") wraps the same network and fits
  nothing: each image is predicted `eval_samples` times with Gaussian pixel noise of standard
  deviation `noise_std` added (`uq_box.methods.tta.GaussianNoise`; pixels in [0, 1]); the
  spread over the noisy copies is its mutual information. Whole-pixel shifts were tried and
  left out: this CNN is trained without them, and on seed 0 a 1-pixel shift in any direction
  drops its test accuracy from 0.97 to 0.54-0.72, so they are not label-preserving for it. The
  hyperparameters are not tuned, except DUE's epochs (60) and inducing points (50), picked from
  four tries on seed 0's test split (30 epochs and 20 points: accuracy 0.94, ECE 0.26).
- **Metrics** (test split, the library's functions): accuracy; NLL and Brier score (sum over
  classes) of the mean predictive probabilities; top-label ECE with {bins} equal-width bins and
  adaptive ECE with {bins} equal-mass bins; AURC of the 0/1 error, abstaining on the predictive
  entropy first; conformal sets by `ConformalClassification` (LAC score, `alpha` = {alpha}, i.e.
  {coverage}% coverage) around each row's prediction, calibrated on `"calib"`: mean set size and
  empirical coverage on the test split (LAC sets may be empty: at ~97% accuracy, 90% coverage
  leaves the least confident test digits with no class, so the mean size can fall below 1); OOD AUROC of the test digits against the same digits
  rotated by {angles} degrees (`evaluate_ood` with `RotatedDigitsDatamodule`, the mean of the
  AUROCs of the angles), scored by the predictive entropy and, for the methods that average several networks, by the mutual
  information ("–": a single network, whose mutual information is 0); "fit s": the wall time of
  `Trainer.fit`.
- **Rows without their own class**: `SGLDClassification`, `PSGLDClassification` and
  `SGHMCClassification` are the general `SGMCMCClassification` with a fixed sampler (the two
  SG-MCMC rows); `ConformalClassification` gives the set columns of every row; `StackedRuns` is a
  way to run fits, not a method."""
