"""The registry of methods: one entry per method class and task, read by the conformance suite.

Every concrete method class exported by :mod:`uq_box.methods` has an entry here (a test fails
otherwise): how to build a tiny instance on any backbone, the network output width it needs and
which checks of the conformance suite (``tests/conformance``) apply. A new method joins the suite
with one :class:`MethodEntry` in :data:`METHODS`.

The registry lives in the package, next to the methods, rather than in the tests: a new method
file and its entry sit side by side, the entries hold only plain constructor arguments (so the
same entry builds the instance in Python and its config for the CLI), and code outside the test
tree, such as the DDP script the suite runs in a subprocess, imports it as ``uq_box`` is
installed. It imports nothing beyond :mod:`uq_box.methods` (Laplace's extra only when built).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any

import torch
from lightning import LightningModule
from torch import nn

from uq_box.methods.base import ClassificationTask, RegressionTask, UQMethod
from uq_box.methods.binary import (
    BinaryClassificationTask,
    BNNVIBinaryClassification,
    DeepEnsembleBinaryClassification,
    DeterministicBinaryClassification,
    MCBatchNormBinaryClassification,
    MCDropoutBinaryClassification,
    TTABinaryClassification,
)
from uq_box.methods.bnn_vi import BNNVIClassification, BNNVIRegression
from uq_box.methods.calibrators import (
    DirichletCalibration,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    VectorScaling,
)
from uq_box.methods.conformal_classification import ConformalClassification
from uq_box.methods.conformal_dense import ConformalPixelRegression, ConformalSegmentation
from uq_box.methods.ddu import DDUClassification
from uq_box.methods.deep_ensemble import DeepEnsembleClassification, DeepEnsembleRegression
from uq_box.methods.dense import (
    BNNVIPixelRegression,
    BNNVISegmentation,
    DeepEnsemblePixelRegression,
    DeepEnsembleSegmentation,
    DeterministicPixelRegression,
    DeterministicSegmentation,
    MCDropoutPixelRegression,
    MCDropoutSegmentation,
    PixelRegressionTask,
    SegmentationTask,
    SGMCMCPixelRegression,
    SGMCMCSegmentation,
    SWAGPixelRegression,
    SWAGSegmentation,
)
from uq_box.methods.deterministic import (
    DeterministicClassification,
    DeterministicRegression,
    MVERegression,
)
from uq_box.methods.due import DUEClassification, DUERegression
from uq_box.methods.efficient_ensembles import (
    BatchEnsembleClassification,
    BatchEnsembleRegression,
    MasksemblesClassification,
    MasksemblesRegression,
    MIMOClassification,
    MIMORegression,
    PackedEnsembleClassification,
    PackedEnsembleRegression,
    Rank1BNNClassification,
    Rank1BNNRegression,
)
from uq_box.methods.laplace import LaplaceClassification, LaplaceRegression
from uq_box.methods.likelihood import DERRegression, MDNRegression
from uq_box.methods.mc_batchnorm import MCBatchNormClassification, MCBatchNormRegression
from uq_box.methods.mc_dropout import MCDropoutClassification, MCDropoutRegression
from uq_box.methods.posthoc import ConformalRegression, PostHocCalibration, TemperatureScaling
from uq_box.methods.quantile import QuantileRegression
from uq_box.methods.recalibration import IsotonicRecalibration, StdScaling
from uq_box.methods.sgmcmc import (
    PSGLDClassification,
    PSGLDRegression,
    SGHMCClassification,
    SGHMCRegression,
    SGLDClassification,
    SGLDRegression,
    SGMCMCClassification,
    SGMCMCRegression,
)
from uq_box.methods.sngp import SNGPClassification, SNGPRegression
from uq_box.methods.stacked import StackedRuns
from uq_box.methods.swag import SWAGClassification, SWAGRegression
from uq_box.methods.tta import TTAClassification, TTARegression

__all__ = ["METHODS", "MethodEntry", "entry", "is_concrete_method"]

#: Network builder: ``network(n_outputs)`` gives a fresh backbone.
Network = Callable[[int], nn.Module]


@dataclass(frozen=True)
class MethodEntry:
    """One method class on one task, built small.

    Args:
        cls: the exported class.
        kwargs: plain constructor arguments (numbers, strings, lists), so that the CLI takes
            them as they are; small: few Monte Carlo samples, members and stored samples.
        n_outputs: network outputs per regression target (``None`` for classification: one per
            class; binary: one, multilabel: ``num_labels``).
        dropout: the backbone needs dropout layers (MC dropout).
        batch_norm: the backbone needs BatchNorm layers (MC BatchNorm).
        num_labels: a binary-task entry fitted on multilabel data with this many labels
            (targets ``[N, L]``; ``None``: binary targets ``[N]``).
        stochastic: predictions come from several differing samples or members
            (``epistemic_uct > 0``); ``False``: one network, ``epistemic_uct == 0``.
        base: the wrapped method, for a post-hoc wrapper or :class:`StackedRuns`.
        num_runs: runs of a :class:`StackedRuns` entry.
        backbone_table: fits on every network of the backbone zoo (``tests/backbones.py``).
        placements: the labels of the zoo's ``stochastic_module_names`` placements it runs on
            there (empty: the method takes no ``stochastic_module_names`` there).
        backbone_kwargs: arguments on top of ``kwargs`` for the zoo's short fits (2 epochs of 3
            steps), so that the samples still differ there (any values: not for the CLI).
        laplace: needs the ``laplace`` extra (its tests run in ``.venv-laplace``).
        label: the entry's id when a class has several entries (default: the class name).
    """

    cls: type[LightningModule]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    n_outputs: int | None = None
    dropout: bool = False
    batch_norm: bool = False
    num_labels: int | None = None
    stochastic: bool = True
    base: MethodEntry | None = None
    num_runs: int = 2
    backbone_table: bool = False
    placements: tuple[str, ...] = ()
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)
    laplace: bool = False
    label: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))
        object.__setattr__(self, "backbone_kwargs", MappingProxyType(dict(self.backbone_kwargs)))

    @property
    def name(self) -> str:
        return self.label or self.cls.__name__

    @property
    def task(self) -> str:
        """``"regression"``, ``"classification"`` or ``"binary"`` (binary and multilabel)."""
        cls = self.base.cls if self.stacked else self.cls
        if issubclass(cls, SegmentationTask):
            return "segmentation"
        if issubclass(cls, PixelRegressionTask):
            return "pixel_regression"
        if issubclass(cls, BinaryClassificationTask):
            return "binary"
        return "regression" if issubclass(cls, RegressionTask) else "classification"

    @property
    def posthoc(self) -> bool:
        """A post-hoc wrapper: calibrated on held-out data around a fitted ``base``."""
        return issubclass(self.cls, PostHocCalibration)

    @property
    def stacked(self) -> bool:
        """``num_runs`` runs of ``base`` as one :class:`StackedRuns` model."""
        return issubclass(self.cls, StackedRuns)

    @property
    def trains(self) -> bool:
        """``Trainer.fit`` trains it (not a post-hoc wrapper)."""
        return not self.posthoc

    @property
    def resumes(self) -> bool:
        """A fit resumed from a checkpoint equals the uninterrupted one (checked)."""
        return self.trains

    @property
    def dense(self) -> bool:
        """A dense task (``"segmentation"`` or ``"pixel_regression"``): images in, images out."""
        return self.task in ("segmentation", "pixel_regression")

    @property
    def ddp(self) -> bool:
        """Trains under DDP, where ``N`` must be the global training set size (stacked runs
        train in one process).
        """
        # (dense entries: N counts pixels, images x H x W, not the rows the DDP check records)
        return self.trains and not self.stacked and not self.dense

    @property
    def cli(self) -> bool:
        """``uq-box fit`` takes it (a :class:`UQMethod` that trains)."""
        return self.trains and issubclass(self.cls, UQMethod) and self.num_labels is None

    @property
    def leaf(self) -> MethodEntry:
        """The innermost trained method (``self`` unless it wraps one)."""
        return self if self.base is None else self.base.leaf

    def width(self, num_classes: int) -> int:
        """The backbone's output width: ``n_outputs`` per target, one per class or label."""
        leaf = self.leaf
        if leaf.task == "binary":
            return leaf.num_labels or 1
        return num_classes if leaf.task in ("classification", "segmentation") else leaf.n_outputs

    def objects(self, network: nn.Module) -> dict[str, Any]:
        """The constructor's module arguments (what ``load_from_checkpoint`` needs again): the
        network or wrapped method, and fresh instances of the ``kwargs`` given as
        ``{"class_path": ..., "init_args": ...}`` (such as a ``criterion``).
        """
        if self.stacked:
            return {"method": self.base.build(network), "num_runs": self.num_runs}
        if self.base is not None:
            return {"model": self.base.build(network)}
        modules = {k: _instantiate(v) for k, v in self.kwargs.items() if _is_class_spec(v)}
        return {"model": network, **modules}

    def build(self, network: nn.Module, **overrides: Any) -> LightningModule:
        """A fresh instance on ``network`` (seed first for a fixed init)."""
        plain = {k: v for k, v in self.kwargs.items() if not _is_class_spec(v)}
        return self.cls(**{**self.objects(network), **plain, **overrides})


