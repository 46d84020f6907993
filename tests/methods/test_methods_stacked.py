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
    DeepEnsembleRegression,
    MCDropoutRegression,
    MVERegression,
    SWAGRegression,
)
from uq_box.methods.stacked import StackedRuns
from uq_box.models import MLP
from uq_box.nn import sampling

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
