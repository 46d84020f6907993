"""SG-MCMC methods by numbers.

- the training step returns ``U = N * mean NLL - log prior`` exactly (the sampler's target) and
  logs it per data point;
- samples are kept in memory after burn-in, every ``thinning`` steps, the last
  ``max_num_samples`` of them, and equal the parameters recorded after those steps;
- prediction is one vectorized call that equals a loop over the samples with functional_call;
- partial stochasticity: only the chosen layer moves and is kept;
- buffers in the state dict and checkpoints; calibrated on the toy data; the configs run through
  the CLI; clear errors;
- the fixed-sampler classes (SGLD, pSGLD, SGHMC x regression, classification) are the general
  class with that sampler, number for number, and round-trip through checkpoints.
"""

from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import fit_config, quiet_trainer
from lightning import Callback, seed_everything
from torch import nn
from torch.distributions import Laplace, Normal
from torch.func import functional_call

from uq_box.datamodules import ToyHeteroscedasticDatamodule, TwoMoonsDatamodule
from uq_box.losses import NLL
from uq_box.methods.base import ClassificationTask, RegressionTask
from uq_box.methods.sgmcmc import (
    SGMCMC,
    PSGLDClassification,
    PSGLDRegression,
    SGHMCClassification,
    SGHMCRegression,
    SGLDClassification,
    SGLDRegression,
    SGMCMCClassification,
    SGMCMCRegression,
)
from uq_box.models import MLP
from uq_box.optim import SGHMC, SGLD

REPO = Path(__file__).parents[2]
BUFFERS = ("sgmcmc_samples", "sgmcmc_num_collected", "sgmcmc_num_steps")


def all_flat(module):
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


# -- 1. the potential ----------------------------------------------------------------------------
@pytest.mark.parametrize("prior", [None, 0.5, Laplace(0.0, 0.3)], ids=["default", "0.5", "laplace"])
def test_training_step_returns_the_summed_negative_log_posterior(prior):
    torch.manual_seed(0)
    method = SGMCMCRegression(MLP(1, [8], 2), prior=prior, num_training_points=70)
    x, y = torch.randn(16, 1), torch.randn(16, 1)
    potential = method.training_step({"input": x, "target": y}, 0)
    expected_prior = Normal(0.0, 1.0) if prior is None else prior
    if isinstance(prior, float):
        expected_prior = Normal(0.0, prior)
    neg_log_prior = -sum(expected_prior.log_prob(p).sum() for p in method.model.parameters())
    expected = 70 * NLL()(method.model(x), y) + neg_log_prior
    torch.testing.assert_close(potential, expected)
    # logged per data point: U / N
    means = method._running.pop("train")
    torch.testing.assert_close(means["train_loss"], expected / 70)
    torch.testing.assert_close(means["train_neg_log_prior"], neg_log_prior)


# -- 2. collection: burn-in, thinning, the ring of the last samples --------------------------------
class RecordSteps(Callback):
    """The parameters after every training step, with its epoch."""

    def __init__(self):
        self.epochs, self.thetas = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epochs.append(trainer.current_epoch)
        self.thetas.append(all_flat(pl_module.model))


@pytest.fixture(scope="module")
def fitted_small():
    """5 epochs of 3 steps (70 points, batch 32); burn-in 2 epochs; every 2nd step; keep 3."""
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=100)
    method = SGMCMCRegression(
        MLP(1, [8], 2),
        optimizer=partial(SGLD, lr=1e-3, preconditioned=True),
        burnin_epochs=2,
        thinning=2,
        max_num_samples=3,
    )
    recorder = RecordSteps()
    quiet_trainer(max_epochs=5, callbacks=[recorder]).fit(method, dm)
    return method, dm, recorder


