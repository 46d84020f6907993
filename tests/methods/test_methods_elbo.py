"""The ELBO scaling is exact: Bayes by Backprop recovers the closed-form posterior of Bayesian
linear regression.

With an orthogonal design (``X^T X = diag(c)``), a known noise std ``sigma`` and a prior
``N(0, s0^2)``, the exact posterior of the weights factorizes, so the mean-field family contains
it and the optimum of a correctly scaled ELBO *is* the exact posterior:
``precision_j = 1/s0^2 + c_j/sigma^2``, ``mean_j = (X^T y)_j / sigma^2 / precision_j``.
Minibatches are smaller than ``N``, so the ``mean x N`` estimate of the data term is what is tested.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning import Trainer, seed_everything
from torch import nn
from torch.distributions import Normal

from uq_box.datamodules import ArrayDataModule
from uq_box.losses import NLL, elbo_loss
from uq_box.methods import BNNVIRegression
from uq_box.nn import BayesianLinear, sample_forward
from uq_box.nn.convert import to_bayesian

N, D, BATCH = 200, 3, 25
SIGMA, S0 = 0.5, 0.5
C = torch.tensor([2.0, 6.0, 20.0], dtype=torch.float64)  # X^T X = diag(C)
W_TRUE = torch.tensor([2.0, -1.5, 0.8], dtype=torch.float64)


def trainer_kwargs(**extra):
    return dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


@pytest.fixture(scope="module")
def regression_problem():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(N, D, generator=generator, dtype=torch.float64))
    x = q * C.sqrt()
    torch.testing.assert_close(x.T @ x, torch.diag(C))
    y = x @ W_TRUE + SIGMA * torch.randn(N, generator=generator, dtype=torch.float64)
    precision = 1.0 / S0**2 + C / SIGMA**2
    post_mean = (x.T @ y) / SIGMA**2 / precision
    post_std = precision.rsqrt()
    # the means are well away from 0 (relative errors are meaningful)
    assert (post_mean.abs() > 2 * post_std).all()
    return x.float(), y.float().unsqueeze(-1), post_mean, post_std


def fit_linear_bnn(x, y, estimator, num_training_points=None, seed=1):
    seed_everything(seed)
    dm = ArrayDataModule(x, y, batch_size=BATCH)
    model = BNNVIRegression(
        nn.Linear(D, 1, bias=False),  # the whole model is one Bayesian layer
        criterion=NLL(std=SIGMA),
        optimizer=partial(torch.optim.Adam, lr=0.05),
        lr_scheduler=partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.95),
        stochastic_module_names=None,
        prior=Normal(0.0, S0),
        posterior_rho_init=-2.0,
        estimator=estimator,
        num_mc_samples_train=64,
        num_training_points=num_training_points,
    )
    trainer = Trainer(max_epochs=120, **trainer_kwargs(limit_val_batches=0))
    trainer.fit(model, dm)
    layer = model.model
    assert isinstance(layer, BayesianLinear)
    mean = layer.weight_mu.detach().double().squeeze(0)
    std = F.softplus(layer.weight_rho.detach()).double().squeeze(0)
    return model, mean, std


@pytest.mark.parametrize("estimator", ["local", "reparameterization"])
def test_elbo_recovers_exact_posterior(regression_problem, estimator):
    x, y, post_mean, post_std = regression_problem
    model, mean, std = fit_linear_bnn(x, y, estimator)
    assert model.num_training_points == N  # read from the ArrayDataModule
    assert BATCH < N
    torch.testing.assert_close(mean, post_mean, rtol=0.05, atol=0.0)
    torch.testing.assert_close(std, post_std, rtol=0.05, atol=0.0)


def test_wrong_elbo_scaling_fails_the_check(regression_problem):
    """N/10 weights the KL 10x: the optimum is 1/std^2 = 1/s0^2 + c/(10 sigma^2), far off."""
    x, y, post_mean, post_std = regression_problem
    _, mean, std = fit_linear_bnn(x, y, "local", num_training_points=N // 10)
    rel = (std - post_std).abs() / post_std
    assert (rel > 0.25).all(), rel
    # and it lands on the tempered optimum instead
    tempered_std = (1.0 / S0**2 + C / (10 * SIGMA**2)).rsqrt()
    torch.testing.assert_close(std, tempered_std, rtol=0.1, atol=0.0)
    assert not torch.allclose(mean, post_mean, rtol=0.05, atol=0.0)


def normal_kl_by_hand(mu, sigma, s0):
    return (torch.log(s0 / sigma) + (sigma**2 + mu**2) / (2 * s0**2) - 0.5).sum()


@pytest.mark.parametrize("estimator", ["local", "reparameterization"])
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_loss_is_nll_plus_scaled_kl_on_one_batch(estimator, beta):
    seed_everything(3)
    prior_scale = 0.7
    model = BNNVIRegression(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)),
        stochastic_module_names=None,
        prior=Normal(0.0, prior_scale),
        posterior_rho_init=-1.0,
        estimator=estimator,
        num_mc_samples_train=6,
        beta=beta,
        num_training_points=500,
    )
    x, target = torch.randn(16, 4), torch.randn(16, 1)

    torch.manual_seed(11)
    terms, outputs = model.loss(x, target)
    torch.manual_seed(11)
    replay = sample_forward(model.model, x, 6)
    torch.testing.assert_close(outputs, replay)
    assert outputs.shape == (6, 16, 2)

    std = F.softplus(outputs[..., 1:2]) + 1e-6
    nll = -Normal(outputs[..., :1], std).log_prob(target).mean()
    layers = [m for m in model.model.modules() if isinstance(m, BayesianLinear)]
    assert len(layers) == 2  # every layer is Bayesian
    scale = torch.tensor(prior_scale)
    kl = sum(
        normal_kl_by_hand(layer.weight_mu, F.softplus(layer.weight_rho), scale)
        + normal_kl_by_hand(layer.bias_mu, F.softplus(layer.bias_rho), scale)
        for layer in layers
    )
    torch.testing.assert_close(terms["nll"], nll)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["loss"], nll + beta * kl / 500)
    torch.testing.assert_close(terms["loss"], elbo_loss(nll, kl, 500, beta))


def test_loss_uses_mse_during_burnin_and_nll_after():
    seed_everything(4)
    model = BNNVIRegression(
        nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 2)),
        stochastic_module_names=[-1],
        num_mc_samples_train=3,
        burnin_epochs=1,
        num_training_points=100,
    )
    x, target = torch.randn(8, 2), torch.randn(8, 1)
    model.train()
    terms, outputs = model.loss(x, target)  # epoch 0 < burnin_epochs
    mse = ((outputs[..., :1] - target) ** 2).mean()
    torch.testing.assert_close(terms["loss"], mse + terms["kl"] / 100)
    model.eval()  # validation never uses the burn-in objective
    terms, outputs = model.loss(x, target)
    torch.testing.assert_close(terms["loss"], terms["nll"] + terms["kl"] / 100)
    torch.testing.assert_close(terms["nll"], NLL()(outputs, target))


def test_bare_linear_model_becomes_bayesian():
    """A model that *is* one nn.Linear must become Bayesian (or fail loudly), never stay
    deterministic while an unused Bayesian copy adds its KL to the loss."""
    seed_everything(5)
    model = BNNVIRegression(
        nn.Linear(3, 1, bias=False),
        criterion=NLL(std=1.0),
        stochastic_module_names=None,
        posterior_rho_init=0.0,
        num_training_points=10,
    )
    outputs = model.sample_outputs(torch.randn(4, 3), 8)
    assert outputs.std(0).min() > 0, "the network stayed deterministic"
    assert "" not in dict(model.model.named_children())

    plain = nn.Linear(3, 1)
    converted = to_bayesian(plain, None)
    assert isinstance(converted, BayesianLinear)
