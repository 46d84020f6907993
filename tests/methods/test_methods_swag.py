"""SWAG by numbers.

- the running moments equal plain averages of the parameters recorded at each epoch end, and the
  deviation matrix holds the last ``K`` deviations in order;
- sampled parameters have the SWAG mean and covariance ``scale * (diag + D^T D / (K - 1))``;
- partial stochasticity: only the chosen layer varies, the rest keep their trained values;
- buffers live in the state dict; predictions leave the parameters alone;
- calibrated on the toy data; both configs run through the CLI; clear errors.
"""

from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import fit_config, quiet_trainer
from lightning import Callback, seed_everything
from torch import nn

from uq_box.datamodules import ToyHeteroscedasticDatamodule
from uq_box.losses import NLL
from uq_box.methods.sampled import sampled_parameter_names
from uq_box.methods.swag import SWAG, SWAGClassification, SWAGRegression
from uq_box.models import MLP

REPO = Path(__file__).parents[2]
BUFFERS = ("swag_mean", "swag_sq_mean", "swag_deviations", "swag_num_snapshots")


def all_flat(module):
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def take_snapshots(method, num, step=0.3, seed=0):
    """``num`` snapshots of randomly moved parameters (no trainer); returns the flat vectors."""
    generator = torch.Generator().manual_seed(seed)
    thetas = []
    for _ in range(num):
        with torch.no_grad():
            for p in method.model.parameters():
                p.add_(step * torch.randn(p.shape, generator=generator))
        method.collect_snapshot()
        thetas.append(method.flat_parameters())
    return torch.stack(thetas)


# -- 1. the moments are plain averages of the epoch-end parameters -----------------------------
class RecordParameters(Callback):
    """The backbone's parameters at every training epoch end, recorded independently."""

    def __init__(self):
        self.epochs, self.thetas = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)
        self.thetas.append(all_flat(pl_module.model))


@pytest.fixture(scope="module")
def fitted_small():
    """A small SWAG fit: 9 epochs, snapshots from epoch 2 (7 snapshots), K = 4."""
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=100)
    method = SWAGRegression(
        MLP(1, [8], 2),
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        burnin_epochs=2,
        max_num_samples=4,
    )
    recorder = RecordParameters()
    quiet_trainer(max_epochs=9, callbacks=[recorder]).fit(method, dm)
    return method, dm, recorder


