"""Classification methods end to end: the two-moons configs through the CLI, uncertainty far from
the spiral data, MC dropout on rotated digits, and early errors on bad targets and models."""

import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import quiet_trainer
from lightning import seed_everything

from uq_box.cli import UQBoxCLI, main
from uq_box.datamodules import ArrayDataModule, DigitsDatamodule, SpiralDatamodule
from uq_box.methods import (
    BNNVIClassification,
    DeepEnsembleClassification,
    DeterministicClassification,
    MCDropoutClassification,
)
from uq_box.models import CNN, MLP

REPO = Path(__file__).parents[2]
CONTRACT_KEYS = {"pred", "pred_uct", "aleatoric_uct", "epistemic_uct", "logits"}


def fit_quietly(model, datamodule, max_epochs):
    """Fit without validation (the checks below use the test split and grids)."""
    trainer = quiet_trainer(max_epochs=max_epochs, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule)
    return model


def accuracy(preds, target):
    return (preds["pred"].argmax(-1) == target).float().mean().item()


def check_contract(preds, n, n_classes, n_samples):
    """The classification prediction contract (docs/architecture.md)."""
    assert set(preds) == CONTRACT_KEYS
    assert preds["pred"].shape == (n, n_classes)
    for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert preds[key].shape == (n,), key
    assert preds["logits"].shape == (n_samples, n, n_classes)
    for key, value in preds.items():
        assert torch.isfinite(value).all(), key
    torch.testing.assert_close(preds["pred"].sum(-1), torch.ones(n))
    assert (preds["pred"] >= 0).all()
    torch.testing.assert_close(
        preds["pred_uct"], preds["aleatoric_uct"] + preds["epistemic_uct"], atol=1e-5, rtol=1e-5
    )
    assert (preds["epistemic_uct"] >= 0).all()
    assert (preds["aleatoric_uct"] >= 0).all()
    assert (preds["pred_uct"] <= np.log(n_classes) + 1e-5).all()
    # pred is the mean of the sampled softmax probabilities
    torch.testing.assert_close(preds["pred"], preds["logits"].softmax(-1).mean(0))