def _is_class_spec(value: Any) -> bool:
    """A module argument written as the CLI writes it: ``{"class_path", "init_args"}``."""
    return isinstance(value, Mapping) and "class_path" in value


def _instantiate(spec: Mapping[str, Any]) -> Any:
    """A fresh instance of ``{"class_path": "pkg.mod.Class", "init_args": {...}}``."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**dict(spec.get("init_args") or {}))


def _sgmcmc(cls: type, **extra: Any) -> MethodEntry:
    regression = issubclass(cls, RegressionTask)
    kwargs = {"burnin_epochs": 1, "thinning": 3, "max_num_samples": 4}
    if not regression:
        kwargs = {"burnin_epochs": 1, "thinning": 2, "max_num_samples": 5, "num_mc_samples_test": 3}
    return MethodEntry(cls, {**kwargs, **extra}, n_outputs=2 if regression else None)


#: the zoo's fits are short: sample from the first step on (SWAG: a snapshot every epoch at a
#: learning rate that moves the weights between snapshots)
_SAMPLE_EVERY_STEP = {"burnin_epochs": 0, "thinning": 1}
_SWAG_SHORT = {"burnin_epochs": 0, "optimizer": partial(torch.optim.Adam, lr=1e-2)}
_MVE = MethodEntry(MVERegression, n_outputs=2, stochastic=False, backbone_table=True)
_QUANTILE = MethodEntry(QuantileRegression, n_outputs=3, stochastic=False, backbone_table=True)
_DETERMINISTIC_CLASSIFICATION = MethodEntry(
    DeterministicClassification, stochastic=False, backbone_table=True
)
_MC_DROPOUT_REGRESSION = MethodEntry(
    MCDropoutRegression,
    {"num_mc_samples_train": 2, "num_mc_samples_test": 4},
    n_outputs=2,
    dropout=True,
    backbone_table=True,
)
_DEEP_ENSEMBLE_CLASSIFICATION = MethodEntry(
    DeepEnsembleClassification, {"num_members": 2}, backbone_table=True
)

#: TTA's transform in the entries: a random one, S copies of the batch in one call
_NOISE = {
    "transforms": {"class_path": "uq_box.methods.tta.GaussianNoise", "init_args": {"std": 0.2}}
}

#: the single-forward-pass methods with lifecycle hooks that StackedRuns runs per run
_DISTANCE_AWARE: tuple[MethodEntry, ...] = (
    MethodEntry(
        SNGPRegression,
        {"num_features": 32, "num_mc_samples_test": 4},
        n_outputs=2,
        backbone_table=True,
    ),
    MethodEntry(
        SNGPClassification, {"num_features": 32, "num_mc_samples_test": 4}, backbone_table=True
    ),
    MethodEntry(DDUClassification, stochastic=False, backbone_table=True),
    MethodEntry(
        DUERegression,
        {"num_inducing": 4, "num_mc_samples_test": 4},
        n_outputs=1,
        backbone_table=True,
    ),
    MethodEntry(
        DUEClassification,
        {"num_inducing": 4, "num_mc_samples_train": 2, "num_mc_samples_test": 4},
        backbone_table=True,
    ),
)

#: Every method class and task, built small. Add one entry per new class.
#: the dense entries: a tiny U-Net on 8x8 images (``tests/conformance``), 3 classes or 1 target
_DENSE_SWAG = {"max_num_samples": 3, "num_mc_samples_test": 4, "burnin_epochs": 1}
_DENSE_SGMCMC = {"burnin_epochs": 1, "thinning": 3, "max_num_samples": 4}
_DENSE_BNNVI = {
    "stochastic_module_names": ["bottleneck.0"],  # partially stochastic: the bottleneck
    "num_mc_samples_train": 2,
    "num_mc_samples_test": 4,
    "posterior_rho_init": -3.0,
}
_DENSE: tuple[MethodEntry, ...] = (
    MethodEntry(DeterministicSegmentation, stochastic=False),
    MethodEntry(DeterministicPixelRegression, n_outputs=2, stochastic=False),
    MethodEntry(MCDropoutSegmentation, {"num_mc_samples_test": 4}, dropout=True),
    MethodEntry(MCDropoutPixelRegression, {"num_mc_samples_test": 4}, n_outputs=2, dropout=True),
    MethodEntry(DeepEnsembleSegmentation, {"num_members": 2}),
    MethodEntry(DeepEnsemblePixelRegression, {"num_members": 2}, n_outputs=2),
    MethodEntry(BNNVISegmentation, _DENSE_BNNVI),
    MethodEntry(BNNVIPixelRegression, _DENSE_BNNVI, n_outputs=2),
    MethodEntry(SWAGSegmentation, _DENSE_SWAG),
    MethodEntry(SWAGPixelRegression, _DENSE_SWAG, n_outputs=2),
    MethodEntry(SGMCMCSegmentation, _DENSE_SGMCMC),
    MethodEntry(SGMCMCPixelRegression, _DENSE_SGMCMC, n_outputs=2),
    MethodEntry(
        ConformalSegmentation,
        {"alpha": 0.2},
        base=MethodEntry(DeterministicSegmentation, stochastic=False),
        stochastic=False,
    ),
    MethodEntry(
        ConformalPixelRegression,
        {"alpha": 0.2},
        base=MethodEntry(DeterministicPixelRegression, n_outputs=2, stochastic=False),
        stochastic=False,
    ),
)

METHODS: tuple[MethodEntry, ...] = (
    *_DENSE,
    MethodEntry(DeterministicRegression, n_outputs=1, stochastic=False, backbone_table=True),
    _DETERMINISTIC_CLASSIFICATION,
    _MVE,
    # a full covariance head (T (T + 3) / 2 outputs): on the suite's one target, 2, the NLL's
    # layout; the correlations are fitted in tests/methods/test_methods_multivariate.py
    MethodEntry(
        MVERegression,
        {"criterion": {"class_path": "uq_box.losses.MultivariateNLL"}},
        n_outputs=2,
        stochastic=False,
        label="MVERegression[MultivariateNLL]",
    ),
    _QUANTILE,
    MethodEntry(
        BNNVIRegression,
        {"stochastic_module_names": [-1], "num_mc_samples_train": 2, "num_mc_samples_test": 4},
        n_outputs=2,
        backbone_table=True,
        placements=("inner", "all"),
        backbone_kwargs={"posterior_rho_init": -3.0},
    ),
    MethodEntry(
        BNNVIClassification,
        {"num_mc_samples_train": 2, "num_mc_samples_test": 4, "prior": 0.5},
        backbone_table=True,
        placements=("inner", "all"),
        backbone_kwargs={"posterior_rho_init": -3.0},
    ),
    _MC_DROPOUT_REGRESSION,
    MethodEntry(
        MCDropoutClassification, {"num_mc_samples_test": 4}, dropout=True, backbone_table=True
    ),
    MethodEntry(
        MVERegression,
        {"criterion": {"class_path": "uq_box.losses.StudentTNLL", "init_args": {"df": 4.0}}},
        n_outputs=2,
        stochastic=False,
        label="MVERegression[StudentT]",
        backbone_table=True,
    ),
    MethodEntry(
        MDNRegression, {"num_components": 2}, n_outputs=6, stochastic=False, backbone_table=True
    ),
    MethodEntry(DERRegression, {"coeff": 0.01}, n_outputs=4, backbone_table=True),
    MethodEntry(DeepEnsembleRegression, {"num_members": 3}, n_outputs=2, backbone_table=True),
    _DEEP_ENSEMBLE_CLASSIFICATION,
    MethodEntry(
        SWAGRegression,
        {"max_num_samples": 3, "num_mc_samples_test": 4, "burnin_epochs": 1},
        n_outputs=2,
        backbone_table=True,
        placements=("inner",),
        backbone_kwargs=_SWAG_SHORT,
    ),
    MethodEntry(
        SWAGClassification,
        {"stochastic_module_names": [-1], "max_num_samples": 3, "num_mc_samples_test": 4},
        backbone_table=True,
        placements=("inner",),
        backbone_kwargs=_SWAG_SHORT,
    ),
    MethodEntry(
        SGMCMCRegression,
        {"burnin_epochs": 1, "thinning": 3, "max_num_samples": 4},
        n_outputs=2,
        backbone_table=True,
        placements=("inner",),
        backbone_kwargs=_SAMPLE_EVERY_STEP,
    ),
    MethodEntry(
        SGMCMCClassification,
        {"thinning": 2, "max_num_samples": 5, "num_mc_samples_test": 3},
        backbone_table=True,
        placements=("inner",),
        backbone_kwargs=_SAMPLE_EVERY_STEP,
    ),
    _sgmcmc(SGLDRegression, lr=1e-3),
    _sgmcmc(SGLDClassification, lr=1e-3),
    _sgmcmc(PSGLDRegression),
    _sgmcmc(PSGLDClassification),
    _sgmcmc(SGHMCRegression, lr=1e-3, num_burn_in_steps=4),
    _sgmcmc(SGHMCClassification, lr=1e-3, num_burn_in_steps=4),
    MethodEntry(
        ConformalRegression,
        {"alpha": 0.2},
        base=_MVE,
        stochastic=False,
        label="ConformalRegression[MVE]",
    ),
    MethodEntry(
        ConformalRegression,
        {"alpha": 0.2},
        base=_QUANTILE,
        stochastic=False,
        label="ConformalRegression[Quantile]",
    ),
    MethodEntry(StdScaling, {"quantile_levels": [0.1, 0.5, 0.9]}, base=_MVE, stochastic=False),
    MethodEntry(
        IsotonicRecalibration,
        {"quantile_levels": [0.1, 0.5, 0.9], "num_levels": 200},
        base=MethodEntry(DeepEnsembleRegression, {"num_members": 3}, n_outputs=2),
    ),
    *_DISTANCE_AWARE,
    MethodEntry(TemperatureScaling, base=_DETERMINISTIC_CLASSIFICATION, stochastic=False),
    MethodEntry(
        ConformalClassification,
        {"alpha": 0.2, "score": "raps"},
        base=_DETERMINISTIC_CLASSIFICATION,
        stochastic=False,
    ),
    MethodEntry(VectorScaling, base=_DETERMINISTIC_CLASSIFICATION, stochastic=False),
    MethodEntry(MatrixScaling, base=_DETERMINISTIC_CLASSIFICATION, stochastic=False),
    MethodEntry(DirichletCalibration, base=_DETERMINISTIC_CLASSIFICATION, stochastic=False),
    MethodEntry(
        HistogramBinning, {"num_bins": 5}, base=_DETERMINISTIC_CLASSIFICATION, stochastic=False
    ),
    MethodEntry(IsotonicCalibration, base=_DETERMINISTIC_CLASSIFICATION, stochastic=False),
    MethodEntry(StackedRuns, base=_MC_DROPOUT_REGRESSION, label="StackedRuns[MCDropoutRegression]"),
    MethodEntry(
        StackedRuns,
        base=_DEEP_ENSEMBLE_CLASSIFICATION,
        label="StackedRuns[DeepEnsembleClassification]",
    ),
    # per-run lifecycle hooks: SNGP's precision reset (vectorized), DUE's initialization and
    # DDU's density fit (run by run)
    *(
        MethodEntry(
            StackedRuns,
            base=base,
            stochastic=base.stochastic,
            label=f"StackedRuns[{base.name}]",
        )
        for base in _DISTANCE_AWARE
    ),
    MethodEntry(BatchEnsembleRegression, {"num_members": 2}, n_outputs=2, backbone_table=True),
    MethodEntry(BatchEnsembleClassification, {"num_members": 2}, backbone_table=True),
    MethodEntry(
        Rank1BNNRegression,
        {"num_members": 2, "num_mc_samples_test": 2},
        n_outputs=2,
        backbone_table=True,
    ),
    MethodEntry(Rank1BNNClassification, {"num_members": 2}, backbone_table=True),
    MethodEntry(
        MasksemblesRegression,
        {"num_members": 2, "scale": 2.0},
        n_outputs=2,
        backbone_table=True,
    ),
    MethodEntry(MasksemblesClassification, {"num_members": 2}, backbone_table=True),
    MethodEntry(PackedEnsembleRegression, {"num_members": 2}, n_outputs=2),
    MethodEntry(PackedEnsembleClassification, {"num_members": 2, "alpha": 2, "gamma": 1}),
    MethodEntry(MIMORegression, {"num_members": 2}, n_outputs=2, backbone_table=True),
    MethodEntry(
        MIMOClassification, {"num_members": 2, "input_repetition": 0.25}, backbone_table=True
    ),
    MethodEntry(
        LaplaceRegression,
        {"num_mc_samples_test": 4},
        n_outputs=1,
        backbone_table=True,
        laplace=True,
    ),
    MethodEntry(
        LaplaceClassification, {"num_mc_samples_test": 4}, backbone_table=True, laplace=True
    ),
    MethodEntry(MCBatchNormRegression, {"num_mc_samples_test": 4}, n_outputs=2, batch_norm=True),
    MethodEntry(MCBatchNormClassification, {"num_mc_samples_test": 4}, batch_norm=True),
    MethodEntry(
        TTARegression, {**_NOISE, "num_mc_samples_test": 4}, n_outputs=2, backbone_table=True
    ),
    MethodEntry(TTAClassification, {**_NOISE, "num_mc_samples_test": 4}, backbone_table=True),
    MethodEntry(DeterministicBinaryClassification, stochastic=False),
    MethodEntry(MCDropoutBinaryClassification, {"num_mc_samples_test": 4}, dropout=True),
    MethodEntry(DeepEnsembleBinaryClassification, {"num_members": 2}),
    MethodEntry(
        DeepEnsembleBinaryClassification,
        {"num_members": 2},
        num_labels=3,
        label="DeepEnsembleBinaryClassification[multilabel]",
    ),
    MethodEntry(
        BNNVIBinaryClassification,
        {"num_mc_samples_train": 2, "num_mc_samples_test": 4, "prior": 0.5},
    ),
    MethodEntry(MCBatchNormBinaryClassification, {"num_mc_samples_test": 4}, batch_norm=True),
    MethodEntry(TTABinaryClassification, {**_NOISE, "num_mc_samples_test": 4}),
)


def entry(name: str) -> MethodEntry:
    """The entry called ``name`` (a class name, or a label such as ``"StackedRuns[...]"``)."""
    for item in METHODS:
        if item.name == name:
            return item
    raise KeyError(f"no registry entry {name!r}; entries: {[m.name for m in METHODS]}")


def is_concrete_method(obj: object) -> bool:
    """A class users fit or wrap: a task's method or :class:`StackedRuns`, not a family base."""
    if not isinstance(obj, type) or not issubclass(obj, LightningModule):
        return False
    if issubclass(obj, StackedRuns):
        return True
    tasks = (
        RegressionTask,
        ClassificationTask,
        BinaryClassificationTask,
        SegmentationTask,
        PixelRegressionTask,
    )
    return issubclass(obj, tasks) and issubclass(obj, UQMethod) and obj not in tasks
