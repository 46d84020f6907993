"""Likelihood families in the methods: MDN and deep evidential regression, Student-t heads on
any method, the real predictive NLL (``nll``) beside the moment-matched one (``nll_gaussian``)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from lightning import Trainer, seed_everything
from torch import distributions as D  # noqa: N812

from uq_box.datamodules import ArrayDataModule, ToyBimodalDatamodule
from uq_box.losses import NLL, GaussianMixtureNLL, LogNormalNLL, StudentTNLL
from uq_box.methods import DeepEnsembleRegression, DERRegression, MDNRegression, MVERegression
from uq_box.models import MLP


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def _fit_test(method, dm, epochs: int) -> dict[str, float]:
    trainer = quiet_trainer(max_epochs=epochs)
    trainer.fit(method, dm)
    return trainer.test(method, dm, verbose=False)[0]


def test_mdn_beats_mve_on_two_crossing_branches():
    dm = ToyBimodalDatamodule(n_points=400, n_test=400, batch_size=64, seed=0)
    adam = partial(torch.optim.Adam, lr=1e-2)
    seed_everything(0)
    mve = _fit_test(MVERegression(MLP(1, [32], 2), optimizer=adam), dm, 30)
    seed_everything(0)
    mdn = _fit_test(MDNRegression(MLP(1, [32], 6), num_components=2, optimizer=adam), dm, 30)
    # one Gaussian: only the mean 0 and a wide spread; the mixture finds both branches
    assert mve["test_nll"] == pytest.approx(mve["test_nll_gaussian"], abs=1e-5)
    assert mdn["test_nll"] < mve["test_nll"] - 1.0, (mdn, mve)
    # the moment-matched Gaussian of the mixture is no better than the MVE's
    assert mdn["test_nll_gaussian"] > mdn["test_nll"] + 1.0


def test_mdn_predicts_the_mixture_moments_without_epistemic_part():
    seed_everything(0)
    method = MDNRegression(MLP(1, [8], 6), num_components=2)
    x = torch.linspace(-1, 1, 5).unsqueeze(-1)
    preds = method.predict_step(x)
    mean, std = method.criterion.mean_and_std(method.model(x))
    torch.testing.assert_close(preds["pred"], mean)
    torch.testing.assert_close(preds["aleatoric_uct"], std)
    assert (preds["epistemic_uct"] == 0).all()
    assert preds["outputs"].shape == (1, 5, 6)


def test_mdn_bad_arguments():
    with pytest.raises(ValueError, match=r"`num_components` must be a positive integer, got 0"):
        MDNRegression(MLP(1, [8], 6), num_components=0)
    with pytest.raises(ValueError, match=r"`criterion` has 3 components but `num_components`"):
        MDNRegression(MLP(1, [8], 6), num_components=2, criterion=GaussianMixtureNLL(3))
    with pytest.raises(ValueError, match=r"`criterion` of MDNRegression"):
        MDNRegression(MLP(1, [8], 6), criterion=NLL())


def test_a_network_width_that_does_not_fit_the_family_names_n_outputs():
    x = torch.randn(16, 1)
    dm = ArrayDataModule(x, x, x, x, x, x, batch_size=16)
    method = MDNRegression(MLP(1, [8], 4), num_components=2)
    with pytest.raises(ValueError, match=r"gives 4 outputs.*needs 6.*`n_outputs` to 6"):
        quiet_trainer(fast_dev_run=True).fit(method, dm)


def test_der_splits_aleatoric_and_epistemic_as_the_normal_inverse_gamma():
    seed_everything(0)
    method = DERRegression(MLP(1, [8], 4), coeff=0.1)
    x = torch.linspace(-1, 1, 5).unsqueeze(-1)
    preds = method.predict_step(x)
    gamma, nu, alpha, beta = method.criterion.parameters_of(method.model(x))
    torch.testing.assert_close(preds["pred"], gamma)
    torch.testing.assert_close(preds["aleatoric_uct"] ** 2, beta / (alpha - 1))
    torch.testing.assert_close(preds["epistemic_uct"] ** 2, beta / (nu * (alpha - 1)))
    torch.testing.assert_close(
        preds["pred_uct"] ** 2, preds["aleatoric_uct"] ** 2 + preds["epistemic_uct"] ** 2
    )
    assert method.hparams.coeff == 0.1 and method.criterion.coeff == 0.1


def test_der_fits_and_its_nll_is_the_student_t_density():
    seed_everything(0)
    x = torch.linspace(-2, 2, 128).unsqueeze(-1)
    y = torch.sin(x) + 0.1 * torch.randn_like(x)
    dm = ArrayDataModule(x, y, x, y, x, y, batch_size=32)
    method = DERRegression(MLP(1, [16], 4), optimizer=partial(torch.optim.Adam, lr=1e-2))
    metrics = _fit_test(method, dm, 20)
    preds = method.predict_step(x)
    gamma, nu, alpha, beta = method.criterion.parameters_of(preds["outputs"][0])
    student = D.StudentT(2 * alpha, gamma, torch.sqrt(beta * (1 + nu) / (nu * alpha)))
    assert metrics["test_nll"] == pytest.approx(-student.log_prob(y).mean().item(), abs=1e-4)
    assert metrics["test_rmse"] < 0.5


def test_student_t_heads_on_an_ensemble_score_the_mixture_density():
    seed_everything(0)
    x = torch.linspace(-2, 2, 64).unsqueeze(-1)
    y = torch.sin(x) + 0.1 * torch.randn_like(x)
    dm = ArrayDataModule(x, y, x, y, x, y, batch_size=32)
    method = DeepEnsembleRegression(MLP(1, [8], 2), num_members=3, criterion=StudentTNLL(df=5.0))
    metrics = _fit_test(method, dm, 2)
    outputs = method.predict_step(x)["outputs"]
    log_probs = method.criterion.log_prob(outputs, y)  # [3, N, 1]
    mixture = torch.logsumexp(log_probs, 0) - math.log(3)
    assert metrics["test_nll"] == pytest.approx(-mixture.mean().item(), abs=1e-4)
    assert metrics["test_nll"] != pytest.approx(metrics["test_nll_gaussian"], abs=1e-3)


def test_log_normal_mve_refuses_non_positive_targets():
    x = torch.randn(16, 1)
    dm = ArrayDataModule(x, x, x, x, x, x, batch_size=16)
    method = MVERegression(MLP(1, [8], 2), criterion=LogNormalNLL())
    with pytest.raises(ValueError, match=r"LogNormalNLL needs positive targets"):
        quiet_trainer(fast_dev_run=True).fit(method, dm)


def test_bimodal_data_lies_on_two_branches():
    dm = ToyBimodalDatamodule(n_points=200, n_test=50, noise_std=0.0, slope=2.0, seed=1)
    residual = torch.minimum(
        (dm.Y_train - 2 * dm.X_train).abs(), (dm.Y_train + 2 * dm.X_train).abs()
    )
    assert residual.max() < 1e-6
    upper = (dm.Y_train - 2 * dm.X_train).abs() < 1e-6
    assert 0.35 < upper.float().mean() < 0.65
    assert dm.X_train.shape == (160, 1) and dm.X_test.shape == (50, 1)
    with pytest.raises(ValueError, match="`noise_std`"):
        ToyBimodalDatamodule(noise_std=-1.0)