def test_samples_are_the_parameters_after_every_thinning_th_step(fitted_small):
    method, _, recorder = fitted_small
    assert method.num_training_points == 70
    assert recorder.epochs == [e for e in range(5) for _ in range(3)]
    after_burnin = [t for e, t in zip(recorder.epochs, recorder.thetas, strict=True) if e >= 2]
    assert len(after_burnin) == 9
    collected = after_burnin[1::2]  # steps 2, 4, 6, 8 after burn-in
    assert method.num_collected == 4 and int(method.sgmcmc_num_steps) == 9
    assert method.num_samples == 3 and method.sgmcmc_samples.shape == (3, 8 + 8 + 16 + 2)
    torch.testing.assert_close(
        method.samples, torch.stack(collected[-3:]).to(method.samples.device), rtol=0, atol=0
    )
    # the ring stores the newest in the oldest slot; prediction with all uses storage order
    torch.testing.assert_close(method.sample_parameters(), method.sgmcmc_samples, rtol=0, atol=0)
    # the chain moves: the test is not vacuous
    assert (collected[1] - collected[0]).abs().max() > 1e-3


def test_prediction_is_one_vectorized_call_equal_to_a_loop(fitted_small):
    method, dm, _ = fitted_small
    x = dm.X_test[:9]
    before = {k: v.clone() for k, v in method.state_dict().items()}
    preds = method.predict_step({"input": x, "target": dm.Y_test[:9]})
    keys = {"pred", "pred_uct", "epistemic_uct", "aleatoric_uct", "samples", "outputs"}
    assert set(preds) == keys
    assert preds["samples"].shape == (3, 9, 1)
    assert all(preds[k].shape == (9, 1) for k in ("pred", "pred_uct", "epistemic_uct"))
    outputs = method.sample_outputs(x, None)
    loop = torch.stack(
        [
            functional_call(method.model, method.unflatten(theta), (x,))
            for theta in method.sample_parameters()
        ]
    )
    torch.testing.assert_close(outputs, loop, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(preds["pred"], NLL().mean_and_std(loop)[0].mean(0))
    assert (preds["epistemic_uct"] > 0).all()
    torch.testing.assert_close(
        preds["pred_uct"] ** 2, preds["epistemic_uct"] ** 2 + preds["aleatoric_uct"] ** 2
    )
    for key, value in method.state_dict().items():
        assert torch.equal(value, before[key]), key
    # fewer samples: evenly spaced from the oldest to the newest
    kept = method.samples
    torch.testing.assert_close(method.sample_parameters(2), kept[[0, 2]], rtol=0, atol=0)
    assert method.sample_outputs(x, 2).shape == (2, 9, 2)


def test_buffers_in_state_dict_and_checkpoint_round_trip(fitted_small, tmp_path):
    method, dm, _ = fitted_small
    state = method.state_dict()
    assert set(BUFFERS) <= set(state)
    fresh = SGMCMCRegression(MLP(1, [8], 2), burnin_epochs=2, thinning=2, max_num_samples=3)
    assert fresh.num_samples == 0
    fresh.load_state_dict(state)
    x = dm.X_test[:20]
    expected = method.predict_step(x)
    got = fresh.predict_step(x)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    trainer = quiet_trainer(max_epochs=1)
    trainer.strategy.connect(method)
    trainer.save_checkpoint(tmp_path / "sgmcmc.ckpt")
    loaded = SGMCMCRegression.load_from_checkpoint(tmp_path / "sgmcmc.ckpt", model=MLP(1, [8], 2))
    assert loaded.thinning == 2 and loaded.max_num_samples == 3 and loaded.num_collected == 4
    torch.testing.assert_close(loaded.predict_step(x)["pred"], expected["pred"], rtol=0, atol=0)


# -- 3. partial stochasticity --------------------------------------------------------------------
@pytest.mark.parametrize("names", [[-1], ["model.3"]], ids=["index", "name"])
def test_only_the_chosen_layer_is_sampled(names):
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=100)
    method = SGMCMCRegression(
        MLP(1, [8], 2),
        optimizer=partial(SGHMC, lr=1e-2, num_burn_in_steps=3),
        stochastic_module_names=names,
        burnin_epochs=1,
    )
    assert method.parameter_names == ["model.3.weight", "model.3.bias"]
    assert method.sgmcmc_samples.shape == (50, 8 * 2 + 2)
    hidden_before = {k: v.clone() for k, v in method.model.model[0].state_dict().items()}
    last_before = method.model.model[3].weight.detach().clone()
    quiet_trainer(max_epochs=3, limit_val_batches=0).fit(method, dm)
    for key, value in method.model.model[0].state_dict().items():
        assert torch.equal(value, hidden_before[key]), key  # the others stay at their values
    assert not torch.equal(method.model.model[3].weight, last_before)
    assert method.num_samples == 6
    # the prior covers the sampled layer only
    last = method.model.model[3]
    expected = -sum(Normal(0.0, 1.0).log_prob(p).sum() for p in last.parameters())
    torch.testing.assert_close(method.neg_log_prior(), expected)
    x = torch.linspace(-2.0, 2.0, 7).unsqueeze(-1)
    with torch.no_grad():
        hidden = method.model.model[:3](x)
    sampled = method.unflatten(method.sample_parameters())
    by_hand = (
        torch.einsum("nh,soh->sno", hidden, sampled["model.3.weight"])
        + sampled["model.3.bias"][:, None, :]
    )
    torch.testing.assert_close(method.sample_outputs(x, None), by_hand, rtol=1e-5, atol=1e-6)


