"""The regression method family (deterministic, MVE, MC dropout, deep ensemble, BNN VI) by numbers.

- every toy config runs through the CLI and every method keeps the prediction contract;
- with the seed program's settings every UQ method is calibrated and beats the MSE baseline's NLL;
- known bugs of lightning-uq-box stay fixed: MC dropout keeps BatchNorm in eval mode while its
  masks stay active; an ensemble's predictive is the mixture of its members' Gaussians;
- the vectorized ensemble trains exactly like independent fits.
"""

import copy
import json
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from helpers import quiet_trainer
from lightning import seed_everything
from torch import nn

import uq_box.cli as cli
from uq_box.datamodules import ToyHeteroscedasticDatamodule
from uq_box.losses import NLL
from uq_box.methods import (
    BNNVIRegression,
    DeepEnsembleRegression,
    DeterministicRegression,
    MCDropoutRegression,
    MVERegression,
)
from uq_box.models import MLP
from uq_box.nn import MCDropout, StackedEnsemble

REPO = Path(__file__).parents[2]
CONFIGS = REPO / "configs" / "toy_heteroscedastic"
PRED_KEYS = ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct")
METRIC_KEYS = {
    "test_nll",
    "test_nll_gaussian",
    "test_rmse",
    "test_crps",
    "test_coverage_95",
    "test_miscalibration_area",
}
# config name -> (method class, Monte Carlo samples (members) at prediction)
CLI_METHODS = {
    "deterministic": (DeterministicRegression, 1),
    "mve": (MVERegression, 1),
    "mc_dropout": (MCDropoutRegression, 50),
    "deep_ensemble": (DeepEnsembleRegression, 5),
    "bnn_vi": (BNNVIRegression, 25),
}
EPOCHS = 150


def check_contract(preds, n, num_samples):
    """Shapes, finiteness and the law of total variance of a regression prediction."""
    assert set(PRED_KEYS) <= set(preds), sorted(preds)
    for key in PRED_KEYS:
        assert preds[key].shape == (n, 1), (key, preds[key].shape)
        assert torch.isfinite(preds[key]).all(), key
    assert preds["samples"].shape == (num_samples, n, 1)
    torch.testing.assert_close(
        preds["pred_uct"] ** 2, preds["epistemic_uct"] ** 2 + preds["aleatoric_uct"] ** 2
    )
    torch.testing.assert_close(preds["pred"], preds["samples"].mean(0))
    torch.testing.assert_close(preds["epistemic_uct"] ** 2, preds["samples"].var(0, unbiased=False))
    assert (preds["aleatoric_uct"] > 0).all()


# -- 1. every config through the CLI --------------------------------------------------------------
@pytest.mark.parametrize("name", list(CLI_METHODS))
def test_cli_config_fits_and_predicts(name, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["uq-box"])
    fitted = {}
    original = cli.UQBoxCLI.after_fit

    def after_fit(self):
        original(self)
        fitted["model"] = self.model

    monkeypatch.setattr(cli.UQBoxCLI, "after_fit", after_fit)
    cli.main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{name}.yaml"),
            "--trainer.max_epochs=2",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_model_summary=false",
        ]
    )
    (path,) = tmp_path.glob("*/version_*/test_metrics.json")
    metrics = json.loads(path.read_text())
    assert set(metrics) == METRIC_KEYS
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert 0.0 <= metrics["test_coverage_95"] <= 1.0
    assert 0.0 <= metrics["test_miscalibration_area"] <= 0.5
    assert metrics["test_nll"] < 3.0  # two epochs of burn-in already beat a blind guess

    method_cls, num_samples = CLI_METHODS[name]
    model = fitted["model"]
    assert type(model) is method_cls
    assert model.num_mc_samples_test == num_samples
    x = torch.linspace(-3.0, 3.0, 7).unsqueeze(-1)
    preds = model.predict_step(x)
    check_contract(preds, 7, num_samples)
    if name in ("deterministic", "mve"):
        assert (preds["epistemic_uct"] == 0).all()
    else:
        assert (preds["epistemic_uct"] > 0).all()
    if name == "deterministic":
        # homoscedastic noise: the last training epoch's RMSE, not the initial 1
        assert model.noise_std != 1.0
        torch.testing.assert_close(preds["aleatoric_uct"], model.noise_std.expand(7, 1))


