"""Prior families on every Bayesian layer, and the scale-mixture prior of Blundell et al. 2015."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from scipy import integrate, stats
from torch.distributions import Laplace, Normal, StudentT, kl_divergence

from uq_box.nn import (
    BayesianConv1d,
    BayesianConv2d,
    BayesianConv3d,
    BayesianLinear,
    Prior,
    ScaleMixtureNormal,
    mean_field_kl,
    sample_forward,
)

DTYPE = torch.float64
PI, SIGMA1, SIGMA2 = 0.5, 1.0, 0.0025  # Blundell et al.: pi = 1/2, sigma1 = e^0, sigma2 = e^-6


def _mixture_logpdf(w, pi=PI, s1=SIGMA1, s2=SIGMA2):
    with np.errstate(divide="ignore"):  # pi = 1: log(0) = -inf is the right value
        log_pi, log_rest = np.log(pi), np.log(1.0 - pi)
    return np.logaddexp(
        log_pi + stats.norm.logpdf(w, 0.0, s1), log_rest + stats.norm.logpdf(w, 0.0, s2)
    )


def _quad_kl(mu: float, sigma: float, logpdf_p) -> float:
    """KL(N(mu, sigma^2) || p) by the trapezoid rule on a fine grid (spacing << sigma2)."""
    w = np.linspace(mu - 14 * sigma, mu + 14 * sigma, 400_001)
    log_q = stats.norm.logpdf(w, loc=mu, scale=sigma)
    return float(np.trapezoid(np.exp(log_q) * (log_q - logpdf_p(w)), w))


# ----------------------------------------------------------------------------- the distribution


@pytest.mark.parametrize(
    ("pi", "s1", "s2"), [(PI, SIGMA1, SIGMA2), (0.25, 0.5, 0.05), (1.0, 1, 0.1)]
)
def test_scale_mixture_log_prob_integrates_to_one_and_matches_scipy(pi, s1, s2):
    dist = ScaleMixtureNormal(
        torch.tensor(pi, dtype=DTYPE), torch.tensor(s1, dtype=DTYPE), torch.tensor(s2, dtype=DTYPE)
    )

    def density(w):
        return math.exp(dist.log_prob(torch.tensor(w, dtype=DTYPE)).item())

    # split at the narrow component so the adaptive rule sees its peak
    edges = [-12 * s1, -12 * s2, 0.0, 12 * s2, 12 * s1]
    total = sum(
        integrate.quad(density, a, b, limit=200, epsabs=1e-12)[0]
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    )
    assert total == pytest.approx(1.0, abs=1e-8)
    w = np.array([-3.0, -0.3, -0.004, 0.0, 1e-3, 0.02, 2.5])
    got = dist.log_prob(torch.tensor(w, dtype=DTYPE)).numpy()
    np.testing.assert_allclose(got, _mixture_logpdf(w, pi, s1, s2), rtol=1e-12)


def test_scale_mixture_samples_follow_the_density():
    torch.manual_seed(0)
    dist = ScaleMixtureNormal(PI, SIGMA1, SIGMA2)
    w = dist.sample((40_000,))
    assert w.shape == (40_000,) and not w.requires_grad
    assert dist.sample((3, 2)).shape == (3, 2)
    cdf = lambda v: dist.cdf(torch.as_tensor(v)).numpy()  # noqa: E731
    assert stats.kstest(w.numpy(), cdf).pvalue > 1e-3
    assert w.var().item() == pytest.approx(dist.variance.item(), rel=0.05)
    # half the draws come from the narrow component: |w| < 0.01 is about 0.5 + 0.5 * 0.008
    assert (w.abs() < 0.01).float().mean().item() == pytest.approx(0.504, abs=0.01)
    assert dist.has_rsample is False
    # batched parameters broadcast
    batched = ScaleMixtureNormal(torch.tensor([0.2, 0.8]), 1.0, 0.01)
    assert batched.batch_shape == (2,) and batched.sample((5,)).shape == (5, 2)
    assert batched.expand((4, 2)).sample().shape == (4, 2)


@pytest.mark.parametrize(
    ("bad", "name"),
    [((1.5, 1.0, 0.1), "pi"), ((0.5, -1.0, 0.1), "sigma1"), ((0.5, 1, 0), "sigma2")],
)
def test_scale_mixture_invalid_parameters_are_errors(bad, name):
    with pytest.raises(ValueError, match=name):
        ScaleMixtureNormal(*bad, validate_args=True)
    with pytest.raises(ValueError, match=f"prior.*{name}"):
        BayesianLinear(2, 2, prior=ScaleMixtureNormal(*bad, validate_args=False))


def test_scale_mixture_prior_stores_buffers_and_uses_monte_carlo():
    prior = Prior(ScaleMixtureNormal(PI, SIGMA1, SIGMA2))
    assert set(prior.state_dict()) == {"pi", "sigma1", "sigma2"}
    assert prior.sigma2.item() == pytest.approx(SIGMA2)
    prior = prior.double()
    assert prior.pi.dtype == DTYPE
    dist = prior.distribution()
    assert isinstance(dist, ScaleMixtureNormal) and dist.sigma1.dtype == DTYPE
    mu = torch.tensor([0.0, 0.3], dtype=DTYPE)
    with pytest.raises(NotImplementedError):  # no closed form exists
        kl_divergence(Normal(mu, torch.ones_like(mu)), dist)
    # the estimate is random (one sample) and finite
    values = torch.stack([prior.kl_from(mu, torch.full_like(mu, 0.1)) for _ in range(5)])
    assert torch.isfinite(values).all() and values.std() > 0


def test_scale_mixture_monte_carlo_kl_converges_to_quadrature():
    torch.manual_seed(1)
    mu = torch.tensor([0.0, 0.05, -0.4, 1.2], dtype=DTYPE)
    sigma = torch.tensor([0.001, 0.02, 0.1, 0.5], dtype=DTYPE)
    reference = sum(
        _quad_kl(m, s, _mixture_logpdf) for m, s in zip(mu.tolist(), sigma.tolist(), strict=True)
    )
    prior = Prior(ScaleMixtureNormal(PI, SIGMA1, SIGMA2)).double()
    estimate = prior.kl_from(mu, sigma, num_mc_samples=200_000)
    assert estimate.item() == pytest.approx(reference, rel=0.005)
    # per element as well, against the quadrature of each term
    for m, s in zip(mu.tolist(), sigma.tolist(), strict=True):
        one = prior.kl_from(torch.tensor([m], dtype=DTYPE), torch.tensor([s], dtype=DTYPE), 100_000)
        assert one.item() == pytest.approx(_quad_kl(m, s, _mixture_logpdf), rel=0.01, abs=2e-3)


# ----------------------------------------------------------------------------- every layer


PRIORS = {
    "normal": lambda: Normal(0.1, 0.5),
    "laplace": lambda: Laplace(0.0, 0.3),
    "student_t": lambda: StudentT(3.0, 0.0, 0.4),
    "scale_mixture": lambda: ScaleMixtureNormal(PI, SIGMA1, SIGMA2),
}
LAYERS = {
    "linear": (lambda **kw: BayesianLinear(4, 3, **kw), (5, 4)),
    "conv1d": (lambda **kw: BayesianConv1d(2, 3, 3, **kw), (5, 2, 6)),
    "conv2d": (lambda **kw: BayesianConv2d(2, 3, 3, padding=1, **kw), (5, 2, 5, 5)),
    "conv3d": (lambda **kw: BayesianConv3d(2, 3, 2, **kw), (5, 2, 3, 3, 3)),
}


def _randomize(layer, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            low, high = (-4.0, -1.0) if name.endswith("rho") else (-0.5, 0.5)
            p.copy_(torch.empty_like(p).uniform_(low, high, generator=gen))


@pytest.mark.parametrize("prior_name", list(PRIORS))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_every_prior_on_every_layer(layer_name, prior_name):
    make, shape = LAYERS[layer_name]
    layer = make(prior=PRIORS[prior_name](), num_kl_samples=4).double()
    _randomize(layer, 0)
    assert layer.prior.family is type(PRIORS[prior_name]())
    # the KL is the posterior-vs-prior KL of weights and biases (replayed Monte Carlo draws)
    torch.manual_seed(5)
    got = layer.kl
    torch.manual_seed(5)
    prior = layer.prior.distribution()
    expected = mean_field_kl(layer.weight_mu, layer.weight_sigma, prior, 4) + mean_field_kl(
        layer.bias_mu, layer.bias_sigma, prior, 4
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(shape, dtype=DTYPE)
    for estimator in ("reparameterization", "local", "flipout"):
        layer.estimator = estimator
        layer.zero_grad()
        out = sample_forward(layer, x, 3)
        loss = out.square().mean() + layer.kl / 100
        loss.backward()
        assert torch.isfinite(out).all() and torch.isfinite(loss)
        for p in (layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho):
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_bias_prior_separate_from_weight_prior():
    layer = BayesianLinear(3, 2, prior=Normal(0.0, 0.5), bias_prior=Laplace(0.0, 2.0)).double()
    _randomize(layer, 1)
    expected = (
        kl_divergence(Normal(layer.weight_mu, F.softplus(layer.weight_rho)), Normal(0.0, 0.5)).sum()
        + kl_divergence(Normal(layer.bias_mu, F.softplus(layer.bias_rho)), Laplace(0.0, 2.0)).sum()
    )
    torch.testing.assert_close(layer.kl, expected.to(DTYPE), rtol=1e-6, atol=0)
    assert "bias_prior.scale" in layer.state_dict()
    assert "bias_prior" not in dict(BayesianLinear(3, 2).named_children())


def test_elementwise_prior_loads_into_a_scalar_prior():
    """A checkpoint with weight-shaped prior buffers loads into a freshly built layer."""
    layer = BayesianLinear(3, 2).double()
    _randomize(layer, 2)
    layer.prior = Prior(Normal(layer.weight_mu.detach().clone(), layer.weight_sigma.detach()))
    with pytest.raises(RuntimeError, match="size"):  # a weight-shaped prior cannot cover biases
        layer.layer_kl()
    layer.bias_prior = Prior(Normal(torch.zeros(2, dtype=DTYPE), torch.full((2,), 3.0)))
    fresh = BayesianLinear(3, 2).double()
    assert fresh.bias_prior is None
    fresh.load_state_dict(layer.state_dict())  # strict: the bias prior is created, shapes follow
    assert fresh.prior.loc.shape == (2, 3) and fresh.prior.loc.dtype == DTYPE
    assert fresh.bias_prior.scale.shape == (2,) and fresh.bias_prior.scale.dtype == DTYPE
    torch.testing.assert_close(fresh.prior.scale, layer.weight_sigma.detach())
    # the weights' KL from their own posterior is zero; only the biases contribute
    bias_only = kl_divergence(Normal(fresh.bias_mu, fresh.bias_sigma), Normal(0.0, 3.0)).sum()
    assert bias_only > 0
    torch.testing.assert_close(fresh.kl, bias_only, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fresh.kl, layer.kl, rtol=1e-12, atol=0)
    # and back: a scalar prior's checkpoint loads into the elementwise one
    layer.load_state_dict(BayesianLinear(3, 2, bias_prior=1.0).double().state_dict())
    assert layer.prior.loc.shape == () and layer.bias_prior.scale.shape == ()