# -- 4. quality on the toy data ------------------------------------------------------------------
def test_quality_on_toy_heteroscedastic():
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=500)
    method = SGMCMCRegression(
        MLP(1, [50, 50], 2),
        criterion=NLL(),
        optimizer=partial(SGLD, lr=1e-3, preconditioned=True),
        burnin_epochs=50,
        thinning=5,
    )
    trainer = quiet_trainer(max_epochs=80, limit_val_batches=0)
    trainer.fit(method, dm)
    assert method.num_collected == 30 * 11 // 5 and method.num_samples == 50
    metrics = trainer.test(method, dm, verbose=False)[0]
    assert metrics["test_miscalibration_area"] < 0.15, metrics
    assert metrics["test_rmse"] < 0.36, metrics
    preds = method.predict_step(dm.X_test)
    assert (preds["epistemic_uct"] > 0).all()
    assert preds["samples"].shape == (50, len(dm.X_test), 1)


# -- 5. the configs through the CLI -------------------------------------------------------------
@pytest.mark.parametrize(
    ("dataset", "method_cls", "keys"),
    [
        (
            "toy_heteroscedastic",
            PSGLDRegression,
            {"test_nll", "test_rmse", "test_crps", "test_coverage_95", "test_miscalibration_area"},
        ),
        (
            "two_moons",
            PSGLDClassification,
            {"test_accuracy", "test_nll", "test_brier", "test_ece"},
        ),
    ],
)
def test_cli_config(dataset, method_cls, keys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, metrics = fit_config(
        f"{dataset}/sgld.yaml",
        tmp_path,
        monkeypatch,
        "--trainer.max_epochs=3",
        "--model.init_args.burnin_epochs=1",
    )
    assert keys <= set(metrics), metrics
    assert type(model) is method_cls
    optimizer = model.trainer.optimizers[0]
    assert isinstance(optimizer, SGLD) and optimizer.defaults["preconditioned"]
    steps_per_epoch = model.trainer.num_training_batches
    assert model.num_collected == 2 * steps_per_epoch // 10
    assert model.num_samples > 0 and model.thinning == 10 and model.max_num_samples == 50
    x = torch.linspace(-1.0, 1.0, 14).reshape(7, 2) if dataset == "two_moons" else torch.ones(7, 1)
    preds = model.predict_step(x)
    samples = preds["logits"] if dataset == "two_moons" else preds["samples"]
    assert samples.shape[:2] == (model.num_samples, 7)
    assert all(torch.isfinite(v).all() for v in preds.values())


def test_cli_sghmc_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, metrics = fit_config(
        "toy_heteroscedastic/sghmc.yaml",
        tmp_path,
        monkeypatch,
        "--trainer.max_epochs=3",
        "--model.init_args.burnin_epochs=1",
        "--model.init_args.num_burn_in_steps=5",
    )
    assert type(model) is SGHMCRegression and "test_nll" in metrics
    optimizer = model.trainer.optimizers[0]
    assert isinstance(optimizer, SGHMC)
    assert optimizer.defaults == {"lr": 0.01, "mdecay": 0.05, "num_burn_in_steps": 5}
    assert model.num_collected == 2 * model.trainer.num_training_batches // 10


# -- 6. errors and warnings -----------------------------------------------------------------------
def test_predict_before_any_sample_is_a_clear_error():
    method = SGMCMCRegression(MLP(1, [8], 2), burnin_epochs=3)
    with pytest.raises(RuntimeError, match="burnin_epochs"):
        method.predict_step(torch.zeros(4, 1))
    # training that never reaches the collection epochs: validation works, testing fails clearly
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=50, n_points=100)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(method, dm)
    assert method.num_samples == 0
    with pytest.raises(RuntimeError, match="no sample yet"):
        trainer.test(method, dm, verbose=False)


