"""Bayesian updating: fit on D1, posterior becomes the prior, fit on D2 = posterior on D1 u D2.

Bayesian linear regression with known noise ``sigma`` and prior ``N(0, s0^2)``: when both designs
are orthogonal (``X1^T X1 = diag(c1)``, ``X2^T X2 = diag(c2)``) every posterior on the way is
a product of independent Gaussians, so mean-field VI is exact at each stage and the updated fit
must land on the closed-form joint posterior
``precision = 1/s0^2 + (c1 + c2)/sigma^2``, ``mean = (X1^T y1 + X2^T y2) / sigma^2 / precision``.
"""

import copy
from functools import partial

import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything
from torch import nn
from torch.distributions import Normal

from uq_box.datamodules import ArrayDataModule
from uq_box.losses import NLL
from uq_box.methods import BNNVIRegression
from uq_box.nn import (
    BayesianConv2d,
    BayesianLinear,
    Prior,
    posterior_as_prior,
    prune_by_snr,
    to_bayesian,
)

DTYPE = torch.float64
SIGMA, S0 = 0.5, 0.5
W_TRUE = torch.tensor([2.0, -1.5, 0.8], dtype=DTYPE)


def _design(n, c, generator):
    q, _ = torch.linalg.qr(torch.randn(n, len(c), generator=generator, dtype=DTYPE))
    x = q * c.sqrt()
    y = x @ W_TRUE + SIGMA * torch.randn(n, generator=generator, dtype=DTYPE)
    return x, y


def _posterior(xty, c, prior_mean, prior_std):
    precision = 1.0 / prior_std**2 + c / SIGMA**2
    mean = (prior_mean / prior_std**2 + xty / SIGMA**2) / precision
    return mean, precision.rsqrt()


def _fit(model, x, y, seed):
    seed_everything(seed)
    dm = ArrayDataModule(x.float(), y.float().unsqueeze(-1), batch_size=25)
    quiet_trainer(max_epochs=60, limit_val_batches=0).fit(model, dm)
    layer = model.model
    return layer.weight_mu.detach().double()[0], layer.weight_sigma.detach().double()[0]


@pytest.fixture(scope="module")
def two_data_sets():
    generator = torch.Generator().manual_seed(0)
    c1 = torch.tensor([2.0, 6.0, 20.0], dtype=DTYPE)
    c2 = torch.tensor([4.0, 8.0, 12.0], dtype=DTYPE)
    x1, y1 = _design(200, c1, generator)
    x2, y2 = _design(150, c2, generator)
    torch.testing.assert_close(x2.T @ x2, torch.diag(c2))
    return (x1, y1, c1), (x2, y2, c2)


def test_posterior_as_prior_continues_to_the_joint_posterior(two_data_sets):
    (x1, y1, c1), (x2, y2, c2) = two_data_sets
    zeros, s0 = torch.zeros(3, dtype=DTYPE), torch.full((3,), S0, dtype=DTYPE)
    post1 = _posterior(x1.T @ y1, c1, zeros, s0)
    joint = _posterior(x1.T @ y1 + x2.T @ y2, c1 + c2, zeros, s0)
    d2_only = _posterior(x2.T @ y2, c2, zeros, s0)
    # the check can tell the joint posterior from the posterior on D2 alone
    assert ((d2_only[1] - joint[1]).abs() / joint[1] > 0.15).all()

    model = BNNVIRegression(
        nn.Linear(3, 1, bias=False),
        criterion=NLL(std=SIGMA),
        optimizer=partial(torch.optim.Adam, lr=0.05),
        lr_scheduler=partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.92),
        stochastic_module_names=None,
        prior=Normal(0.0, S0),
        posterior_rho_init=-2.0,
        estimator="local",
        num_mc_samples_train=48,
    )
    mean1, std1 = _fit(model, x1, y1, seed=1)
    torch.testing.assert_close(mean1, post1[0], rtol=0.05, atol=0)
    torch.testing.assert_close(std1, post1[1], rtol=0.05, atol=0)

    control = copy.deepcopy(model)  # the same fit on D2 with the original prior
    posterior_as_prior(model)
    layer = model.model
    torch.testing.assert_close(layer.prior.loc[0].double(), mean1)
    torch.testing.assert_close(layer.prior.scale[0].double(), std1)
    mean2, std2 = _fit(model, x2, y2, seed=2)
    assert model.num_training_points == 150  # the ELBO of the second fit counts D2 only
    torch.testing.assert_close(mean2, joint[0], rtol=0.05, atol=0)
    torch.testing.assert_close(std2, joint[1], rtol=0.05, atol=0)
    # and where the first fit left it, the prior has not moved
    torch.testing.assert_close(layer.prior.scale[0].double(), std1)

    _, std_control = _fit(control, x2, y2, seed=2)
    assert ((std_control - joint[1]).abs() / joint[1] > 0.1).all()
    torch.testing.assert_close(std_control, d2_only[1], rtol=0.05, atol=0)


def test_posterior_as_prior_sets_elementwise_buffers_for_weights_and_biases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.ReLU(), nn.Linear(8, 3))
    to_bayesian(net, None, prior=Normal(0.0, 2.0), posterior_rho_init=-3.0)
    net.double()
    assert posterior_as_prior(net) is net
    for layer in (net[0], net[3]):
        assert layer.prior.loc.shape == layer.weight_mu.shape
        assert layer.bias_prior.scale.shape == layer.bias_mu.shape
        assert layer.prior.loc.dtype == DTYPE
        assert {name for name, _ in layer.prior.named_buffers()} == {"loc", "scale"}
        assert not any(p is layer.prior.loc for p in net.parameters())
        torch.testing.assert_close(layer.prior.scale, layer.weight_sigma.detach())
        torch.testing.assert_close(layer.bias_prior.loc, layer.bias_mu.detach())
    assert isinstance(net[0], BayesianConv2d) and isinstance(net[3], BayesianLinear)
    # the posterior equals its prior: zero KL, and a KL gradient that vanishes
    kl = net[0].kl + net[3].kl
    assert kl.abs().item() < 1e-10
    # the prior is a copy: moving the posterior leaves it
    with torch.no_grad():
        net[3].weight_mu.add_(1.0)
    assert net[3].kl.item() > 0.1
    # a checkpoint of the updated model loads into a freshly converted one
    fresh = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.ReLU(), nn.Linear(8, 3))
    fresh = to_bayesian(fresh, None).double()
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh[3].kl, net[3].kl)


def test_posterior_as_prior_handles_pruned_weights_and_errors():
    layer = BayesianLinear(4, 3, posterior_rho_init=-2.0)
    prune_by_snr(layer, 0.5)  # pruned weights have sigma ~ 1e-13 (rho = -30)
    posterior_as_prior(layer, min_scale=1e-6)
    assert layer.prior.scale.min().item() == pytest.approx(1e-6)
    assert torch.isfinite(layer.kl)
    with pytest.raises(ValueError, match="no Bayesian layer"):
        posterior_as_prior(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="min_scale"):
        posterior_as_prior(layer, min_scale=0.0)
    assert isinstance(layer.prior, Prior)