def test_moments_equal_averages_of_recorded_snapshots(fitted_small):
    method, _, recorder = fitted_small
    assert recorder.epochs == list(range(9))
    assert method.parameter_names == [name for name, _ in method.model.named_parameters()]
    thetas = torch.stack(recorder.thetas[2:]).to(method.swag_mean.device)  # epochs 2..8
    assert method.num_snapshots == 7 and int(method.swag_num_snapshots) == 7
    torch.testing.assert_close(method.swag_mean, thetas.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(method.swag_sq_mean, (thetas**2).mean(0), rtol=0, atol=1e-6)
    # deviation i: theta_i minus the mean of snapshots 0..i (the mean after the update)
    counts = torch.arange(1, 8).unsqueeze(-1)
    deviations = thetas - thetas.cumsum(0) / counts
    assert method.num_deviations == 4
    torch.testing.assert_close(method.swag_deviations, deviations[-4:], rtol=0, atol=1e-6)
    # the parameters moved between snapshots: the test is not vacuous
    assert (thetas[1:] - thetas[:-1]).abs().max() > 1e-3
    # the SWA mean by name
    swa = method.swa_parameters()
    torch.testing.assert_close(
        swa["model.0.weight"], thetas.mean(0)[:8].reshape(8, 1), rtol=0, atol=1e-6
    )


def test_deviations_fill_in_order_before_the_buffer_is_full():
    torch.manual_seed(0)
    method = SWAGRegression(MLP(1, [4], 2), max_num_samples=5)
    assert method.num_snapshots == 0
    thetas = take_snapshots(method, 3)
    means = thetas.cumsum(0) / torch.arange(1, 4).unsqueeze(-1)
    assert method.num_deviations == 3
    torch.testing.assert_close(method.swag_deviations[:3], thetas - means, rtol=0, atol=1e-6)
    assert (method.swag_deviations[3:] == 0).all()
    # one more than K: the oldest drops out
    thetas = torch.cat([thetas, take_snapshots(method, 3, seed=1)])
    means = thetas.cumsum(0) / torch.arange(1, 7).unsqueeze(-1)
    torch.testing.assert_close(method.swag_deviations, (thetas - means)[1:], rtol=0, atol=1e-6)


# -- 2. sampling statistics ------------------------------------------------------------------
def small_net():
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


@pytest.mark.parametrize(
    ("num_snapshots", "max_num_samples", "scale"),
    [(6, 4, 0.5), (2, 4, 0.5), (5, 1, 0.5), (6, 4, 1.0)],
    ids=["full_K4", "two_deviations", "diagonal_only_K1", "scale1"],
)
def test_sample_mean_and_covariance(num_snapshots, max_num_samples, scale):
    torch.manual_seed(0)
    method = SWAGRegression(
        small_net(), criterion=nn.MSELoss(), max_num_samples=max_num_samples, scale=scale
    )
    take_snapshots(method, num_snapshots)
    num_params = 13
    assert method.swag_mean.shape == (num_params,)
    assert method.swag_deviations.shape == (max_num_samples, num_params)
    k = min(num_snapshots, max_num_samples)
    diag = (method.swag_sq_mean - method.swag_mean**2).clamp(min=1e-30)
    cov = torch.diag(diag)
    if k >= 2:
        d = method.swag_deviations[:k]
        cov = cov + d.T @ d / (k - 1)
    cov = scale * cov.double()

    num = 20000
    samples = method.sample_parameters(num, generator=torch.Generator().manual_seed(1)).double()
    assert samples.shape == (num, num_params)
    mean = samples.mean(0)
    centered = samples - mean
    empirical = centered.T @ centered / (num - 1)
    var = torch.diagonal(cov)
    # 5 Monte Carlo standard errors, entry by entry
    mean_tol = 5 * (var / num).sqrt()
    cov_tol = 5 * ((var[:, None] * var[None, :] + cov**2) / num).sqrt()
    assert ((mean - method.swag_mean.double()).abs() <= mean_tol).all()
    assert ((empirical - cov).abs() <= cov_tol).all(), (empirical - cov).abs().max()
    if k >= 2:  # the low-rank part matters: a diagonal covariance is rejected
        assert ((empirical - torch.diag(var)).abs() > 3 * cov_tol).any()


def test_one_snapshot_gives_the_snapshot():
    method = SWAGRegression(small_net(), criterion=nn.MSELoss())
    (theta,) = take_snapshots(method, 1)
    samples = method.sample_parameters(5)
    torch.testing.assert_close(samples, theta.expand(5, -1), rtol=0, atol=1e-12)


# -- 3. partial stochasticity ----------------------------------------------------------------
@pytest.mark.parametrize("names", [[-1], ["model.6"]], ids=["index", "name"])
def test_only_the_chosen_layer_varies(names):
    torch.manual_seed(0)
    method = SWAGRegression(MLP(1, [8, 8], 2), stochastic_module_names=names, max_num_samples=3)
    assert method.parameter_names == ["model.6.weight", "model.6.bias"]
    assert method.swag_mean.shape == (8 * 2 + 2,)
    take_snapshots(method, 5)  # every parameter moves, only the last layer is recorded
    trained = {k: v.clone() for k, v in method.model.state_dict().items()}

    x = torch.linspace(-2.0, 2.0, 7).unsqueeze(-1)
    torch.manual_seed(3)
    outputs = method.sample_outputs(x, 11)
    torch.manual_seed(3)
    flat = method.sample_parameters(11)
    assert outputs.shape == (11, 7, 2)
    # by hand: the trained hidden layers once, then each sampled last layer
    with torch.no_grad():
        hidden = method.model.model[:6](x)
    sampled = method.unflatten(flat)
    weight, bias = sampled["model.6.weight"], sampled["model.6.bias"]
    assert weight.shape == (11, 2, 8) and bias.shape == (11, 2)
    expected = torch.einsum("nh,soh->sno", hidden, weight) + bias[:, None, :]
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-6)
    assert (weight.std(0) > 0).all()  # the last layer does vary
    for key, value in method.model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    preds = method.predict_step(x)
    assert (preds["epistemic_uct"] > 0).all()