def test_plain_optimizer_is_refused():
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=50, n_points=100)
    method = SGMCMCRegression(MLP(1, [8], 2), optimizer=partial(torch.optim.Adam, lr=1e-3))
    with pytest.raises(TypeError, match="SG-MCMC sampler"):
        quiet_trainer(max_epochs=1).fit(method, dm)


def test_collecting_while_the_sampler_adapts_warns():
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=50, n_points=100)
    method = SGMCMCRegression(
        MLP(1, [8], 2), optimizer=partial(SGHMC, lr=1e-2), burnin_epochs=1
    )  # 3000 adaptation steps, 2 burn-in steps
    with pytest.warns(UserWarning, match="still adapts"):
        quiet_trainer(max_epochs=2, limit_val_batches=0).fit(method, dm)
    assert method.num_samples == 2


def test_argument_errors():
    with pytest.raises(ValueError, match="`thinning`"):
        SGMCMCRegression(MLP(1, [8], 2), thinning=0)
    with pytest.raises(ValueError, match="`max_num_samples`"):
        SGMCMCRegression(MLP(1, [8], 2), max_num_samples=0)
    with pytest.raises(ValueError, match="`num_mc_samples_test`"):
        SGMCMCRegression(MLP(1, [8], 2), num_mc_samples_test=0)
    with pytest.raises(ValueError, match="`num_training_points`"):
        SGMCMCRegression(MLP(1, [8], 2), num_training_points=0)
    with pytest.raises(ValueError, match="`burnin_epochs`"):
        SGMCMCRegression(MLP(1, [8], 2), burnin_epochs=-1)
    with pytest.raises(ValueError, match="`prior` scale"):
        SGMCMCRegression(MLP(1, [8], 2), prior=-1.0)
    with pytest.raises(ValueError, match="names no layer 'model.9'"):
        SGMCMCRegression(MLP(1, [8], 2), stochastic_module_names=["model.9"])
    with pytest.raises(ValueError, match="no parameters"):
        SGMCMCRegression(nn.ReLU())
    with pytest.raises(ValueError, match="num_training_points"):
        SGMCMCRegression(MLP(1, [8], 2)).num_training_points  # noqa: B018
    method = SGMCMCClassification(MLP(2, [8], 3), num_training_points=10)
    assert isinstance(method, SGMCMC) and not isinstance(method, RegressionTask)
    with pytest.raises(ValueError, match="class indices"):
        method.loss(torch.zeros(4, 2), torch.zeros(4, 3))


# -- 7. the sampler fixed: SGLD, pSGLD, SGHMC ---------------------------------------------------
FIXED = [
    (SGLDRegression, {"lr": 1e-4}, partial(SGLD, lr=1e-4)),
    (
        PSGLDRegression,
        {"lr": 2e-3, "num_burn_in_steps": 4},
        partial(SGLD, lr=2e-3, preconditioned=True, num_burn_in_steps=4),
    ),
    (
        SGHMCRegression,
        {"lr": 5e-3, "mdecay": 0.1, "num_burn_in_steps": 3},
        partial(SGHMC, lr=5e-3, mdecay=0.1, num_burn_in_steps=3),
    ),
    (SGLDClassification, {"lr": 1e-3}, partial(SGLD, lr=1e-3)),
    (PSGLDClassification, {}, partial(SGLD, lr=1e-3, preconditioned=True)),
    (SGHMCClassification, {"num_burn_in_steps": 3}, partial(SGHMC, lr=1e-2, num_burn_in_steps=3)),
]
FIXED_IDS = [cls.__name__ for cls, _, _ in FIXED]


