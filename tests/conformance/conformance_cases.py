"""Data, backbones, fits and checks shared by the conformance suite (``tests/conformance``).

Every check runs on the entries of :data:`uq_box.methods.registry.METHODS`: ``entry.build``
makes the method on :func:`network`, :func:`fit` trains it (or, for a post-hoc wrapper, trains
its base and calibrates it) on the small data of :func:`datamodule`, and :func:`check_contract`
checks its predictions against the prediction contract (docs/architecture.md).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from uq_box.datamodules import ArrayDataModule, StackedDataModule
from uq_box.methods.registry import METHODS, MethodEntry
from uq_box.models import MLP, UNet

N_TRAIN, N_VAL, N_TEST = 64, 16, 16
BATCH_SIZE = 16  # 4 training batches per epoch
NUM_CLASSES = 3
EPOCHS = 3
CHECKPOINT_EVERY = 2  # steps 2, 4 (last batch of epoch 0), 6 (mid-epoch 1), ...
N_PREDICT = 8


def params(predicate: Callable[[MethodEntry], bool] = lambda e: True) -> list:
    """The registry's entries where ``predicate`` holds, as test parameters (Laplace entries
    carry the ``laplace`` marker: they run in ``.venv-laplace``)."""
    return [
        pytest.param(e, id=e.name, marks=[pytest.mark.laplace] if e.laplace else [])
        for e in METHODS
        if predicate(e)
    ]


# -- data and backbones ---------------------------------------------------------------------------
def toy_arrays(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs ``[96, 2]``, regression targets ``[96, 1]`` and labels of 3 classes ``[96]``."""
    generator = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_VAL + N_TEST
    x = torch.randn(n, 2, generator=generator)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:] + 0.1 * torch.randn(n, 1, generator=generator)
    score = x[:, 0] + 0.3 * torch.randn(n, generator=generator)
    labels = torch.bucketize(score, torch.tensor([-0.4, 0.4]))
    return x, y, labels


def binary_labels(x: Tensor, num_labels: int | None) -> Tensor:
    """Labels in {0, 1}: ``[N]`` (binary, ``num_labels`` None) or ``[N, L]`` (multilabel)."""
    thresholds = torch.linspace(-0.5, 0.5, num_labels or 1)
    labels = (x[:, :1] + 0.3 * x[:, 1:2] > thresholds).long()
    return labels[:, 0] if num_labels is None else labels


def array_datamodule(
    task: str, seed: int = 0, batch_size: int = BATCH_SIZE, num_labels: int | None = None
) -> ArrayDataModule:
    """Train/val/test (and, for regression, calib = val) splits of :func:`toy_arrays` (binary
    tasks: :func:`binary_labels`)."""
    x, y, labels = toy_arrays(seed)
    t = y if task == "regression" else labels
    if task == "binary":
        t = binary_labels(x, num_labels)
    a, b = N_TRAIN, N_TRAIN + N_VAL
    calib = {"X_calib": x[a:b], "y_calib": t[a:b]} if task == "regression" else {}
    return ArrayDataModule(
        x[:a], t[:a], x[a:b], t[a:b], x[b:], t[b:], batch_size=batch_size, **calib
    )


def dense_datamodule(task: str, batch_size: int = BATCH_SIZE):
    """Toy segmentation (3 classes, 10% unlabeled training pixels) or pixel regression data:
    ``N_TRAIN`` / ``N_VAL`` / ``N_TEST`` images of 8x8 pixels."""
    from uq_box.datamodules import ToyPixelRegressionDatamodule, ToySegmentationDatamodule

    sizes = {"n_train": N_TRAIN, "n_val": N_VAL, "n_test": N_TEST, "image_size": 8}
    if task == "segmentation":
        return ToySegmentationDatamodule(**sizes, unlabeled_fraction=0.1, batch_size=batch_size)
    return ToyPixelRegressionDatamodule(**sizes, batch_size=batch_size)


def datamodule(entry: MethodEntry, batch_size: int = BATCH_SIZE):
    """The entry's data: one run's data module, or one per run for :class:`StackedRuns`."""
    if entry.dense:
        return dense_datamodule(entry.task, batch_size)
    if entry.stacked:
        modules = [array_datamodule(entry.task, k, batch_size) for k in range(entry.num_runs)]
        return StackedDataModule(modules)
    return array_datamodule(entry.task, batch_size=batch_size, num_labels=entry.num_labels)