# -- 2. quality with the seed program's settings ------------------------------------------------
OPTIMIZER = partial(torch.optim.Adam, lr=3e-3)
QUALITY_METHODS = {
    "deterministic": lambda: DeterministicRegression(MLP(1, [50, 50], 1), optimizer=OPTIMIZER),
    "mve": lambda: MVERegression(MLP(1, [50, 50], 2), optimizer=OPTIMIZER, burnin_epochs=20),
    "mc_dropout": lambda: MCDropoutRegression(
        MLP(1, [50, 50], 2, dropout_p=0.1), optimizer=OPTIMIZER, burnin_epochs=20
    ),
    "deep_ensemble": lambda: DeepEnsembleRegression(
        MLP(1, [50, 50], 2), optimizer=OPTIMIZER, num_members=5, burnin_epochs=20
    ),
    "bnn_vi": lambda: BNNVIRegression(
        MLP(1, [50, 50], 2),
        optimizer=OPTIMIZER,
        stochastic_module_names=[-1],
        num_mc_samples_train=10,
        burnin_epochs=20,
    ),
}


@pytest.fixture(scope="module")
def quality():
    """``quality(name)`` -> (fitted method, data module, test metrics); each fit runs once."""
    cache = {}

    def get(name):
        if name not in cache:
            seed_everything(0)
            dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=500)
            model = QUALITY_METHODS[name]()
            trainer = quiet_trainer(max_epochs=EPOCHS)
            trainer.fit(model, dm)
            cache[name] = (model, dm, trainer.test(model, dm, verbose=False)[0])
        return cache[name]

    return get


def test_deterministic_baseline_is_homoscedastic(quality):
    model, dm, metrics = quality("deterministic")
    with torch.no_grad():
        train_rmse = ((model.model(dm.X_train) - dm.Y_train) ** 2).mean().sqrt()
    # noise_std is the last epoch's running RMSE, close to that of the final weights
    assert model.noise_std.item() == pytest.approx(train_rmse.item(), rel=0.1)
    assert 0.2 < model.noise_std.item() < 0.45  # true noise std spans 0.05 .. 0.45
    preds = model.predict_step(dm.X_test)
    assert torch.equal(preds["aleatoric_uct"], model.noise_std.expand_as(preds["pred"]))
    by_hand = torch.distributions.Normal(preds["pred"], preds["pred_uct"]).log_prob(dm.Y_test)
    assert metrics["test_nll"] == pytest.approx(-by_hand.mean().item(), abs=1e-3)


@pytest.mark.parametrize("name", ["mve", "mc_dropout", "deep_ensemble", "bnn_vi"])
def test_quality_calibrated_and_beats_mse_baseline(quality, name):
    _, _, baseline = quality("deterministic")
    _, _, metrics = quality(name)
    assert metrics["test_miscalibration_area"] < 0.1, metrics
    assert metrics["test_nll"] < baseline["test_nll"], (metrics, baseline)
    assert metrics["test_rmse"] < 0.36, metrics  # noise floor ~0.3; no worse a mean than MSE


# -- 3a. MC dropout: dropout active, BatchNorm in eval mode --------------------------------------
def bn_dropout_net(p=0.3):
    return nn.Sequential(
        nn.Linear(1, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 2),
    )


@pytest.fixture(scope="module")
def bn_mc_dropout():
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(batch_size=32, n_points=200)
    model = MCDropoutRegression(
        bn_dropout_net(), optimizer=partial(torch.optim.Adam, lr=1e-2), num_mc_samples_test=8
    )
    quiet_trainer(max_epochs=3, limit_val_batches=0).fit(model, dm)
    return model


