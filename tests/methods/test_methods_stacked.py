"""Stacked runs: K runs of a method in one vectorized fit equal K separate fits."""

import copy
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from backbones import BACKBONES
from lightning import Trainer

from uq_box.datamodules.stacked import StackedDataModule, kfold_datamodules
from uq_box.methods import (
    BNNVIRegression,
    DDUClassification,
    DeepEnsembleRegression,
    DUERegression,
    MCDropoutRegression,
    MVERegression,
    SNGPRegression,
    SWAGRegression,
)
from uq_box.methods.stacked import StackedRuns
from uq_box.models import MLP
from uq_box.nn import sampling, svgp

NUM_RUNS = 3


def _data(n=57, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype("float32")
    y = (np.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.1 * rng.normal(size=n)).astype("float32")
    return x, y


MAKERS = {
    "mve": lambda: MVERegression(MLP(2, (8,), 2)),
    "deep_ensemble": lambda: DeepEnsembleRegression(MLP(2, (8,), 2), num_members=2),
    "mc_dropout": lambda: MCDropoutRegression(
        MLP(2, (8,), 2, dropout_p=0.2), num_mc_samples_train=2, num_mc_samples_test=3
    ),
    "bnn_vi": lambda: BNNVIRegression(
        MLP(2, (8,), 2), num_mc_samples_train=2, num_mc_samples_test=3, posterior_rho_init=-2.0
    ),
}


def _trainer(epochs=2):
    return Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip


@pytest.fixture
def replayed_noise(monkeypatch):
    """Standard normal noise that depends only on the draw's place in its forward pass.

    Every Monte Carlo forward pass draws the same sequence (through ``noise_fn``, which dropout
    masks and weight samples both use), so a separate fit and each run of a stacked fit (whose
    vectorized forward is one pass for all runs) see the same noise.
    """
    original = sampling.mc_sampling
    # drawn here: a random op inside vmap(randomness="different") draws per run
    table = torch.randn(100_000, generator=torch.Generator().manual_seed(0))

    def with_replay(num_samples, noise_fn=None):
        counter = itertools.count()

        def replay(module, name, shape):
            start = 7919 * next(counter)
            return table[start : start + math.prod(shape)].reshape(shape)

        return original(num_samples, replay if noise_fn is None else noise_fn)

    monkeypatch.setattr(sampling, "mc_sampling", with_replay)


@pytest.mark.parametrize("name", list(MAKERS))
def test_stacked_fit_equals_separate_fits(name, replayed_noise):
    x, y = _data()
    modules = kfold_datamodules(x, y, NUM_RUNS, batch_size=16)  # 38 training rows: 3 steps
    torch.manual_seed(0)
    methods = [MAKERS[name]() for _ in range(NUM_RUNS)]
    separate = copy.deepcopy(methods)
    stacked = StackedRuns(methods)
    _trainer().fit(stacked, datamodule=StackedDataModule(modules))
    for k, (method, module) in enumerate(zip(separate, modules, strict=True)):
        _trainer().fit(method, datamodule=module)
        got = stacked.run(k).state_dict()
        for key, value in method.state_dict().items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=key)
        other = separate[(k + 1) % NUM_RUNS].state_dict()
        assert any(not torch.equal(got[key], value) for key, value in other.items())
    # per-run validation terms and metrics of the last epoch, one value per run
    assert stacked.run_metrics["val"]["nll"].shape == (NUM_RUNS,)


def test_runs_draw_their_own_noise():
    """Identical runs on identical data still draw different dropout masks."""
    torch.manual_seed(0)
    method = MAKERS["mc_dropout"]()
    stacked = StackedRuns([copy.deepcopy(method) for _ in range(NUM_RUNS)])
    x = torch.randn(1, 64, 2).expand(NUM_RUNS, 64, 2)
    y = torch.zeros(NUM_RUNS, 64, 1)
    stacked.train()
    losses = stacked._vmap("loss", x, y)
    assert losses.shape == (NUM_RUNS,)
    assert len(set(losses.tolist())) == NUM_RUNS


def test_predictions_metrics_and_runs():
    x, y = _data(80)
    modules = kfold_datamodules(
        x[:60], y[:60], NUM_RUNS, batch_size=20, X_test=x[60:], y_test=y[60:]
    )
    torch.manual_seed(0)
    stacked = StackedRuns(MAKERS["bnn_vi"], NUM_RUNS)
    trainer = _trainer(1)
    data = StackedDataModule(modules)
    trainer.fit(stacked, datamodule=data)
    results = trainer.test(stacked, datamodule=data, verbose=False)[0]
    per_run = [results[f"test_nll/run_{k}"] for k in range(NUM_RUNS)]
    assert results["test_nll"] == pytest.approx(np.mean(per_run), rel=1e-5)
    preds = trainer.predict(stacked, datamodule=data)[0]
    assert preds["pred"].shape == (NUM_RUNS, 20, 1)
    assert preds["samples"].shape == (NUM_RUNS, 3, 20, 1)
    shared = stacked.predict_step(torch.tensor(x[:5]), shared_inputs=True)
    assert shared["pred_uct"].shape == (NUM_RUNS, 5, 1)
    # run k as a standalone method predicts what the stack predicts for it (same noise seed)
    for k in range(NUM_RUNS):
        torch.manual_seed(1)
        single = stacked.run(k).predict_step(torch.tensor(x[:5]))
        assert single["pred"].shape == (5, 1)
        assert torch.isfinite(single["pred_uct"]).all()


