"""Laplace approximations (laplace-torch, the `laplace` extra) by numbers.

- homoscedastic regression (sin(x) + 0.1 eps on two separated intervals): the tuned noise is the
  true one, the epistemic std grows in the gap and outside the data, the contract holds;
- marginal-likelihood tuning moves the prior precision and raises the log marginal likelihood;
- last-layer KFAC agrees with the full last-layer GGN on the data, and in its predictive mean
  with a full Hessian over all weights;
- two moons: accurate, mutual information larger far from the data;
- the configs run through the CLI; bad arguments fail early.
"""

import math
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import fit_config
from lightning import Trainer, seed_everything

from uq_box.datamodules import ArrayDataModule, TwoMoonsDatamodule
from uq_box.losses import NLL
from uq_box.methods.laplace import (
    HESSIAN_STRUCTURES,
    SUBSETS_OF_WEIGHTS,
    LaplaceClassification,
    LaplaceRegression,
    laplace_train_loader,
)
from uq_box.methods.predictive_classification import classification_predictive
from uq_box.models import MLP

pytestmark = pytest.mark.laplace

REPO = Path(__file__).parents[2]
NOISE = 0.1
OPTIMIZER = partial(torch.optim.Adam, lr=3e-3)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def quiet_trainer(**extra):
    extra.setdefault("accelerator", "cpu")
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


