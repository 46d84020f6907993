"""A full covariance over several targets: ``MultivariateNLL``, a Cholesky head.

The criterion's density is the multivariate Gaussian's (checked against torch.distributions), its
marginal stds are the roots of the covariance's diagonal, the mixture over samples has the
covariance of the law of total variance, and an MVE network fitted on two targets with
correlated noise recovers the correlation and beats the diagonal head on test data.
"""

from functools import partial

import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything

from uq_box.datamodules import ToyCorrelatedDatamodule
from uq_box.losses import NLL, MultivariateNLL
from uq_box.methods import DeepEnsembleRegression, MVERegression
from uq_box.methods.predictive import mixture_covariance, predictive_draws, regression_predictive
from uq_box.metrics import MixtureNLL
from uq_box.metrics.functional_samples import energy_score
from uq_box.models import MLP


def raw_entry(value: float) -> float:
    """The raw output whose ``softplus(raw) + 1e-6`` is ``value``."""
    return float(torch.tensor(value - 1e-6, dtype=torch.float64).expm1().log())


def test_log_prob_is_the_multivariate_normal_and_stds_are_marginal():
    generator = torch.Generator().manual_seed(0)
    criterion = MultivariateNLL()
    for num_targets in (1, 2, 3):
        width = num_targets * (num_targets + 3) // 2
        assert criterion.output_width(num_targets) == width
        outputs = torch.randn(3, 7, width, generator=generator, dtype=torch.float64)
        target = torch.randn(7, num_targets, generator=generator, dtype=torch.float64)
        mean, scale_tril = criterion.parameters_of(outputs)
        reference = torch.distributions.MultivariateNormal(mean, scale_tril=scale_tril)
        log_prob = criterion.log_prob(outputs, target)
        assert log_prob.shape == (3, 7)  # joint: one value per point
        torch.testing.assert_close(log_prob, reference.log_prob(target))
        covariance = criterion.covariance(outputs)
        torch.testing.assert_close(covariance, reference.covariance_matrix)
        mean_out, std = criterion.mean_and_std(outputs)
        torch.testing.assert_close(mean_out, outputs[..., :num_targets])
        torch.testing.assert_close(std, covariance.diagonal(dim1=-2, dim2=-1).sqrt())
        torch.testing.assert_close(criterion(outputs, target), -log_prob.mean())
    # one target: NLL()'s layout (mean, scale) and density
    outputs, target = torch.randn(5, 2), torch.randn(5, 1)
    torch.testing.assert_close(
        criterion.log_prob(outputs, target), NLL().log_prob(outputs, target).squeeze(-1)
    )