def _eval_bn(bn, x):
    return F.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mc_dropout_predicts_with_eval_batchnorm_and_active_dropout(bn_mc_dropout, mode):
    model = bn_mc_dropout
    net = model.model
    lin1, bn1, _, drop, lin2, bn2, _, lin3 = net
    assert isinstance(drop, MCDropout) and drop.p == 0.3
    assert bn1.num_batches_tracked > 0 and bn1.running_mean.abs().sum() > 0  # it was trained
    model.train() if mode == "train" else model.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in net.state_dict().items()}

    captured = {}
    hooks = [
        lin1.register_forward_hook(lambda m, i, o: captured.setdefault("lin1", []).append(o)),
        bn1.register_forward_hook(lambda m, i, o: captured.setdefault("bn1", []).append(o)),
        drop.register_forward_hook(lambda m, i, o: captured.setdefault("drop", []).append(o)),
    ]
    x = torch.linspace(-3.0, 3.0, 7).unsqueeze(-1)
    try:
        preds = model.predict_step(x)
    finally:
        for hook in hooks:
            hook.remove()

    # BatchNorm statistics untouched, every module's mode restored
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert {name: m.training for name, m in model.named_modules()} == flags

    # dropout active: the S = 8 samples differ, epistemic > 0
    check_contract(preds, 7, 8)
    samples = preds["samples"][:, :, 0]
    assert (samples.std(0) > 0).all()
    assert (preds["epistemic_uct"] > 0).all()

    # prefix before the dropout: run once on the N points, BatchNorm on its running statistics
    assert len(captured["lin1"]) == 1 and captured["lin1"][0].shape == (7, 16)
    with torch.no_grad():
        pre = F.relu(_eval_bn(bn1, lin1(x)))
        torch.testing.assert_close(captured["bn1"][0], _eval_bn(bn1, lin1(x)))
        (dropped,) = captured["drop"]
        assert dropped.shape == (8 * 7, 16)
        # each entry is dropped or scaled by 1 / (1 - p)
        folded = dropped.reshape(8, 7, 16)
        scaled = pre.expand(8, 7, 16) / (1 - drop.p)
        kept = folded != 0
        torch.testing.assert_close(folded[kept], scaled[kept])
        assert (~kept & (scaled != 0)).any()  # some active units were dropped
        # the rest of the network, by hand with the running statistics of the second BatchNorm
        out = lin3(F.relu(_eval_bn(bn2, lin2(dropped)))).reshape(8, 7, 2)
    mean, std = NLL().mean_and_std(out)
    torch.testing.assert_close(preds["samples"], mean)
    torch.testing.assert_close(preds["aleatoric_uct"] ** 2, (std**2).mean(0))