def test_parameter_names_of_any_layer_type():
    net = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    assert sampled_parameter_names(net, [1]) == ["1.weight", "1.bias"]
    assert sampled_parameter_names(net, ["0", "2"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(sampled_parameter_names(net, None)) == 6
    # a container name takes every parameter below it
    outer = nn.Sequential(net, nn.Linear(1, 1))
    assert sampled_parameter_names(outer, ["0"]) == [f"0.{n}" for n, _ in net.named_parameters()]


# -- 4. state dict, checkpoints, no side effects -----------------------------------------------
def test_buffers_in_state_dict_and_reload_predicts_identically(fitted_small, tmp_path):
    method, dm, _ = fitted_small
    state = method.state_dict()
    assert set(BUFFERS) <= set(state)
    fresh = SWAGRegression(MLP(1, [8], 2), burnin_epochs=2, max_num_samples=4)
    assert fresh.num_snapshots == 0
    fresh.load_state_dict(state)
    assert fresh.num_snapshots == 7
    x = dm.X_test[:20]
    torch.manual_seed(5)
    expected = method.predict_step(x)
    torch.manual_seed(5)
    got = fresh.predict_step(x)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # a Lightning checkpoint round trip (the backbone is passed again, as for every method)
    trainer = quiet_trainer(max_epochs=1)
    trainer.strategy.connect(method)
    trainer.save_checkpoint(tmp_path / "swag.ckpt")
    loaded = SWAGRegression.load_from_checkpoint(tmp_path / "swag.ckpt", model=MLP(1, [8], 2))
    assert loaded.max_num_samples == 4 and loaded.burnin_epochs == 2
    torch.manual_seed(5)
    got = loaded.predict_step(x)
    torch.testing.assert_close(got["pred"], expected["pred"], rtol=0, atol=0)


def test_predict_step_changes_no_parameter_or_buffer(fitted_small):
    method, dm, _ = fitted_small
    method.train()
    flags = {name: m.training for name, m in method.named_modules()}
    before = {k: v.clone() for k, v in method.state_dict().items()}
    preds = method.predict_step({"input": dm.X_test[:9], "target": dm.Y_test[:9]})
    assert preds["samples"].shape == (30, 9, 1)
    for key, value in method.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert {name: m.training for name, m in method.named_modules()} == flags
    # samples differ from each other, and from the network as it is
    assert (preds["epistemic_uct"] > 0).all()
    torch.testing.assert_close(
        preds["pred_uct"] ** 2, preds["epistemic_uct"] ** 2 + preds["aleatoric_uct"] ** 2
    )


def test_swa_lr_holds_the_rate_in_collection_epochs():
    class RecordLR(Callback):
        def __init__(self):
            self.rates = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.rates.append((trainer.current_epoch, optimizer.param_groups[0]["lr"]))

    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=50, n_points=100)
    method = SWAGRegression(
        MLP(1, [8], 2),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        burnin_epochs=2,
        swa_lr=0.01,
    )
    recorder = RecordLR()
    quiet_trainer(max_epochs=4, callbacks=[recorder], limit_val_batches=0).fit(method, dm)
    # the rate of every optimizer step: the scheduler's before epoch 2, swa_lr from then on
    expected = {0: 0.05, 1: 0.025, 2: 0.01, 3: 0.01}
    assert len(recorder.rates) == 8  # 2 steps per epoch
    for epoch, lr in recorder.rates:
        assert lr == pytest.approx(expected[epoch]), recorder.rates
    assert method.num_snapshots == 2


# -- 5. quality on the toy data ------------------------------------------------------------------
def test_quality_on_toy_heteroscedastic():
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=500)
    method = SWAGRegression(
        MLP(1, [50, 50], 2),
        criterion=NLL(),
        optimizer=partial(torch.optim.Adam, lr=3e-3),
        burnin_epochs=100,
    )
    assert not method.in_burnin  # SWAG trains on the NLL from the start
    trainer = quiet_trainer(max_epochs=150)
    trainer.fit(method, dm)
    assert method.num_snapshots == 50
    metrics = trainer.test(method, dm, verbose=False)[0]
    assert metrics["test_miscalibration_area"] < 0.1, metrics
    assert metrics["test_rmse"] < 0.36, metrics
    preds = method.predict_step(dm.X_test)
    assert (preds["epistemic_uct"] > 0).all()
    assert preds["samples"].shape == (30, len(dm.X_test), 1)