def test_bad_input():
    with pytest.raises(ValueError, match="`num_runs` is required"):
        StackedRuns(MAKERS["mve"]())
    with pytest.raises(TypeError, match="overrides"):
        StackedRuns(lambda: SWAGRegression(MLP(2, (4,), 2)), 2)
    with pytest.raises(TypeError, match="must be a UQMethod"):
        StackedRuns([MLP(2, (4,), 2)])
    stacked = StackedRuns(MAKERS["mve"], 2)
    with pytest.raises(ValueError, match="per-run batches"):
        stacked._batch({"input": torch.zeros(3, 4, 2), "target": torch.zeros(3, 4, 1)}, "train")


def test_classification_runs():
    from uq_box.methods import DeepEnsembleClassification

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    modules = kfold_datamodules(
        x[:60], y[:60], NUM_RUNS, batch_size=20, X_test=x[60:], y_test=y[60:]
    )
    torch.manual_seed(0)
    stacked = StackedRuns(
        lambda: DeepEnsembleClassification(MLP(2, (8,), 2), num_members=2), NUM_RUNS
    )
    trainer = _trainer(2)
    data = StackedDataModule(modules)
    trainer.fit(stacked, datamodule=data)
    results = trainer.test(stacked, datamodule=data, verbose=False)[0]
    assert {f"test_accuracy/run_{k}" for k in range(NUM_RUNS)} <= set(results)
    preds = stacked.predict_step(torch.tensor(x[60:]), shared_inputs=True)
    assert preds["pred"].shape == (NUM_RUNS, 30, 2)
    torch.testing.assert_close(preds["pred"].sum(-1), torch.ones(NUM_RUNS, 30))
    assert preds["epistemic_uct"].shape == (NUM_RUNS, 30)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_stacked_runs_on_the_backbone_table(backbone, replayed_noise):
    """On every graph of the backbone table (residual, dense, U-Net, two branches, a layer
    called twice, a transformer block), the stacked objective and prediction of each run equal
    that run's own, given the same noise."""
    entry = BACKBONES[backbone]
    torch.manual_seed(0)
    methods = [
        BNNVIRegression(
            entry.build(2),
            stochastic_module_names=entry.placements["inner"],
            num_mc_samples_train=2,
            num_mc_samples_test=3,
            num_training_points=10,
            posterior_rho_init=-2.0,
        )  # fmt: skip
        for _ in range(2)
    ]
    separate = copy.deepcopy(methods)
    stacked = StackedRuns(methods).train()
    x = torch.randn(2, 4, *entry.input_shape)
    y = torch.randn(2, 4, 1)
    with warnings.catch_warnings():  # no vmap fallback, no plan folded at the input
        warnings.simplefilter("error", UserWarning)
        losses = stacked._vmap("loss", x, y)
        preds = stacked.predict_step(x)
    for k, method in enumerate(separate):
        method.train()
        torch.testing.assert_close(
            losses[k], method.loss(x[k], y[k])[0]["loss"], atol=1e-5, rtol=1e-5
        )
        own = method.predict_step(x[k])
        for key in ("pred", "pred_uct", "epistemic_uct"):
            torch.testing.assert_close(preds[key][k], own[key], atol=1e-5, rtol=1e-5)


#: methods with lifecycle hooks that StackedRuns runs per run: SNGP's precision reset at batch 0
#: (vectorized), DUE's initialization from the training features and DDU's density fit after
#: training (run by run); each with the keys of its prediction that depend on no noise
HOOKED = {
    "sngp": (
        lambda: SNGPRegression(MLP(2, (8,), 2), num_features=16, num_mc_samples_test=3),
        ("pred", "epistemic_uct"),
    ),
    "due": (
        lambda: DUERegression(MLP(2, (8,), 1), num_inducing=4, num_mc_samples_test=3),
        ("pred", "epistemic_uct"),
    ),
    "ddu": (lambda: DDUClassification(MLP(2, (8,), 3)), ("pred", "density_score")),
}