def fixed_sampler_fit(make, classification):
    """3 epochs on 70 points (3 steps each), samples every 2nd step after 1 burn-in epoch."""
    seed_everything(0)
    if classification:
        dm, net = TwoMoonsDatamodule(n_points=100, batch_size=32), MLP(2, [8], 2)
    else:
        dm, net = ToyHeteroscedasticDatamodule(batch_size=32, n_points=100), MLP(1, [8], 2)
    method = make(net, burnin_epochs=1, thinning=2, max_num_samples=3, prior=0.5)
    quiet_trainer(max_epochs=3, limit_val_batches=0).fit(method, dm)
    return method, dm


@pytest.mark.filterwarnings("ignore:samples are collected while the sampler still adapts")
@pytest.mark.parametrize(("cls", "kwargs", "sampler"), FIXED, ids=FIXED_IDS)
def test_fixed_sampler_equals_the_general_class_with_that_sampler(cls, kwargs, sampler):
    classification = issubclass(cls, ClassificationTask)
    general = SGMCMCClassification if classification else SGMCMCRegression
    fixed, dm = fixed_sampler_fit(partial(cls, **kwargs), classification)
    reference, _ = fixed_sampler_fit(partial(general, optimizer=sampler), classification)
    assert isinstance(fixed, SGMCMC)
    optimizer = fixed.trainer.optimizers[0]
    assert type(optimizer) is type(reference.trainer.optimizers[0])
    assert optimizer.defaults == reference.trainer.optimizers[0].defaults
    assert fixed.num_samples == reference.num_samples == 3
    for key, value in reference.state_dict().items():
        assert torch.equal(fixed.state_dict()[key], value), key
    x = dm.X_test[:7]
    expected, got = reference.predict_step(x), fixed.predict_step(x)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(SGLDRegression, {"lr": 1e-4}), (SGHMCClassification, {"lr": 5e-3, "num_burn_in_steps": 3})],
    ids=["SGLDRegression", "SGHMCClassification"],
)
def test_fixed_sampler_round_trips_through_a_checkpoint(cls, kwargs, tmp_path):
    classification = cls is SGHMCClassification
    method, dm = fixed_sampler_fit(partial(cls, **kwargs), classification)
    path = tmp_path / "fixed.ckpt"
    method.trainer.save_checkpoint(path)
    net = MLP(2, [8], 2) if classification else MLP(1, [8], 2)
    loaded = cls.load_from_checkpoint(path, model=net, weights_only=True)
    assert type(loaded) is cls
    assert {k: loaded.hparams[k] for k in kwargs} == kwargs
    assert loaded.thinning == 2 and loaded.max_num_samples == 3 and loaded.num_collected == 3
    x = dm.X_test[:7]
    expected, got = method.predict_step(x), loaded.predict_step(x)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # and trains on with the same sampler
    assert type(loaded.configure_optimizers()) is type(method.trainer.optimizers[0])


def test_fixed_sampler_arguments():
    with pytest.raises(TypeError, match="fixes its sampler"):
        SGLDRegression(MLP(1, [8], 2), optimizer=partial(SGLD, lr=1e-3))
    with pytest.raises(ValueError, match="`lr`"):
        SGLDRegression(MLP(1, [8], 2), lr=-1.0)  # at construction, not at the first step
    with pytest.raises(ValueError, match="`mdecay`"):
        SGHMCRegression(MLP(1, [8], 2), mdecay=2.0)
    with pytest.raises(ValueError, match="`max_num_samples`"):
        PSGLDClassification(MLP(2, [8], 2), max_num_samples=0)