def test_layout_of_two_targets():
    """``(mu_0, mu_1, L_00, L_10, L_11)``: softplus on the diagonal, raw below it."""
    outputs = torch.tensor([[1.0, -2.0, raw_entry(0.5), 0.3, raw_entry(2.0)]], dtype=torch.float64)
    mean, scale_tril = MultivariateNLL().parameters_of(outputs)
    torch.testing.assert_close(mean, torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    expected = torch.tensor([[[0.5, 0.0], [0.3, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(scale_tril, expected)
    covariance = MultivariateNLL().covariance(outputs)[0]
    torch.testing.assert_close(covariance, torch.tensor([[0.25, 0.15], [0.15, 4.09]]).double())


def test_mixture_covariance_is_the_law_of_total_variance():
    """Two samples, ``Sigma_1 = diag(1, 4)``, ``Sigma_2 = [[1, 0.5], [0.5, 1]]``, means
    ``(0, 0)`` and ``(2, 2)``: ``(Sigma_1 + Sigma_2) / 2 + [[1, 1], [1, 1]]``."""
    first = [0.0, 0.0, raw_entry(1.0), 0.0, raw_entry(2.0)]
    l10, l11 = 0.5, (1.0 - 0.25) ** 0.5
    second = [2.0, 2.0, raw_entry(1.0), l10, raw_entry(l11)]
    outputs = torch.tensor([[first], [second]], dtype=torch.float64)  # [S=2, N=1, 5]
    criterion = MultivariateNLL()
    expected = torch.tensor([[[2.0, 1.25], [1.25, 3.5]]], dtype=torch.float64)
    torch.testing.assert_close(mixture_covariance(outputs, criterion), expected)
    preds = regression_predictive(outputs, criterion)
    torch.testing.assert_close(preds["covariance"], expected)
    torch.testing.assert_close(preds["pred"], torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    # the contract's stds are the marginal ones: the covariance's diagonal, split as before
    torch.testing.assert_close(preds["pred_uct"] ** 2, torch.tensor([[2.0, 3.5]]).double())
    torch.testing.assert_close(preds["epistemic_uct"] ** 2, torch.ones(1, 2).double())
    torch.testing.assert_close(preds["aleatoric_uct"] ** 2, torch.tensor([[1.0, 2.5]]).double())
    # draws of the mixture have its moments (stratified: 2000 draws of each sample)
    draws = predictive_draws(outputs, criterion, 4000, torch.Generator().manual_seed(0))
    assert draws.shape == (4000, 1, 2)
    torch.testing.assert_close(draws.mean(0), preds["pred"], atol=0.08, rtol=0)
    flat = draws[:, 0]
    torch.testing.assert_close(flat.T.cov(correction=0), expected[0], atol=0.15, rtol=0)


def test_nll_metric_is_per_target_for_joint_densities():
    log_probs = torch.tensor([[-2.0, -4.0]])  # [S=1, N=2] joint densities of T = 2 targets
    metric = MixtureNLL()
    metric.update(log_probs, num_targets=2)
    torch.testing.assert_close(metric.compute(), torch.tensor(1.5))


def test_bad_inputs_are_explained():
    criterion = MultivariateNLL()
    with pytest.raises(ValueError, match=r"4 outputs.*`n_outputs`"):
        criterion.log_prob(torch.randn(3, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"0 outputs.*T >= 1"):  # T = 0
        criterion.mean_and_std(torch.randn(3, 0))
    with pytest.raises(ValueError, match=r"1-D target \[N\] is ambiguous.*\[N, 1\]"):
        criterion.log_prob(torch.randn(3, 2), torch.randn(3))
    with pytest.raises(ValueError, match=r"T = 2.*shape \(3, 3\)"):
        criterion.log_prob(torch.randn(3, 5), torch.randn(3, 3))
    # through a method: the task's output check names the width T (T + 3) / 2
    method = MVERegression(MLP(1, [4], 4), criterion=MultivariateNLL())
    with pytest.raises(ValueError, match=r"gives 4 outputs.*needs 5 for 2 target.*`n_outputs`"):
        method.data_loss(torch.randn(1, 3, 4), torch.randn(3, 2))


def fit(datamodule, criterion, width, epochs=20):
    seed_everything(0)
    method = MVERegression(
        MLP(1, [32], width), criterion=criterion, optimizer=partial(torch.optim.Adam, lr=1e-2)
    )
    trainer = quiet_trainer(max_epochs=epochs, accelerator="cpu")
    trainer.fit(method, datamodule=datamodule)
    return method, trainer.test(method, datamodule=datamodule, verbose=False)[0]


def test_full_covariance_recovers_the_correlation_and_beats_the_diagonal():
    """y = [x + e_1, x + e_2], std 0.3 each, corr(e_1, e_2) = 0.8: 800 training points, an
    MLP(1, [32]), 20 epochs. Measured: correlation 0.82; joint test NLL full 0.07, diagonal 0.44,
    the true density's -0.06 (logged per target: 0.034 vs 0.221); energy score of 64 draws
    0.258 vs 0.262 (the energy score is known to be weakly sensitive to correlations)."""
    dm = ToyCorrelatedDatamodule(n_points=1000, n_test=1000, batch_size=100, correlation=0.8)
    full, full_metrics = fit(dm, MultivariateNLL(), 5)
    diagonal, diagonal_metrics = fit(dm, NLL(), 4)

    x_test, y_test = dm.X_test, dm.Y_test
    preds = full.predict_step(x_test)
    assert preds["covariance"].shape == (1000, 2, 2)
    assert preds["pred"].shape == preds["pred_uct"].shape == (1000, 2)
    covariance = preds["covariance"]
    correlation = covariance[:, 0, 1] / (covariance[:, 0, 0] * covariance[:, 1, 1]).sqrt()
    assert abs(float(correlation.mean()) - 0.8) < 0.1
    torch.testing.assert_close(preds["pred_uct"] ** 2, covariance.diagonal(dim1=-2, dim2=-1))

    # the joint test NLL, from the criteria's densities: the full head's is lower
    full_nll = -full.criterion.log_prob(preds["outputs"][0], y_test).mean()
    diagonal_preds = diagonal.predict_step(x_test)
    diagonal_nll = -diagonal.criterion.log_prob(diagonal_preds["outputs"][0], y_test).sum(-1).mean()
    true_nll = (
        -torch.distributions.MultivariateNormal(x_test.expand(-1, 2), dm.noise_covariance)
        .log_prob(y_test)
        .mean()
    )
    assert full_nll < diagonal_nll - 0.2
    assert full_nll < true_nll + 0.2
    # the logged nll is per target: the joint one / 2
    torch.testing.assert_close(full_metrics["test_nll"], float(full_nll) / 2, atol=1e-4, rtol=0)
    assert full_metrics["test_nll"] < diagonal_metrics["test_nll"]

    # the energy score of draws of each predictive: the correlated draws score better
    generator = torch.Generator().manual_seed(1)
    full_draws = predictive_draws(preds["outputs"], full.criterion, 64, generator)
    mean, std = diagonal.criterion.mean_and_std(diagonal_preds["outputs"][0])
    diagonal_draws = mean + std * torch.randn(64, *mean.shape, generator=generator)
    full_score = energy_score(full_draws, y_test)
    assert full_score < energy_score(diagonal_draws, y_test)
    # the logged one: 32 draws per point, seed 0 per batch (the 1000 test points are one batch)
    logged_draws = predictive_draws(
        preds["outputs"], full.criterion, 32, torch.Generator().manual_seed(0)
    )
    logged = float(energy_score(logged_draws, y_test))
    assert full_metrics["test_energy_score"] == pytest.approx(logged, abs=1e-5)
    assert abs(logged - float(full_score)) < 0.03
    assert "test_energy_score" not in diagonal_metrics


def test_ensemble_of_full_covariance_heads():
    """Any regression method takes the criterion: two members give the mixture's covariance."""
    dm = ToyCorrelatedDatamodule(n_points=200, n_test=50, batch_size=100)
    seed_everything(0)
    method = DeepEnsembleRegression(MLP(1, [8], 5), num_members=2, criterion=MultivariateNLL())
    quiet_trainer(max_epochs=2, accelerator="cpu").fit(method, datamodule=dm)
    preds = method.predict_step(dm.X_test)
    assert preds["outputs"].shape == (2, 50, 5)
    torch.testing.assert_close(
        preds["covariance"], mixture_covariance(preds["outputs"], method.criterion)
    )
    assert (preds["epistemic_uct"] > 0).all()