@pytest.mark.parametrize("name", list(HOOKED))
def test_stacked_fit_with_lifecycle_hooks_equals_separate_fits(name, monkeypatch):
    """Every parameter and buffer (SNGP's precision of the last epoch, DUE's inducing points
    and length scale, DDU's fitted density) and the predictions equal those of separate fits."""
    kmeans = svgp.kmeans  # DUE's k-means draws its seeding from a generator of its own here
    monkeypatch.setattr(
        svgp,
        "kmeans",
        lambda points, k, iterations=100, generator=None: kmeans(
            points, k, iterations, torch.Generator().manual_seed(0)
        ),
    )
    make, keys = HOOKED[name]
    x, y = _data()
    targets = np.digitize(x[:, 0], [-0.4, 0.4]) if name == "ddu" else y
    modules = kfold_datamodules(x, targets, NUM_RUNS, batch_size=16)  # 3 steps per epoch
    torch.manual_seed(0)
    methods = [make() for _ in range(NUM_RUNS)]
    separate = copy.deepcopy(methods)
    stacked = StackedRuns(methods)
    _trainer().fit(stacked, datamodule=StackedDataModule(modules))
    inputs = torch.tensor(x[:5])
    preds = stacked.predict_step(inputs, shared_inputs=True)
    for k, (method, module) in enumerate(zip(separate, modules, strict=True)):
        _trainer().fit(method, datamodule=module)
        got = stacked.run(k).state_dict()
        for key, value in method.state_dict().items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=key)
        own = method.predict_step(inputs)
        for key in keys:
            torch.testing.assert_close(preds[key][k], own[key], atol=1e-5, rtol=1e-5, msg=key)
    run = stacked.run(0)
    if name == "sngp":  # one epoch's precision: the stack reset it at batch 0 of epoch 1
        assert not torch.equal(run.gp.precision, torch.eye(16))
    if name == "due":
        assert bool(run.gp.initialized)
    if name == "ddu":
        assert run.density.fitted


class _Counted(MVERegression):
    """Counts its training steps (in place, every step) and keeps its training targets' sum
    (assigned, once per fit); with ``assign`` it assigns the count, which vmap would lose."""

    stackable_hooks = frozenset({"on_train_batch_begin", "on_train_done"})
    assign = False

    def __init__(self) -> None:
        super().__init__(MLP(2, (4,), 2))
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("target_sum", torch.zeros(0))

    def on_train_batch_begin(self, batch_idx: int) -> None:
        if self.assign:
            self.steps = self.steps + 1
        else:
            self.steps.add_(1)

    def on_train_done(self) -> None:
        total = sum(batch["target"].sum() for batch in self.trainer.train_dataloader)
        self.target_sum = total.reshape(1)  # a new shape: the stacked buffer is resized


def test_hooks_update_in_place_or_assign_once_per_fit():
    x, y = _data()
    modules = kfold_datamodules(x, y, NUM_RUNS, batch_size=16)
    data = StackedDataModule(modules)
    stacked = StackedRuns(_Counted, NUM_RUNS)
    _trainer().fit(stacked, datamodule=data)
    for k, module in enumerate(modules):
        run = stacked.run(k)
        assert run.steps.item() == 6  # 2 epochs of 3 steps
        torch.testing.assert_close(run.target_sum, module.split("train")[1].sum().reshape(1))
    # a checkpoint's resized buffer loads into a fresh stack
    fresh = StackedRuns(_Counted, NUM_RUNS)
    fresh.load_state_dict(stacked.state_dict())
    torch.testing.assert_close(fresh.run(2).target_sum, stacked.run(2).target_sum)

    class Assigning(_Counted):
        stackable_hooks = _Counted.stackable_hooks
        assign = True

    with pytest.raises(RuntimeError, match="steps` got a new tensor .* in place"):
        _trainer().fit(StackedRuns(Assigning, NUM_RUNS), datamodule=data)


def test_undeclared_stateful_hooks_are_refused():
    class Clipped(MVERegression):  # a stateful hook, not declared
        def after_optimizer_step(self) -> None:
            pass

    class Reset(SNGPRegression):  # overrides a declared hook anew without declaring it
        def on_train_batch_begin(self, batch_idx: int) -> None:
            pass

    class Stepping(MVERegression):  # a hook that cannot run per run
        stackable_hooks = frozenset({"training_step"})

    make = {
        Clipped: lambda: Clipped(MLP(2, (4,), 2)),
        Reset: lambda: Reset(MLP(2, (4,), 2), num_features=8),
        Stepping: lambda: Stepping(MLP(2, (4,), 2)),
    }
    with pytest.raises(TypeError, match="overrides `after_optimizer_step` \\(Clipped\\)"):
        StackedRuns(make[Clipped], 2)
    with pytest.raises(TypeError, match="overrides `on_train_batch_begin` \\(Reset\\)"):
        StackedRuns(make[Reset], 2)
    with pytest.raises(TypeError, match="cannot run per stacked run"):
        StackedRuns(make[Stepping], 2)


def test_due_initializes_each_run_from_loaders_given_to_fit():
    """Without a data module, ``on_fit_begin`` reads each run's batches of the loader given to
    ``fit`` (before the fit loop has set it up)."""
    x, y = _data()
    loader = StackedDataModule(kfold_datamodules(x, y, NUM_RUNS, batch_size=16)).train_dataloader()
    torch.manual_seed(0)
    stacked = StackedRuns(HOOKED["due"][0], NUM_RUNS)
    _trainer(1).fit(stacked, train_dataloaders=loader)
    runs = [stacked.run(k).gp for k in range(NUM_RUNS)]
    assert all(bool(gp.initialized) for gp in runs)
    assert not torch.equal(runs[0].inducing_points, runs[1].inducing_points)
