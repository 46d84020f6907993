"""Spectral normalization, the random-feature GP layer and the Gaussian discriminant, with numbers."""

import math

import pytest
import torch
from torch import nn

from uq_box.models import MLP
from uq_box.nn.gda import GaussianDiscriminant, class_statistics
from uq_box.nn.gp import RandomFeatureGP
from uq_box.nn.spectral import is_spectral_normalized, spectral_norm_of, spectral_normalize


# -- spectral normalization -------------------------------------------------------------------
@pytest.mark.parametrize("coefficient", [0.5, 0.95, 3.0])
def test_normalized_linear_weight_has_spectral_norm_at_most_the_coefficient(coefficient):
    torch.manual_seed(0)
    layer = nn.Linear(20, 30)
    with torch.no_grad():
        layer.weight.mul_(5.0)
    before = float(spectral_norm_of(layer))
    assert before > coefficient
    spectral_normalize(layer, None, coefficient=coefficient)
    layer.train()
    for _ in range(20):  # power iterations run in training forwards
        layer(torch.randn(4, 20))
    assert float(spectral_norm_of(layer)) <= coefficient * (1 + 1e-4)
    # a full-norm layer is scaled down to the bound, not below it
    assert float(spectral_norm_of(layer)) == pytest.approx(coefficient, rel=1e-3)


def test_layer_below_the_coefficient_is_left_unchanged_and_eval_mode_keeps_the_estimate():
    torch.manual_seed(0)
    layer = nn.Linear(5, 5)
    weight = layer.weight.detach().clone()
    spectral_normalize(layer, None, coefficient=10.0)
    torch.testing.assert_close(layer.weight, weight)
    model = MLP(2, [16, 16], 3)
    spectral_normalize(model, ["model.0", "model.3"], coefficient=0.9)
    u = model.model[0].parametrizations.weight[0]._u.clone()
    model.eval()
    model(torch.randn(3, 2))
    assert torch.equal(u, model.model[0].parametrizations.weight[0]._u)
    assert is_spectral_normalized(model.model[3]) and not is_spectral_normalized(model.model[6])
    assert any("parametrizations.weight.0._u" in key for key in model.state_dict())


def test_conv_is_normalized_on_its_reshaped_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        conv.weight.mul_(10.0)
    spectral_normalize(conv, None, coefficient=1.0)
    conv.train()
    for _ in range(20):
        conv(torch.randn(2, 3, 6, 6))
    reshaped = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert float(reshaped) <= 1.0 + 1e-4


def test_unknown_name_unsupported_layer_and_twice_are_clear_errors():
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="`module_names` names no layer 'fc'"):
        spectral_normalize(model, ["fc"])
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) cannot be spectral-normalized"):
        spectral_normalize(model, ["1"])
    with pytest.raises(ValueError, match="index 7 is out of range"):
        spectral_normalize(model, [7])
    assert spectral_normalize(model, [0]) == ["0"]
    with pytest.raises(ValueError, match="already spectral-normalized"):
        spectral_normalize(model, ["0"])
    with pytest.raises(ValueError, match="supports"):
        spectral_normalize(nn.Sequential(nn.BatchNorm1d(3)), None)
    with pytest.raises(ValueError, match="`coefficient`"):
        spectral_normalize(nn.Linear(2, 2), None, coefficient=0.0)