def network(entry: MethodEntry, width: int | None = None) -> nn.Module:
    """A fresh ``MLP(2, [8], width)`` (with dropout or BatchNorm where the method needs it)."""
    width = entry.width(NUM_CLASSES) if width is None else width
    if entry.leaf.dense:  # a tiny U-Net: 8x8 images, one level down
        return UNet(1, width, depth=1, width=4, dropout_p=0.2 if entry.leaf.dropout else 0.0)
    dropout_p = 0.2 if entry.leaf.dropout else 0.0
    return MLP(2, [8], width, dropout_p=dropout_p, batch_norm=entry.leaf.batch_norm)


def predict_inputs(entry: MethodEntry | None = None) -> Tensor:
    """``N_PREDICT`` test inputs (a dense entry's: 8x8 test images)."""
    if entry is not None and entry.dense:
        return dense_datamodule(entry.task).X_test[:N_PREDICT]
    return toy_arrays()[0][-N_PREDICT:]


def predict(method, entry: MethodEntry, x: Tensor) -> dict[str, Tensor]:
    """``predict_step`` of a bare input batch (every run sees it for :class:`StackedRuns`)."""
    if entry.stacked:
        return method.predict_step(x, shared_inputs=True)
    return method.predict_step(x)


# -- training -----------------------------------------------------------------------------------
def trainer(**extra) -> Trainer:
    extra.setdefault("enable_checkpointing", False)
    extra.setdefault("max_epochs", EPOCHS)
    return Trainer(
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


@dataclass
class Fit:
    """A fitted method, the trainer that fitted (or calibrated) it and its logged values."""

    method: object
    trainer: Trainer
    logged: dict[str, float]


def fit(entry: MethodEntry, seed: int = 0, ckpt_path: Path | None = None, callbacks=()) -> Fit:
    """Fit the entry (optionally resuming from ``ckpt_path``); a post-hoc wrapper's base is
    fitted, then the wrapper is calibrated by validating it on its calibration split."""
    seed_everything(seed)
    method = entry.build(network(entry))
    dm = datamodule(entry)
    if entry.posthoc:
        trainer().fit(method.model, dm)
        split = method.default_split
        loader = dm.calib_dataloader() if split == "calib" else dm.val_dataloader()
        fitter = trainer()
        fitter.validate(method, dataloaders=loader, verbose=False)
    else:
        checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
        fitter = trainer(callbacks=list(callbacks), enable_checkpointing=checkpointing)
        fitter.fit(method, dm, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    logged = {k: float(v) for k, v in fitter.callback_metrics.items()}
    return Fit(method, fitter, logged)


def state_of(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"entries differ: {different}"


def assert_same_predictions(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"predictions differ in {different}"


# -- the prediction contract ----------------------------------------------------------------------
REGRESSION_KEYS = {"pred", "pred_uct", "epistemic_uct", "aleatoric_uct"}
CLASSIFICATION_KEYS = {"pred", "pred_uct", "epistemic_uct", "aleatoric_uct", "logits"}


def entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def check_contract(
    preds: dict[str, Tensor],
    entry: MethodEntry,
    n: int,
    num_classes: int = NUM_CLASSES,
    dtype: torch.dtype = torch.float32,
    num_samples: int | None = None,
) -> None:
    """Keys, shapes, dtypes, finiteness and the identities of the prediction contract, for each
    run of a :class:`StackedRuns` entry (whose values carry a leading run dimension)."""
    if entry.stacked:
        for value in preds.values():
            assert value.shape[0] == entry.num_runs, value.shape
        runs = [{k: v[i] for k, v in preds.items()} for i in range(entry.num_runs)]
        for run in runs:
            check_contract(run, entry.base, n, num_classes, dtype, num_samples)
        return
    for key, value in preds.items():
        if key == "pred_set":  # the one boolean key: a conformal prediction set per point
            shape = (n, num_classes, 8, 8) if entry.dense else (n, num_classes)  # (or pixel)
            assert value.dtype == torch.bool and value.shape == shape, value.shape
            continue
        assert value.dtype == dtype, (key, value.dtype)
        assert torch.isfinite(value).all(), key
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    if entry.dense:
        check_dense_contract(preds, entry, n, num_classes, num_samples, tol)
    elif entry.task == "binary":
        check_binary_contract(preds, entry.width(num_classes), n, num_samples, tol)
    elif entry.task == "regression":
        assert REGRESSION_KEYS <= set(preds), sorted(preds)
        for key in REGRESSION_KEYS:
            assert preds[key].shape == (n, 1), (key, preds[key].shape)
        total, aleatoric, epistemic = (
            preds["pred_uct"],
            preds["aleatoric_uct"],
            preds["epistemic_uct"],
        )
        torch.testing.assert_close(total**2, aleatoric**2 + epistemic**2, **tol)
        assert (aleatoric > 0).all()
        if "samples" in preds:
            samples = preds["samples"]
            assert samples.ndim == 3 and samples.shape[1:] == (n, 1), samples.shape
            if num_samples is not None:
                assert samples.shape[0] == num_samples
        quantiles = preds.get("quantiles")
        if quantiles is not None and quantiles.ndim == 3:  # [N, T, Q], non-decreasing levels
            assert quantiles.shape[:2] == (n, 1), quantiles.shape
            assert (quantiles.diff(dim=-1) >= -1e-5).all(), "quantiles decrease with the level"
    else:
        assert CLASSIFICATION_KEYS <= set(preds), sorted(preds)
        pred, logits = preds["pred"], preds["logits"]
        assert pred.shape == (n, num_classes)
        assert logits.ndim == 3 and logits.shape[1:] == (n, num_classes), logits.shape
        if num_samples is not None:
            assert logits.shape[0] == num_samples
        for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
            assert preds[key].shape == (n,), (key, preds[key].shape)
        probs = logits.softmax(-1)
        torch.testing.assert_close(pred, probs.mean(0), **tol)
        torch.testing.assert_close(pred.sum(-1), torch.ones(n, dtype=dtype), **tol)
        total, aleatoric, epistemic = (
            preds["pred_uct"],
            preds["aleatoric_uct"],
            preds["epistemic_uct"],
        )
        torch.testing.assert_close(total, entropy(pred), **tol)
        torch.testing.assert_close(aleatoric, entropy(probs).mean(0), **tol)
        torch.testing.assert_close(total, aleatoric + epistemic, **tol)
        assert (total <= math.log(num_classes) + 1e-5).all()
    epistemic = preds["epistemic_uct"]
    assert (epistemic >= 0).all()
    if entry.stochastic:
        assert (epistemic > 0).any(), "the samples or members do not differ"
    else:
        assert (epistemic == 0).all(), "one network, no epistemic part"


def check_dense_contract(preds, entry, n, num_classes, num_samples, tol) -> None:
    """Segmentation: ``pred`` ``[N, C, H, W]`` the mean sampled softmax over the class axis, the
    entropy split ``[N, H, W]`` per pixel; pixel regression: ``[N, T, H, W]`` with
    ``total^2 = aleatoric^2 + epistemic^2`` per pixel (8x8 images, one target)."""
    hw = (8, 8)
    if entry.task == "segmentation":
        assert CLASSIFICATION_KEYS <= set(preds), sorted(preds)
        pred, logits = preds["pred"], preds["logits"]
        assert pred.shape == (n, num_classes, *hw), pred.shape
        assert logits.ndim == 5 and logits.shape[1:] == pred.shape, logits.shape
        if num_samples is not None:
            assert logits.shape[0] == num_samples
        for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
            assert preds[key].shape == (n, *hw), (key, preds[key].shape)
        probs = logits.softmax(2)
        torch.testing.assert_close(pred, probs.mean(0), **tol)
        total = entropy(pred.movedim(1, -1))
        torch.testing.assert_close(preds["pred_uct"], total, **tol)
        torch.testing.assert_close(
            preds["aleatoric_uct"], entropy(probs.movedim(2, -1)).mean(0), **tol
        )
        torch.testing.assert_close(
            preds["pred_uct"], preds["aleatoric_uct"] + preds["epistemic_uct"], **tol
        )
        assert (total <= math.log(num_classes) + 1e-5).all()
    else:
        assert REGRESSION_KEYS <= set(preds), sorted(preds)
        for key in REGRESSION_KEYS:
            assert preds[key].shape == (n, 1, *hw), (key, preds[key].shape)
        total, aleatoric, epistemic = (
            preds[k] for k in ("pred_uct", "aleatoric_uct", "epistemic_uct")
        )
        torch.testing.assert_close(total**2, aleatoric**2 + epistemic**2, **tol)
        assert (aleatoric > 0).all()
        samples = preds["samples"]
        assert samples.ndim == 5 and samples.shape[1:] == (n, 1, *hw), samples.shape


def binary_entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-30).log() + (1 - p) * (1 - p).clamp_min(1e-30).log())


def check_binary_contract(preds, num_labels, n, num_samples, tol) -> None:
    """Binary / multilabel: ``pred`` the mean sigmoid ``[N, L]``; per label ``h(pbar) = mean_s
    h(p_s) + MI``, the ``[N]`` keys the sums over the labels."""
    keys = CLASSIFICATION_KEYS | {f"{k}_per_label" for k in ("pred_uct", "aleatoric_uct")}
    assert keys <= set(preds), sorted(preds)
    pred, logits = preds["pred"], preds["logits"]
    assert pred.shape == (n, num_labels), pred.shape
    assert logits.ndim == 3 and logits.shape[1:] == (n, num_labels), logits.shape
    if num_samples is not None:
        assert logits.shape[0] == num_samples
    probs = logits.sigmoid()
    torch.testing.assert_close(pred, probs.mean(0), **tol)
    total = binary_entropy(pred)
    aleatoric = binary_entropy(probs).mean(0)
    for key, value in (("pred_uct", total), ("aleatoric_uct", aleatoric)):
        torch.testing.assert_close(preds[f"{key}_per_label"], value, **tol)
        torch.testing.assert_close(preds[key], value.sum(-1), **tol)
    torch.testing.assert_close(
        preds["pred_uct"], preds["aleatoric_uct"] + preds["epistemic_uct"], **tol
    )
    assert (preds["pred_uct"] <= num_labels * math.log(2) + 1e-5).all()


# -- bad input ------------------------------------------------------------------------------------
#: counts every method that takes them checks: a positive integer
COUNTS = (
    "num_mc_samples_train",
    "num_mc_samples_test",
    "num_members",
    "max_num_samples",
    "thinning",
    "num_runs",
    "max_iter",
)


def accepted_arguments(cls: type) -> set[str]:
    """The constructor arguments of ``cls`` and of the ``__init__`` its ``**kwargs`` reach."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= set(inspect.signature(vars(klass)["__init__"]).parameters)
    return names


@dataclass
class BadInput:
    """``action()`` raises ``error`` whose message holds every string of ``parts``."""

    id: str
    action: Callable[[], object]
    error: type[BaseException]
    parts: tuple[str, ...]


def _fast_fit(entry: MethodEntry, method) -> None:
    seed_everything(0)
    quiet = Trainer(
        fast_dev_run=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    quiet.fit(method.model if entry.posthoc else method, datamodule(entry))


def bad_inputs(entry: MethodEntry) -> list[BadInput]:
    """The shared bad-input table, as it applies to ``entry``."""
    cases = []
    leaf = entry.leaf
    if entry.posthoc:
        other = "classification" if entry.task == "regression" else "regression"
        if entry.dense:  # the other dense task
            other = "pixel_regression" if entry.task == "segmentation" else "segmentation"
        wrong = next(e for e in METHODS if e.base is None and e.task == other and not e.laplace)
        task = entry.task.replace("_", " ")
        cases.append(
            BadInput(
                "base_of_the_other_task",
                lambda: entry.cls(wrong.build(network(wrong)), **entry.kwargs),
                TypeError,
                ("`model`", wrong.cls.__name__, f"a fitted {task} method"),
            )
        )
    elif leaf.task in ("regression", "pixel_regression"):
        width = leaf.n_outputs + 1
        cases.append(
            BadInput(
                "network_one_output_too_many",
                lambda: _fast_fit(entry, entry.build(network(entry, width))),
                ValueError,
                ("`n_outputs`", str(width), f"{leaf.n_outputs}"),
            )
        )
    elif leaf.task == "binary":
        width = leaf.width(NUM_CLASSES) + 1
        cases.append(
            BadInput(
                "network_one_output_too_many",
                lambda: _fast_fit(entry, entry.build(network(entry, width))),
                ValueError,
                ("`n_outputs`", f"gives {width} outputs"),
            )
        )
    else:
        cases.append(
            BadInput(
                "network_with_fewer_outputs_than_classes",
                lambda: _fast_fit(entry, entry.build(network(entry, NUM_CLASSES - 1))),
                ValueError,
                ("`n_outputs`", f"class index {NUM_CLASSES - 1}", f"in [0, {NUM_CLASSES - 1})"),
            )
        )
    accepted = accepted_arguments(entry.cls)
    for name in COUNTS:
        if name in accepted:
            cases.append(
                BadInput(
                    f"{name}_zero",
                    lambda name=name: entry.build(network(entry), **{name: 0}),
                    ValueError,
                    (f"`{name}`", "got 0", "must be", "integer"),  # (Laplace: >= 2)
                )
            )
    if "burnin_epochs" in accepted:
        cases.append(
            BadInput(
                "burnin_epochs_negative",
                lambda: entry.build(network(entry), burnin_epochs=-1),
                ValueError,
                ("`burnin_epochs`", "got -1", "non-negative integer"),
            )
        )
    return cases


def bad_input_params() -> list:
    """Every (entry, row) pair of the shared bad-input table, as test parameters."""
    return [
        pytest.param(entry, case, id=f"{entry.name}-{case.id}", marks=p.marks)
        for p in params()
        for entry in p.values
        for case in bad_inputs(entry)
    ]