# -- 1. the two-moons configs through the CLI -------------------------------------------------
CONFIGS = {  # config name -> (method class, samples per prediction)
    "deterministic": (DeterministicClassification, 1),
    "mc_dropout": (MCDropoutClassification, 50),
    "deep_ensemble": (DeepEnsembleClassification, 5),
    "bnn_vi": (BNNVIClassification, 50),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def cli_run(request, tmp_path_factory):
    """``uq-box fit`` on one two-moons config for 2 epochs; the run folder and fitted model."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"cli_{name}")
    captured = {}
    original_after_fit = UQBoxCLI.after_fit

    def after_fit(self):
        original_after_fit(self)
        captured["model"], captured["datamodule"] = self.model, self.datamodule

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["uq-box"])
        mp.setattr(UQBoxCLI, "after_fit", after_fit)
        mp.chdir(tmp)
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "two_moons" / f"{name}.yaml"),
                "--trainer.max_epochs=2",
                f"--trainer.logger.init_args.save_dir={tmp}",
            ]
        )
    return dict(name=name, run=tmp / name / "version_0", **captured)


def test_cli_two_moons_writes_metrics_and_report(cli_run):
    run = cli_run["run"]
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert {"test_accuracy", "test_nll", "test_brier", "test_ece"} <= set(metrics), metrics
    for key in ("test_accuracy", "test_nll", "test_brier", "test_ece"):
        assert np.isfinite(metrics[key]), (key, metrics[key])
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert 0.0 <= metrics["test_ece"] <= 1.0
    assert 0.0 <= metrics["test_brier"] <= 2.0
    for png in ("decision_surface", "reliability", "training_metrics"):
        path = run / "report" / f"{png}.png"
        assert path.read_bytes()[:4] == b"\x89PNG", path


def test_cli_two_moons_model_follows_prediction_contract(cli_run):
    method, n_samples = CONFIGS[cli_run["name"]]
    model = cli_run["model"]
    assert type(model) is method
    x = cli_run["datamodule"].X_test[:9]
    preds = model.predict_step(x)
    check_contract(preds, n=9, n_classes=2, n_samples=n_samples)
    if n_samples == 1:
        assert torch.equal(preds["epistemic_uct"], torch.zeros(9))
    else:
        assert (preds["epistemic_uct"] > 0).any()
    # a batch dict gives the same prediction shapes as a bare tensor
    as_batch = model.predict_step({"input": x, "target": torch.zeros(9, dtype=torch.long)})
    assert as_batch["pred"].shape == (9, 2)


# -- 2. the spiral: uncertain far from the data -----------------------------------------------
SPIRAL_RADIUS = 1.0  # far points: farther than this from every training point (data in +-0.5)


def spiral_mlp():
    return MLP(n_inputs=2, n_hidden=[64, 64], n_outputs=3, activation_fn=nn.ReLU())


@pytest.fixture(scope="module")
def spiral():
    """Three methods fitted on the default spiral, with their predictions on test, train, far."""
    dm = SpiralDatamodule()
    grid = dm.grid(resolution=60, margin=2.0)
    far = grid[torch.cdist(grid, dm.X_train).min(1).values > SPIRAL_RADIUS]
    assert len(far) > 1000
    builders = {
        "deterministic": (
            200,
            lambda: DeterministicClassification(
                spiral_mlp(), optimizer=partial(torch.optim.Adam, lr=1e-2)
            ),
        ),
        "deep_ensemble": (
            200,
            lambda: DeepEnsembleClassification(
                spiral_mlp(), optimizer=partial(torch.optim.Adam, lr=1e-2), num_members=5
            ),
        ),
        # All layers Bayesian. The default N(0, 1) prior underfits the spiral (test accuracy
        # about 0.9 after 300 epochs), whose tight arms need large weights; N(0, 3^2) fits it.
        "bnn_vi": (
            300,
            lambda: BNNVIClassification(
                spiral_mlp(),
                optimizer=partial(torch.optim.Adam, lr=1e-2),
                stochastic_module_names=None,
                prior=3.0,
                posterior_rho_init=-3.0,
                estimator="local",
                num_mc_samples_train=4,
                num_mc_samples_test=50,
            ),
        ),
    }
    fitted = {}
    for name, (epochs, build) in builders.items():
        seed_everything(0, verbose=False)
        model = fit_quietly(build(), dm, epochs)
        fitted[name] = dict(
            model=model,
            test=model.predict_step(dm.X_test),
            train=model.predict_step(dm.X_train),
            far=model.predict_step(far),
        )
    return dict(dm=dm, far=far, **fitted)


@pytest.mark.parametrize("name", ["deterministic", "deep_ensemble", "bnn_vi"])
def test_spiral_test_accuracy(spiral, name):
    dm = spiral["dm"]
    acc = accuracy(spiral[name]["test"], dm.Y_test)
    assert acc > 0.9, (name, acc)
    n_samples = {"deterministic": 1, "deep_ensemble": 5, "bnn_vi": 50}[name]
    check_contract(spiral[name]["test"], len(dm.X_test), 3, n_samples)


@pytest.mark.parametrize("name", ["deep_ensemble", "bnn_vi"])
def test_spiral_mutual_information_grows_far_from_data(spiral, name):
    far_mi = spiral[name]["far"]["epistemic_uct"].mean().item()
    train_mi = spiral[name]["train"]["epistemic_uct"].mean().item()
    # seen: ensemble 0.088 far vs 0.0014 on the training points; BNN 0.45 vs 0.11
    assert far_mi > 0.05, (name, far_mi)
    assert far_mi > 3 * train_mi, (name, far_mi, train_mi)


def test_spiral_deterministic_stays_confident_far_from_data(spiral):
    far = spiral["deterministic"]["far"]
    max_prob = far["pred"].max(-1).values.mean().item()
    assert max_prob > 0.9, max_prob
    # one network, one sample: no epistemic part by construction
    assert torch.equal(far["epistemic_uct"], torch.zeros(len(spiral["far"])))
    assert torch.equal(spiral["deterministic"]["train"]["epistemic_uct"], torch.zeros(240))
    torch.testing.assert_close(far["pred_uct"], far["aleatoric_uct"])


def test_spiral_uncertainty_methods_less_confident_far_than_deterministic(spiral):
    deterministic = spiral["deterministic"]["far"]["pred_uct"].mean()
    for name in ("deep_ensemble", "bnn_vi"):
        assert spiral[name]["far"]["pred_uct"].mean() > deterministic, name


# -- 3. digits: MC dropout on rotated images --------------------------------------------------
ANGLES = list(range(0, 91, 15))


@pytest.fixture(scope="module")
def digits_mc_dropout():
    seed_everything(0, verbose=False)
    dm = DigitsDatamodule()
    model = MCDropoutClassification(
        CNN(dropout_p=0.25),
        optimizer=partial(torch.optim.Adam, lr=3e-3),
        num_mc_samples_test=20,
    )
    fit_quietly(model, dm, max_epochs=10)  # under a second here
    rotated = {}
    for angle in ANGLES:
        x, y = dm.rotated_test(angle)
        preds = model.predict_step(x)
        rotated[angle] = dict(
            accuracy=accuracy(preds, y),
            entropy=preds["pred_uct"].mean().item(),
            mutual_information=preds["epistemic_uct"].mean().item(),
        )
    return dict(dm=dm, model=model, rotated=rotated)


def test_digits_mc_dropout_accuracy_and_contract(digits_mc_dropout):
    dm, model = digits_mc_dropout["dm"], digits_mc_dropout["model"]
    assert digits_mc_dropout["rotated"][0]["accuracy"] > 0.85
    preds = model.predict_step(dm.X_test[:9])
    check_contract(preds, n=9, n_classes=10, n_samples=20)
    assert (preds["epistemic_uct"] > 0).all()  # dropout masks disagree
    # dropout stays on at prediction, so two calls differ; the network itself is in eval mode
    modes = [m.training for m in model.modules()]
    again = model.predict_step(dm.X_test[:9])
    assert not torch.equal(preds["logits"], again["logits"])
    assert [m.training for m in model.modules()] == modes  # predict_step restores the modes


def test_digits_rotation_raises_entropy_and_lowers_accuracy(digits_mc_dropout):
    rotated = digits_mc_dropout["rotated"]
    entropy = [rotated[a]["entropy"] for a in ANGLES]
    # Small rotations: entropy rises steadily from the upright images and peaks near 30-45
    # degrees. It is NOT monotone up to 90 degrees: sklearn's 8x8 digits are cropped to the
    # digit's width (columns 0 and 7 hold < 1% of the ink of every class), so a 90-degree turn,
    # an exact pixel permutation, puts about 25% of the ink in columns no training image uses,
    # and the CNN (MC dropout and deep ensembles alike) calls nearly every such image a "4" with
    # an entropy at or below the upright images' (seed 0: 0.45 at 90 vs 0.54 at 0 degrees;
    # seed 1: 0.25 vs 0.47).
    assert entropy[0] < entropy[1] < entropy[2], entropy
    # every rotated set is more uncertain on average than the upright one
    assert np.mean(entropy[1:]) > 1.3 * entropy[0], entropy
    assert max(entropy[2:5]) > 1.5 * entropy[0], entropy
    # and far less accurate
    for angle in ANGLES[2:]:
        assert rotated[angle]["accuracy"] < 0.6, (angle, rotated[angle])


# -- 4. errors --------------------------------------------------------------------------------
def small_classification_data(n=32):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=generator)
    return x, (x[:, 0] > 0).long()


@pytest.mark.parametrize(
    ("make_target", "pattern"),
    [
        (lambda y: y.float(), r"torch\.float32 of shape \(16, 1\)"),  # a 1-D float column
        (lambda y: y[:, None], r"torch\.int64 of shape \(16, 1\)"),
        (lambda y: y.double()[:, None], r"torch\.float64 of shape \(16, 1\)"),
    ],
    ids=["float", "int_column", "float64_column"],
)
def test_bad_targets_fail_on_first_training_step(make_target, pattern):
    x, y = small_classification_data()
    dm = ArrayDataModule(x, make_target(y), batch_size=16)
    model = DeterministicClassification(MLP(2, [8], 2))
    with pytest.raises(ValueError, match=pattern) as info:
        quiet_trainer(fast_dev_run=True).fit(model, dm)
    assert "integer class indices of shape (16,)" in str(info.value)


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (torch.zeros(5), r"torch\.float32 of shape \(5,\)"),
        (torch.zeros(5, 1, dtype=torch.long), r"torch\.int64 of shape \(5, 1\)"),
    ],
    ids=["float", "int_column"],
)
def test_check_target_names_dtype_and_shape(target, pattern):
    seed_everything(0, verbose=False)
    for model in (
        DeterministicClassification(MLP(2, [8], 3)),
        DeepEnsembleClassification(MLP(2, [8], 3), num_members=2),
        BNNVIClassification(MLP(2, [8], 3), num_mc_samples_train=2, num_training_points=5),
        MCDropoutClassification(MLP(2, [8], 3, dropout_p=0.1)),
    ):
        logits = model.sample_outputs(torch.randn(5, 2), 2)
        with pytest.raises(ValueError, match=pattern):
            model.data_loss(logits, target)
        with pytest.raises(ValueError, match=pattern):
            model.training_step({"input": torch.randn(5, 2), "target": target}, 0)


@pytest.mark.parametrize(
    "network",
    [
        MLP(2, [8], 2),  # nn.Dropout(p=0) layers only
        nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)),  # no dropout at all
        CNN(dropout_p=0.0),
    ],
    ids=["mlp_p0", "no_dropout", "cnn_p0"],
)
def test_mc_dropout_without_dropout_names_model(network):
    with pytest.raises(ValueError, match="`model`"):
        MCDropoutClassification(network)