# -- the random-feature GP ----------------------------------------------------------------------
def test_gp_covariance_is_bayesian_linear_regression_on_the_random_features():
    """P = ridge I + Phi^T Phi / sigma^2 and var(x) = phi(x)^T P^-1 phi(x): the closed form."""
    torch.manual_seed(0)
    gp = RandomFeatureGP(3, 1, num_features=16, lengthscale=0.7, ridge_penalty=2.0).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    sigma = 0.3
    phi = gp.random_features(x)
    gp.update_precision(phi[:25], torch.full((25,), 1 / sigma**2, dtype=torch.float64))
    gp.update_precision(phi[25:], torch.full((15,), 1 / sigma**2, dtype=torch.float64))
    # closed form: the posterior of beta ~ N(0, I / ridge) under y = phi^T beta + N(0, sigma^2)
    w = torch.randn(16, 1, dtype=torch.float64)
    f = phi @ w
    expected_cov = torch.linalg.inv(
        2.0 * torch.eye(16, dtype=torch.float64) + phi.T @ phi / sigma**2
    )
    torch.testing.assert_close(gp.covariance(), expected_cov)
    x_new = torch.randn(7, 3, dtype=torch.float64) * 3
    phi_new = gp.random_features(x_new)
    expected_var = torch.einsum("nd,de,ne->n", phi_new, expected_cov, phi_new)
    torch.testing.assert_close(gp.predict(x_new)[1], expected_var)
    # posterior mean of the closed form, for reference: Sigma Phi^T f / sigma^2 fits f
    mean = expected_cov @ phi.T @ f / sigma**2
    assert float((phi @ mean - f).abs().mean()) < float(f.abs().mean())
    # the random features approximate the RBF kernel with the length scale
    big = RandomFeatureGP(2, 1, num_features=20000, lengthscale=0.7)
    a, b = torch.zeros(1, 2), torch.tensor([[0.5, 0.2]])
    k = (big.random_features(a) * big.random_features(b)).sum()
    assert float(k) == pytest.approx(math.exp(-0.29 / (2 * 0.49)), abs=0.03)
    # reset: back to the prior
    gp.reset_precision()
    torch.testing.assert_close(gp.covariance(), 0.5 * torch.eye(16, dtype=torch.float64))


def test_gp_variance_is_low_at_the_data_and_the_prior_far_away():
    torch.manual_seed(0)
    gp = RandomFeatureGP(2, 2, num_features=256, lengthscale=0.5)
    x = torch.randn(500, 2) * 0.5
    gp.update_precision(gp.random_features(x))
    _, near = gp.predict(torch.randn(50, 2) * 0.3)
    _, far = gp.predict(torch.randn(50, 2) * 0.3 + 6.0)
    assert float(near.mean()) < 0.1 < 0.5 < float(far.mean()) < 1.5
    with pytest.raises(ValueError, match=r"features \[N, 2\]"):
        gp(torch.randn(4, 3))


# -- the Gaussian discriminant ------------------------------------------------------------------
def test_gaussian_discriminant_is_the_class_weighted_gaussian_mixture():
    torch.manual_seed(0)
    f = torch.cat([torch.randn(60, 3) + 2, torch.randn(40, 3) * 0.5 - 1]).double()
    y = torch.cat([torch.zeros(60), torch.full((40,), 2)]).long()  # class 1 absent
    stats = class_statistics(f[:30], y[:30], 3)
    rest = class_statistics(f[30:], y[30:], 3)
    gda = GaussianDiscriminant().fit(*[a + b for a, b in zip(stats, rest, strict=True)])
    assert gda.classes.tolist() == [0, 2]
    x = torch.randn(5, 3).double()
    components = []
    for c, weight in ((0, 0.6), (2, 0.4)):
        fc = f[y == c]
        normal = torch.distributions.MultivariateNormal(fc.mean(0), torch.cov(fc.T))
        components.append(normal.log_prob(x) + math.log(weight))
    torch.testing.assert_close(gda.log_density(x), torch.logsumexp(torch.stack(components), 0))
    # a fit travels in the state_dict into an unfitted one
    fresh = GaussianDiscriminant()
    fresh.load_state_dict(gda.state_dict())
    torch.testing.assert_close(fresh.log_density(x), gda.log_density(x))


def test_gaussian_discriminant_jitters_a_singular_covariance():
    f = torch.randn(10, 4).double()
    f[:, 3] = 1.0  # a constant feature
    gda = GaussianDiscriminant().fit(*class_statistics(f, torch.zeros(10).long(), 1))
    assert torch.isfinite(gda.log_density(torch.randn(3, 4).double())).all()
    one = GaussianDiscriminant().fit(*class_statistics(f[:1], torch.zeros(1).long(), 1))
    assert torch.isfinite(one.log_density(f)).all()