def two_interval_data(n=400, seed=0):
    """y = sin(x) + 0.1 eps, x uniform on [-4, -1] and [1, 4]."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 1, generator=generator) * 3
    x = torch.where(torch.arange(n).unsqueeze(-1) < n // 2, u - 4, u + 1)
    y = torch.sin(x) + NOISE * torch.randn(n, 1, generator=generator)
    return x, y


def check_regression_contract(preds, n, num_samples):
    for key in ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct"):
        assert preds[key].shape == (n, 1), (key, preds[key].shape)
        assert torch.isfinite(preds[key]).all(), key
    assert preds["samples"].shape == (num_samples, n, 1)
    torch.testing.assert_close(
        preds["pred_uct"] ** 2, preds["epistemic_uct"] ** 2 + preds["aleatoric_uct"] ** 2
    )
    # the samples carry exactly the closed-form GLM moments
    torch.testing.assert_close(preds["pred"], preds["samples"].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        preds["epistemic_uct"] ** 2, preds["samples"].var(0, unbiased=False), atol=1e-6, rtol=1e-4
    )
    assert (preds["aleatoric_uct"] > 0).all()


@pytest.fixture(scope="module")
def regression():
    """Last-layer KFAC Laplace on the two-interval data, trained and tuned by trainer.fit."""
    seed_everything(0)
    x, y = two_interval_data()
    dm = ArrayDataModule(x, y, batch_size=32)
    method = LaplaceRegression(MLP(1, [50, 50], 1), optimizer=OPTIMIZER)
    quiet_trainer(max_epochs=150).fit(method, dm)
    return method, dm


# -- 1. regression -------------------------------------------------------------------------------
def test_regression_recovers_noise_and_contract(regression):
    method, dm = regression
    la = method.la
    assert la is not None and type(la).__name__ == "KronLLLaplace"
    sigma = method.sigma_noise.item()
    assert sigma == pytest.approx(NOISE, rel=0.2)
    x = torch.linspace(-8.0, 8.0, 33).unsqueeze(-1)
    preds = method.predict_step(x)
    check_regression_contract(preds, 33, method.num_mc_samples_test)
    torch.testing.assert_close(preds["aleatoric_uct"], torch.full((33, 1), sigma))
    with torch.no_grad():  # the GLM predictive mean is the MAP network's output
        torch.testing.assert_close(preds["pred"], method.model(x))
    # the fit is good where the data are
    train = method.predict_step(dm.X_train)
    rmse = ((train["pred"] - dm.Y_train) ** 2).mean().sqrt().item()
    assert rmse < 1.2 * NOISE


def test_regression_epistemic_grows_off_the_data(regression):
    method, _ = regression
    on_data = torch.cat([torch.linspace(-3.8, -1.2, 20), torch.linspace(1.2, 3.8, 20)])
    gap = torch.linspace(-0.3, 0.3, 7)
    outside = torch.cat([torch.linspace(-9.0, -7.0, 5), torch.linspace(7.0, 9.0, 5)])
    std = {
        name: method.predict_step(x.unsqueeze(-1))["epistemic_uct"]
        for name, x in [("on", on_data), ("gap", gap), ("out", outside)]
    }
    assert std["gap"].mean() > 2 * std["on"].mean(), std
    assert std["out"].min() > 2 * std["on"].max(), std
    assert std["out"].mean() > std["gap"].mean()


def test_marglik_tuning_moves_prior_and_raises_evidence(regression):
    trained, dm = regression
    # post hoc, around the same trained network, without tuning first
    post = LaplaceRegression(trained.model, optimize_prior_precision=None)
    la = post.fit_laplace(dm)
    assert post.la is la
    torch.testing.assert_close(la.prior_precision, torch.tensor([1.0]))
    with torch.no_grad():
        rmse = ((trained.model(dm.X_train) - dm.Y_train) ** 2).mean().sqrt()
    torch.testing.assert_close(la.sigma_noise, rmse, rtol=1e-4, atol=1e-6)  # starts at the RMSE
    before = la.log_marginal_likelihood().item()
    post.tune_prior_precision()
    after = la.log_marginal_likelihood().item()
    prior = la.prior_precision.item()
    assert after > before + 1.0, (before, after)
    assert abs(math.log(prior)) > 0.5, prior  # moved well away from the initial 1
    # the same numbers as the tuning that ran when trainer.fit ended
    assert prior == pytest.approx(trained.la.prior_precision.item(), rel=1e-3)
    assert la.sigma_noise.item() == pytest.approx(trained.sigma_noise.item(), rel=1e-3)
    # and tuning is a local optimum: nudging either hyperparameter lowers the evidence
    for factor in (0.8, 1.25):
        nudged = la.log_marginal_likelihood(torch.tensor([prior * factor]), la.sigma_noise)
        assert nudged.item() < after
    la.prior_precision = torch.tensor([prior])


def test_sampled_weights_predictive(regression, moons):
    trained, dm = regression
    nn_pred = LaplaceRegression(trained.model, pred_type="nn", num_mc_samples_test=200)
    nn_pred.fit_laplace(dm)
    x = torch.linspace(-8.0, 8.0, 17).unsqueeze(-1)
    preds = nn_pred.predict_step(x)
    check_regression_contract(preds, 17, 200)
    glm = trained.predict_step(x)
    # for the last layer the network is linear in the sampled weights: GLM = NN predictive
    torch.testing.assert_close(preds["pred"], glm["pred"], atol=0.1, rtol=0.0)
    ratio = preds["epistemic_uct"] / glm["epistemic_uct"]
    assert ((ratio > 0.75) & (ratio < 1.33)).all(), ratio
    classifier, moons_dm, _ = moons
    sampled = LaplaceClassification(classifier.model, pred_type="nn", num_mc_samples_test=20)
    sampled.fit_laplace(moons_dm)
    out = sampled.predict_step(moons_dm.X_test)
    assert out["logits"].shape == (20, len(moons_dm.X_test), 2)
    assert (out["pred"].argmax(-1) == moons_dm.Y_test).float().mean() > 0.95


def test_last_layer_kfac_vs_full_hessians_on_tiny_net():
    seed_everything(1)
    x, y = two_interval_data(n=200, seed=1)
    dm = ArrayDataModule(x, y, batch_size=32)
    kron = LaplaceRegression(
        MLP(1, [10, 10], 1),
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        prior_precision=2.0,
        optimize_prior_precision=None,
    )
    quiet_trainer(max_epochs=40).fit(kron, dm)
    net = kron.model
    ll_full = LaplaceRegression(
        net, hessian_structure="full", prior_precision=2.0, optimize_prior_precision=None
    )
    ll_full.fit_laplace(dm)
    all_full = LaplaceRegression(
        net, subset_of_weights="all", hessian_structure="full", prior_precision=2.0
    )
    state = {k: v.clone() for k, v in net.state_dict().items()}
    all_full.fit_laplace(dm)
    assert type(all_full.la).__name__ == "FullLaplace"
    assert all_full.la.n_params == sum(p.numel() for p in net.parameters()) == 141

    xt = torch.linspace(-8.0, 8.0, 41).unsqueeze(-1)
    p_kron, p_ll_full, p_all = (m.predict_step(xt) for m in (kron, ll_full, all_full))
    # GLM predictive mean = the MAP network's output, whatever the Hessian
    torch.testing.assert_close(p_kron["pred"], p_all["pred"])
    torch.testing.assert_close(p_kron["pred"], p_ll_full["pred"])
    # KFAC drops the weight-bias cross terms of the last layer's GGN, else it is exact for one
    # output: on the data (where the bias direction matters little) the two agree closely
    xs = xt[:, 0]
    on_data = (xs.abs() > 1.2) & (xs.abs() < 3.8)
    ratio = p_kron["epistemic_uct"][on_data] / p_ll_full["epistemic_uct"][on_data]
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio
    torch.testing.assert_close(kron.sigma_noise, ll_full.sigma_noise)
    # all weights: positive variances that grow away from the data too
    check_regression_contract(p_all, 41, all_full.num_mc_samples_test)
    on = p_all["epistemic_uct"][on_data]
    far = p_all["epistemic_uct"][xs.abs() > 7]
    assert far.min() > on.max()
    # the network itself is untouched by the all-weights Laplace (it works on a copy)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert next(all_full.la.model.parameters()) is not next(net.parameters())


# -- 2. classification ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moons():
    seed_everything(0)
    dm = TwoMoonsDatamodule(n_points=1000, noise=0.1, batch_size=64)
    method = LaplaceClassification(MLP(2, [50, 50], 2), optimizer=OPTIMIZER)
    trainer = quiet_trainer(max_epochs=40)
    trainer.fit(method, dm)
    metrics = trainer.test(method, dm, verbose=False)[0]
    return method, dm, metrics


def test_moons_accurate_and_uncertain_far_away(moons):
    method, dm, metrics = moons
    assert type(method.la).__name__ == "KronLLLaplace"
    assert metrics["test_accuracy"] > 0.95, metrics
    assert method.la.prior_precision.item() != 1.0
    preds = method.predict_step(dm.X_test)
    n, s = len(dm.X_test), method.num_mc_samples_test
    assert preds["logits"].shape == (s, n, 2)
    # the default (Monte Carlo) predictive is the contract's decomposition of its logits
    for key, value in classification_predictive(preds["logits"]).items():
        torch.testing.assert_close(preds[key], value)
    torch.testing.assert_close(preds["pred"], preds["logits"].softmax(-1).mean(0))
    for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert preds[key].shape == (n,) and torch.isfinite(preds[key]).all(), key
    accuracy = (preds["pred"].argmax(-1) == dm.Y_test).float().mean().item()
    assert accuracy > 0.95

    angle = torch.linspace(0, 2 * math.pi, 64)
    far = 8.0 * torch.stack([angle.cos(), angle.sin()], -1) + torch.tensor([0.5, 0.25])
    mi_far = method.predict_step(far)["epistemic_uct"]
    mi_data = preds["epistemic_uct"]
    assert mi_far.mean() > 3 * mi_data.mean(), (mi_far.mean(), mi_data.mean())
    assert mi_far.mean() > 10 * mi_data.median()


def nll(probs, target):
    return -probs[torch.arange(len(target)), target].log().mean().item()


def test_moons_probit_link(moons):
    method, dm, _ = moons
    probit = LaplaceClassification(method.model, link_approx="probit", num_mc_samples_test=30)
    probit.fit_laplace(dm)
    assert probit.la.prior_precision.item() == pytest.approx(
        method.la.prior_precision.item(), rel=1e-4
    )
    x, y = dm.X_test, dm.Y_test
    preds = probit.predict_step({"input": x})
    assert preds["logits"].shape == (30, len(x), 2)
    torch.testing.assert_close(preds["pred"], probit.la(x, pred_type="glm", link_approx="probit"))
    torch.testing.assert_close(preds["pred"].sum(-1), torch.ones(len(x)))
    torch.testing.assert_close(preds["pred_uct"], torch.special.entr(preds["pred"]).sum(-1))
    expected = classification_predictive(preds["logits"])
    torch.testing.assert_close(preds["aleatoric_uct"], expected["aleatoric_uct"])
    torch.testing.assert_close(
        preds["epistemic_uct"], (preds["pred_uct"] - preds["aleatoric_uct"]).clamp_min(0)
    )
    # why Monte Carlo is the default: probit ignores the logits' correlation, underconfident
    mc = method.predict_step(x)["pred"]
    assert (preds["pred"].argmax(-1) == mc.argmax(-1)).float().mean() > 0.99
    assert nll(mc, y) < 0.5 * nll(preds["pred"], y), (nll(mc, y), nll(preds["pred"], y))


# -- 3. devices ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_predicts_across_devices(device):
    seed_everything(0)
    x, y = two_interval_data(n=100)
    dm = ArrayDataModule(x, y, batch_size=50)
    method = LaplaceRegression(MLP(1, [16], 1), optimizer=OPTIMIZER)
    quiet_trainer(max_epochs=2, accelerator=device, devices=1).fit(method, dm)
    assert next(method.la.model.parameters()).device.type == device  # fitted on the device
    xt = torch.linspace(-5.0, 5.0, 9).unsqueeze(-1)
    cpu_preds = method.predict_step(xt)  # the module is back on the CPU after fit
    assert cpu_preds["pred"].device.type == "cpu"
    check_regression_contract(cpu_preds, 9, method.num_mc_samples_test)
    method.to(device)
    dev_preds = method.predict_step(xt.to(device))
    assert dev_preds["pred"].device.type == device
    for key in ("pred", "epistemic_uct", "aleatoric_uct"):
        torch.testing.assert_close(dev_preds[key].cpu(), cpu_preds[key], rtol=1e-4, atol=1e-5)


# -- 4. configs through the CLI -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("dataset", "method_cls", "keys"),
    [
        ("toy_heteroscedastic", LaplaceRegression, {"test_nll", "test_rmse", "test_crps"}),
        ("two_moons", LaplaceClassification, {"test_accuracy", "test_nll", "test_ece"}),
    ],
)
def test_cli_config_fits_laplace(dataset, method_cls, keys, tmp_path, monkeypatch):
    model, metrics = fit_config(
        f"{dataset}/laplace.yaml",
        tmp_path,
        monkeypatch,
        "--trainer.max_epochs=3",
        "--trainer.accelerator=cpu",
    )
    assert keys <= set(metrics), metrics
    assert type(model) is method_cls
    assert model.la is not None
    assert (model.subset_of_weights, model.hessian_structure) == ("last_layer", "kron")


# -- 5. errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argument", "valid"),
    [("subset_of_weights", SUBSETS_OF_WEIGHTS), ("hessian_structure", HESSIAN_STRUCTURES)],
)
@pytest.mark.parametrize("method_cls", [LaplaceRegression, LaplaceClassification])
def test_unknown_subset_or_structure(method_cls, argument, valid):
    with pytest.raises(ValueError, match=f"`{argument}`") as info:
        method_cls(MLP(1, [8], 1), **{argument: "everything"})
    message = str(info.value)
    assert "'everything'" in message
    assert all(f"'{v}'" in message for v in valid), message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prior_precision": 0.0}, "`prior_precision`"),
        ({"optimize_prior_precision": "gridsearch"}, "`optimize_prior_precision`"),
        ({"pred_type": "gp"}, "`pred_type`"),
        ({"link_approx": "softmax"}, "`link_approx`"),
        ({"num_mc_samples_test": 1}, "`num_mc_samples_test`"),
        ({"criterion": NLL()}, "mean-only"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LaplaceRegression(MLP(1, [8], 1), **kwargs)


def test_nn_predictive_needs_mc_link():
    with pytest.raises(ValueError, match="`link_approx` must be 'mc'"):
        LaplaceClassification(MLP(2, [8], 2), pred_type="nn", link_approx="probit")
    LaplaceRegression(MLP(1, [8], 1), pred_type="nn")  # regression has no link


def test_two_output_regression_network_fails_early():
    x, y = two_interval_data(n=64)
    dm = ArrayDataModule(x, y, batch_size=32)
    method = LaplaceRegression(MLP(1, [8], 2))
    with pytest.raises(ValueError, match="`n_outputs` to 1"):
        quiet_trainer(max_epochs=1).fit(method, dm)
    with pytest.raises(ValueError, match="mean-only network"):
        method.fit_laplace(dm)  # post hoc too
    assert method.la is None


def test_unfitted_predicts_map_with_warning_and_refuses_tuning():
    method = LaplaceRegression(MLP(1, [8], 1))
    x = torch.linspace(-1.0, 1.0, 5).unsqueeze(-1)
    with pytest.warns(UserWarning, match="no Laplace approximation"):
        preds = method.predict_step(x)
    assert (preds["epistemic_uct"] == 0).all()
    with pytest.raises(RuntimeError, match="fit_laplace"):
        method.tune_prior_precision()


@pytest.mark.parametrize(
    ("method_cls", "subset", "structure"),
    [
        (LaplaceRegression, "last_layer", "kron"),
        (LaplaceRegression, "all", "diag"),
        (LaplaceClassification, "last_layer", "kron"),
        (LaplaceClassification, "all", "full"),
    ],
)
def test_checkpoint_carries_the_laplace_approximation(method_cls, subset, structure, tmp_path):
    seed_everything(0)
    if method_cls is LaplaceRegression:
        x, y = two_interval_data(n=64)
        dm = ArrayDataModule(x, y, batch_size=32)
        net = partial(MLP, 1, [8], 1)
        x_new = torch.linspace(-6.0, 6.0, 13).unsqueeze(-1)
    else:
        dm = TwoMoonsDatamodule(n_points=128, noise=0.1, batch_size=32)
        net = partial(MLP, 2, [8], 2)
        x_new = torch.randn(13, 2, generator=torch.Generator().manual_seed(1))
    method = method_cls(
        net(), optimizer=OPTIMIZER, subset_of_weights=subset, hessian_structure=structure
    )
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(method, dm)
    path = tmp_path / "laplace.ckpt"
    trainer.save_checkpoint(path)
    loaded = method_cls.load_from_checkpoint(path, model=net(), weights_only=True)
    assert type(loaded.la).__name__ == type(method.la).__name__
    torch.testing.assert_close(loaded.la.prior_precision, method.la.prior_precision)
    torch.testing.assert_close(loaded.la.sigma_noise, method.la.sigma_noise)
    torch.manual_seed(2)
    expected = method.predict_step(x_new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the MAP network
        torch.manual_seed(2)
        got = loaded.predict_step(x_new)
    keys = ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct")
    if method_cls is LaplaceClassification:
        keys += ("logits",)
    for key in keys:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert (got["epistemic_uct"] > 0).any()
    # a checkpoint saved before the Laplace fit still loads, without an approximation
    loaded.on_load_checkpoint({"state_dict": loaded.state_dict()})
    assert loaded.la is None


def test_train_loader_from_batches_pairs_and_datamodules():
    x, y = two_interval_data(n=70)
    dm = ArrayDataModule(x, y, batch_size=32)
    for data in (dm, (x, y), dm.train_dataloader(), list(dm.train_dataloader())):
        loader = laplace_train_loader(data, batch_size=32)
        assert len(loader.dataset) == 70
        xs, ys = zip(*loader, strict=True)
        assert [len(b) for b in xs] == [32, 32, 6]
        got = torch.cat(xs), torch.cat(ys)
        order = got[0][:, 0].argsort()
        torch.testing.assert_close(got[0][order], x[x[:, 0].argsort()])
        torch.testing.assert_close(got[1][order], y[x[:, 0].argsort()])
    with pytest.raises(ValueError, match="rows"):
        laplace_train_loader((x, y[:-1]))
    with pytest.raises(TypeError, match="Laplace training data"):
        laplace_train_loader(3)


def test_fit_without_datamodule_uses_train_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    seed_everything(0)
    x, y = two_interval_data(n=96)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    method = LaplaceRegression(MLP(1, [16], 1), optimizer=OPTIMIZER)
    quiet_trainer(max_epochs=2).fit(method, train_dataloaders=loader)
    assert method.la is not None and method.la.n_data == 96
    check_regression_contract(method.predict_step(x[:5]), 5, method.num_mc_samples_test)