# -- 6. the configs through the CLI -------------------------------------------------------------
@pytest.mark.parametrize(
    ("dataset", "method_cls", "keys"),
    [
        (
            "toy_heteroscedastic",
            SWAGRegression,
            {"test_nll", "test_rmse", "test_crps", "test_coverage_95", "test_miscalibration_area"},
        ),
        ("two_moons", SWAGClassification, {"test_accuracy", "test_nll", "test_brier", "test_ece"}),
    ],
)
def test_cli_config(dataset, method_cls, keys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, metrics = fit_config(
        f"{dataset}/swag.yaml",
        tmp_path,
        monkeypatch,
        "--trainer.max_epochs=3",
        "--model.init_args.burnin_epochs=1",
    )
    assert keys <= set(metrics), metrics
    assert type(model) is method_cls
    assert model.num_snapshots == 2 and model.num_mc_samples_test == 30
    assert model.max_num_samples == 20 and model.scale == 0.5
    x = torch.linspace(-1.0, 1.0, 14).reshape(7, 2) if dataset == "two_moons" else torch.ones(7, 1)
    preds = model.predict_step(x)
    samples = preds["logits"] if dataset == "two_moons" else preds["samples"]
    assert samples.shape[:2] == (30, 7)
    assert all(torch.isfinite(v).all() for v in preds.values())
    assert (preds["epistemic_uct"] > 0).all()


# -- 7. errors ----------------------------------------------------------------------------------
def test_predict_before_any_snapshot_is_a_clear_error():
    method = SWAGRegression(MLP(1, [8], 2), burnin_epochs=3)
    with pytest.raises(RuntimeError, match="burnin_epochs"):
        method.predict_step(torch.zeros(4, 1))
    with pytest.raises(RuntimeError, match="max_epochs"):
        method.sample_parameters(2)
    # training that never reaches the collection epochs: validation works, testing fails clearly
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=50, n_points=100)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(method, dm)
    assert method.num_snapshots == 0
    with pytest.raises(RuntimeError, match="no snapshot"):
        trainer.test(method, dm, verbose=False)


def test_argument_errors():
    with pytest.raises(ValueError, match="`max_num_samples`"):
        SWAGRegression(MLP(1, [8], 2), max_num_samples=0)
    with pytest.raises(ValueError, match="`num_mc_samples_test`"):
        SWAGRegression(MLP(1, [8], 2), num_mc_samples_test=0)
    with pytest.raises(ValueError, match="`burnin_epochs`"):
        SWAGRegression(MLP(1, [8], 2), burnin_epochs=-1)
    with pytest.raises(ValueError, match="`scale`"):
        SWAGRegression(MLP(1, [8], 2), scale=-0.5)
    with pytest.raises(ValueError, match="`swa_lr`"):
        SWAGRegression(MLP(1, [8], 2), swa_lr=0.0)
    with pytest.raises(ValueError, match="names no layer 'model.9'"):
        SWAGRegression(MLP(1, [8], 2), stochastic_module_names=["model.9"])
    with pytest.raises(ValueError, match="out of range"):
        SWAGRegression(MLP(1, [8], 2), stochastic_module_names=[5])
    with pytest.raises(TypeError, match="all ints"):
        SWAGRegression(MLP(1, [8], 2), stochastic_module_names=[0, "model.2"])
    with pytest.raises(ValueError, match="no parameters"):
        SWAGRegression(MLP(1, [8], 2), stochastic_module_names=["model.1"])
    with pytest.raises(ValueError, match="empty"):
        SWAGRegression(MLP(1, [8], 2), stochastic_module_names=[])
    method = SWAGRegression(MLP(1, [8], 2))
    with pytest.raises(ValueError, match="outputs per point"):
        method.loss(torch.zeros(4, 1), torch.zeros(4, 2))
    assert isinstance(method, SWAG)