# -- 3b. ensemble predictive = Gaussian mixture of the members ----------------------------------
def test_one_member_ensemble_equals_mve(quality):
    mve, dm, _ = quality("mve")
    ensemble = DeepEnsembleRegression([mve.model], num_members=None)
    assert ensemble.num_members == 1
    x = dm.X_test[:50]
    expected, got = mve.predict_step(x), ensemble.predict_step(x)
    torch.testing.assert_close(got["pred"], expected["pred"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["pred_uct"], expected["pred_uct"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["aleatoric_uct"], expected["aleatoric_uct"])
    assert (got["epistemic_uct"] == 0).all()


def test_two_member_ensemble_is_mixture_of_variances(quality):
    mve, dm, _ = quality("mve")
    other = copy.deepcopy(mve.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    members = [mve.model, other]
    ensemble = DeepEnsembleRegression(members, num_members=None)
    x = dm.X_test[:200]
    got = ensemble.predict_step(x)
    each = [MVERegression(copy.deepcopy(m)).predict_step(x) for m in members]
    (m1, m2), (s1, s2) = [e["pred"] for e in each], [e["pred_uct"] for e in each]
    assert ((m1 - m2).abs() > 1e-3).float().mean() > 0.9  # the members really differ
    assert ((s1 - s2).abs() > 1e-3).float().mean() > 0.5
    mixture_var = (s1**2 + s2**2) / 2 + ((m1 - m2) / 2) ** 2
    torch.testing.assert_close(got["pred"], (m1 + m2) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["pred_uct"] ** 2, mixture_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["aleatoric_uct"] ** 2, (s1**2 + s2**2) / 2)
    torch.testing.assert_close(got["epistemic_uct"], (m1 - m2).abs() / 2, rtol=1e-5, atol=1e-6)
    # and it is not the average of the standard deviations
    std_average = ((s1 + s2) / 2) ** 2 + ((m1 - m2) / 2) ** 2
    assert (mixture_var - std_average).max() > 1e-3


def test_ensemble_predict_step_is_deterministic_with_dropout_members():
    """Dropout inside members must be off at prediction (eval mode reaches the members)."""
    torch.manual_seed(0)
    members = [MLP(1, [16], 2, dropout_p=0.5) for _ in range(2)]
    ensemble = DeepEnsembleRegression(members, num_members=None)
    x = torch.linspace(-3.0, 3.0, 7).unsqueeze(-1)
    first, second = ensemble.predict_step(x), ensemble.predict_step(x)
    torch.testing.assert_close(first["pred"], second["pred"])
    expected = torch.stack([m.eval()(x) for m in members])
    mean, _ = NLL().mean_and_std(expected)
    torch.testing.assert_close(first["samples"], mean)


# -- 4. vectorized ensemble == independent fits --------------------------------------------------
@pytest.mark.parametrize("burnin", [False, True], ids=["nll", "burnin_mse"])
def test_stacked_training_equals_independent_fits(burnin):
    torch.manual_seed(0)
    method = DeepEnsembleRegression(
        MLP(1, [16, 16], 2), num_members=3, burnin_epochs=1 if burnin else 0
    )
    method.train()
    assert method.in_burnin == burnin
    ensemble = method.model
    copies = [ensemble.member(i) for i in range(3)]
    initial = [c.model[0].weight.detach().clone() for c in copies]
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(20):
        x = 8 * torch.rand(16, 1, generator=generator) - 4
        batches.append((x, torch.sin(x) + 0.2 * torch.randn(16, 1, generator=generator)))

    # the summed loss is the sum of the member losses
    x, y = batches[0]
    with torch.no_grad():
        member_losses = []
        for c in copies:
            out = c(x)
            if burnin:
                member_losses.append(((out[:, :1] - y) ** 2).mean())
            else:
                member_losses.append(NLL()(out, y))
        total = method.loss(x, y)[0]["loss"]
    torch.testing.assert_close(total, torch.stack(member_losses).sum())

    optimizer = torch.optim.Adam(method.parameters(), lr=1e-2)
    for x, y in batches:
        optimizer.zero_grad()
        method.loss(x, y)[0]["loss"].backward()
        optimizer.step()
    for c in copies:
        opt = torch.optim.Adam(c.parameters(), lr=1e-2)
        for x, y in batches:
            opt.zero_grad()
            out = c(x)
            loss = ((out[:, :1] - y) ** 2).mean() if burnin else NLL()(out, y)
            loss.backward()
            opt.step()
    for i, c in enumerate(copies):
        trained = ensemble.member(i).state_dict()
        for key, value in c.state_dict().items():
            torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-5, msg=key)
        # and training did move the weights
        assert (trained["model.0.weight"] - initial[i]).abs().max() > 1e-2


def test_members_start_different_and_member_is_standalone():
    torch.manual_seed(0)
    network = MLP(1, [16], 2)
    method = DeepEnsembleRegression(network, num_members=3)
    ensemble = method.model
    assert isinstance(ensemble, StackedEnsemble) and ensemble.num_members == 3
    weights = [ensemble.member(i).model[0].weight for i in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(weights[i], weights[j])
    x = torch.randn(9, 1)
    outputs = ensemble(x)
    assert outputs.shape == (3, 9, 2)
    for i in range(3):
        member = ensemble.member(i)
        assert type(member) is MLP
        torch.testing.assert_close(member(x), outputs[i])
        assert all(not p.is_meta for p in member.parameters())
    # standalone: changing the copy leaves the ensemble alone
    member = ensemble.member(0)
    with torch.no_grad():
        member.model[0].weight.add_(1.0)
    torch.testing.assert_close(ensemble(x), outputs)
    # members given as a list are kept as they are
    given = [MLP(1, [16], 2) for _ in range(2)]
    stacked = DeepEnsembleRegression(given, num_members=None).model
    for i, g in enumerate(given):
        torch.testing.assert_close(stacked.member(i).model[0].weight, g.model[0].weight)
        torch.testing.assert_close(stacked(x)[i], g(x))


def test_ensemble_argument_errors():
    with pytest.raises(ValueError, match="`members`"):
        DeepEnsembleRegression([MLP(1, [16], 2), MLP(1, [8], 2)], num_members=None)
    with pytest.raises(ValueError, match="`members`"):
        DeepEnsembleRegression([MLP(1, [16], 2), MLP(1, [16, 16], 2)], num_members=None)
    with pytest.raises(ValueError, match="`num_members`"):
        DeepEnsembleRegression(MLP(1, [16], 2), num_members=0)
    assert DeepEnsembleRegression(MLP(1, [16], 2), num_members=None).num_members == 5
    assert DeepEnsembleRegression([MLP(1, [16], 2), MLP(1, [16], 2)]).num_members == 2
    with pytest.raises(ValueError, match="num_members"):
        DeepEnsembleRegression([MLP(1, [16], 2), MLP(1, [16], 2)], num_members=3)
    with pytest.raises(ValueError, match="`members`"):
        DeepEnsembleRegression([], num_members=None)
