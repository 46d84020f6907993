"""The flipout estimator: right marginal moments, decorrelated examples, exact replay."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning import Trainer, seed_everything
from torch import nn
from torch.distributions import Normal

from uq_box.datamodules import ArrayDataModule
from uq_box.losses import NLL
from uq_box.methods import BNNVIRegression
from uq_box.nn import (
    BayesianConv2d,
    BayesianLinear,
    mc_sampling,
    sample_forward,
    to_bayesian,
)

DTYPE = torch.float64


def _randomize(layer, seed, rho=(-1.5, 0.0)):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("rho"):
                p.copy_(torch.empty_like(p).uniform_(*rho, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def _closed_form(layer, x):
    """Mean and variance of the output of a layer with independent Gaussian weights."""
    bias_var = None if layer.bias_mu is None else layer.bias_sigma**2
    mean = layer._apply_mean(x, layer.weight_mu, layer.bias_mu)
    var = layer._apply_mean(x * x, layer.weight_sigma**2, bias_var)
    return mean.detach(), var.detach()


def _check_moments(samples, mean, var):
    """Sample mean and variance over dim 0 match within Monte Carlo error."""
    num = samples.shape[0]
    z = (samples.mean(0) - mean) / (var / num).sqrt()
    assert z.abs().max() < 5.0, z.abs().max()
    # the sample variance has relative standard error sqrt(2 / n) (Gaussian outputs)
    rel = samples.var(0) / var - 1
    assert rel.abs().max() < 6 * math.sqrt(2 / num), rel.abs().max()


LAYERS = {
    "linear": (lambda est: BayesianLinear(3, 2, estimator=est), (4, 3)),
    "linear_3d_input": (lambda est: BayesianLinear(3, 2, estimator=est), (2, 3, 3)),
    "conv2d": (lambda est: BayesianConv2d(2, 2, 3, padding=1, estimator=est), (2, 2, 3, 3)),
    "conv2d_groups": (lambda est: BayesianConv2d(2, 4, 2, groups=2, estimator=est), (2, 2, 3, 3)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_flipout_moments_match_reparameterization_in_sample_forward(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = _randomize(make("flipout").to(DTYPE), 1)
    x = torch.randn(shape, dtype=DTYPE)
    mean, var = _closed_form(layer, x)
    with torch.no_grad():
        flip = sample_forward(layer, x, 20_000)
        _check_moments(flip, mean, var)
        layer.estimator = "reparameterization"
        _check_moments(sample_forward(layer, x, 20_000), mean, var)


def test_flipout_moments_outside_the_sampling_context():
    torch.manual_seed(1)
    layer = _randomize(BayesianLinear(3, 2, estimator="flipout").to(DTYPE), 2)
    x = torch.randn(3, 3, dtype=DTYPE)
    mean, var = _closed_form(layer, x)
    with torch.no_grad():
        samples = torch.stack([layer(x) for _ in range(4000)])  # one weight sample per call
    _check_moments(samples, mean, var)
    conv = _randomize(BayesianConv2d(2, 2, 2, estimator="flipout").to(DTYPE), 3)
    x = torch.randn(2, 2, 3, 3, dtype=DTYPE)
    mean, var = _closed_form(conv, x)
    with torch.no_grad():
        samples = torch.stack([conv(x) for _ in range(4000)])
    _check_moments(samples, mean, var)


def _correlation(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).mean(0) / (a.std(0) * b.std(0))


@pytest.mark.parametrize("layer_name", ["linear", "conv2d"])
def test_flipout_decorrelates_the_examples_of_a_batch(layer_name):
    torch.manual_seed(2)
    make, shape = LAYERS[layer_name]
    layer = _randomize(make("flipout").to(DTYPE), 4)
    one = torch.randn(1, *shape[1:], dtype=DTYPE)
    x = torch.cat([one, one, torch.randn_like(one)])  # two identical examples and another
    with torch.no_grad():
        flip = sample_forward(layer, x, 20_000)
        layer.estimator = "reparameterization"
        shared = sample_forward(layer, x, 20_000)
    # the same weight sample for the whole batch: identical inputs give identical outputs
    torch.testing.assert_close(shared[:, 0], shared[:, 1])
    assert _correlation(shared[:, 0], shared[:, 2]).abs().mean() > 0.2
    # flipout: uncorrelated, the standard error of a correlation is 1/sqrt(20000) = 0.007
    assert _correlation(flip[:, 0], flip[:, 1]).abs().max() < 0.04
    assert _correlation(flip[:, 0], flip[:, 2]).abs().max() < 0.04
    # the same input seen by two examples still has the same distribution
    assert (flip[:, 0].var(0) / flip[:, 1].var(0) - 1).abs().max() < 0.1


def _flipout_noise(num_samples, rows, layers, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = {}
    for layer in layers:
        n_in, n_out = layer._features
        table[(layer, "weight")] = torch.randn(
            (num_samples, *layer.weight_mu.shape), generator=gen, dtype=DTYPE
        )
        table[(layer, "sign_in")] = torch.randn(rows, n_in, generator=gen, dtype=DTYPE)
        table[(layer, "sign_out")] = torch.randn(rows, n_out, generator=gen, dtype=DTYPE)
        table[(layer, "bias")] = torch.randn(rows, n_out, generator=gen, dtype=DTYPE)

    def noise_fn(module, name, shape):
        eps = table[(module, name)]
        assert tuple(shape) == tuple(eps.shape), (name, shape, eps.shape)
        return eps

    return table, noise_fn


def test_flipout_replays_the_formula_in_folded_and_unfolded_layers():
    """out[s, n] = x mu^T + ((x * s_in) (sigma * eps_s)^T) * s_out + mu_b + sigma_b eps_b, with
    the rows of the folded batch sample-major (row = s * N + n)."""
    torch.manual_seed(3)
    net = nn.Sequential(
        BayesianConv2d(2, 3, 2, estimator="flipout"),
        nn.Tanh(),
        nn.Flatten(),
        BayesianLinear(12, 2, estimator="flipout"),
    ).to(DTYPE)
    for layer in (net[0], net[3]):
        _randomize(layer, 5)
    num_samples, batch = 3, 4
    x = torch.randn(batch, 2, 3, 3, dtype=DTYPE)
    table, noise_fn = _flipout_noise(num_samples, num_samples * batch, [net[0], net[3]])
    out = sample_forward(net, x, num_samples, noise_fn=noise_fn)
    assert out.shape == (num_samples, batch, 2)

    def by_hand(layer, inp, s, row):
        eps = table[(layer, "weight")][s]
        s_in, s_out = table[(layer, "sign_in")][row].sign(), table[(layer, "sign_out")][row].sign()
        bias = layer.bias_mu + layer.bias_sigma * table[(layer, "bias")][row]
        delta = layer.weight_sigma * eps
        if isinstance(layer, BayesianConv2d):
            view = (-1, 1, 1)
            mean = F.conv2d(inp[None], layer.weight_mu)[0]
            pert = F.conv2d((inp * s_in.view(view))[None], delta)[0] * s_out.view(view)
            return mean + pert + bias.view(view)
        return inp @ layer.weight_mu.T + ((inp * s_in) @ delta.T) * s_out + bias

    for s in range(num_samples):
        for n in range(batch):
            row = s * batch + n
            hidden = torch.tanh(by_hand(net[0], x[n], s, row)).flatten()
            torch.testing.assert_close(out[s, n], by_hand(net[3], hidden, s, row))


def test_flipout_in_sample_forward_shapes_and_gradients():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )
    to_bayesian(model, None, estimator="flipout", posterior_rho_init=-3.0)
    x = torch.randn(5, 1, 8, 8)
    out = sample_forward(model, x, 7)
    assert out.shape == (7, 5, 3)
    assert out.std(0).min() > 0  # stochastic
    assert model(x).shape == (5, 3)  # outside the context: one sample per call
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # inside mc_sampling the layers take and give folded batches [S * N, ...]
    with mc_sampling(2) as state:
        assert model[0](state.fold(x)).shape == (10, 4, 8, 8)


def test_flipout_without_bias_and_zero_variance_is_the_mean():
    layer = BayesianLinear(3, 2, bias=False, estimator="flipout", posterior_rho_init=-40.0)
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x), x @ layer.weight_mu.T, rtol=0, atol=1e-10)
    out = sample_forward(layer, x, 3)
    torch.testing.assert_close(out, (x @ layer.weight_mu.T).expand(3, 4, 2), rtol=0, atol=1e-10)


def test_estimator_error_names_all_three():
    with pytest.raises(ValueError, match="reparameterization.*local.*flipout.*'flip'"):
        BayesianLinear(2, 2, estimator="flip")
    with pytest.raises(ValueError, match="flipout"):
        BayesianConv2d(2, 2, 3, estimator="Flipout")


def test_flipout_elbo_recovers_exact_posterior():
    """Bayesian linear regression with an orthogonal design: the mean-field family holds the
    exact posterior, and flipout's ELBO gradients reach it (as tests/methods/test_methods_elbo)."""
    n, sigma, s0 = 200, 0.5, 0.5
    c = torch.tensor([2.0, 6.0, 20.0], dtype=DTYPE)
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, 3, generator=gen, dtype=DTYPE))
    x = q * c.sqrt()
    y = x @ torch.tensor([2.0, -1.5, 0.8], dtype=DTYPE) + sigma * torch.randn(
        n, generator=gen, dtype=DTYPE
    )
    precision = 1 / s0**2 + c / sigma**2
    post_mean, post_std = (x.T @ y) / sigma**2 / precision, precision.rsqrt()
    seed_everything(1)
    model = BNNVIRegression(
        nn.Linear(3, 1, bias=False),
        criterion=NLL(std=sigma),
        optimizer=partial(torch.optim.Adam, lr=0.05),
        lr_scheduler=partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.95),
        stochastic_module_names=None,
        prior=Normal(0.0, s0),
        posterior_rho_init=-2.0,
        estimator="flipout",
        num_mc_samples_train=64,
    )
    trainer = Trainer(
        max_epochs=120,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, ArrayDataModule(x.float(), y.float().unsqueeze(-1), batch_size=25))
    layer = model.model
    assert layer.estimator == "flipout"
    torch.testing.assert_close(layer.weight_mu.detach().double()[0], post_mean, rtol=0.05, atol=0)
    torch.testing.assert_close(layer.weight_sigma.detach().double()[0], post_std, rtol=0.05, atol=0)
