"""Priors and KL divergences checked against torch.distributions and numerical integration."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from scipy import stats
from torch import nn
from torch.distributions import Cauchy, Laplace, Normal, StudentT, kl_divergence

from uq_box.nn import (
    BayesianConv2d,
    BayesianLinear,
    Prior,
    mean_field_kl,
    to_bayesian,
)
from uq_box.nn import kl_divergence as model_kl
from uq_box.nn.priors import as_distribution, normal_kl


def _posterior(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=gen, dtype=dtype)
    sigma = 0.05 + torch.rand(shape, generator=gen, dtype=dtype)
    return mu, sigma


def _quad_kl(mu: float, sigma: float, logpdf_p) -> float:
    """KL(N(mu, sigma^2) || p) = int q log(q / p) by the trapezoid rule on a fine grid."""
    w = np.linspace(mu - 14 * sigma, mu + 14 * sigma, 400_001)
    log_q = stats.norm.logpdf(w, loc=mu, scale=sigma)
    return float(np.trapezoid(np.exp(log_q) * (log_q - logpdf_p(w)), w))


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    ("loc", "scale"),
    [(0.0, 1.0), (0.3, 0.1), (-2.0, 3.0), (1.0, 0.01)],
)
def test_normal_kl_matches_torch_distributions(loc, scale):
    mu, sigma = _posterior((5, 7))
    loc_t, scale_t = (
        torch.tensor(loc, dtype=torch.float64),
        torch.tensor(scale, dtype=torch.float64),
    )
    expected = kl_divergence(Normal(mu, sigma), Normal(loc_t, scale_t))
    torch.testing.assert_close(normal_kl(mu, sigma, loc_t, scale_t), expected, rtol=1e-12, atol=0)
    # Prior stores its parameters in the default dtype (float32): equal up to float32 rounding
    prior = Prior(Normal(loc, scale)).double()
    torch.testing.assert_close(prior.kl_from(mu, sigma), expected.sum(), rtol=1e-6, atol=0)
    dist = Normal(loc_t, scale_t)
    torch.testing.assert_close(mean_field_kl(mu, sigma, dist), expected.sum(), rtol=1e-12, atol=0)


def test_normal_kl_closed_form_by_hand():
    # KL(N(1, 0.5^2) || N(0, 2^2)) = log(2/0.5) + (0.25 + 1) / (2 * 4) - 0.5
    expected = math.log(4.0) + 1.25 / 8.0 - 0.5
    got = normal_kl(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.0), torch.tensor(2.0))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # q == p gives exactly zero
    zero = normal_kl(torch.tensor(0.3), torch.tensor(0.7), torch.tensor(0.3), torch.tensor(0.7))
    assert zero.item() == pytest.approx(0.0, abs=1e-7)


def test_normal_prior_broadcasts_tensor_parameters_against_weights():
    mu, sigma = _posterior((4, 3))
    loc = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64)
    scale = torch.tensor([1.0, 0.2, 3.0], dtype=torch.float64)
    prior = Prior(Normal(loc, scale)).double()
    assert prior.loc.shape == (3,)
    expected = kl_divergence(Normal(mu, sigma), Normal(loc, scale)).sum()
    torch.testing.assert_close(prior.kl_from(mu, sigma), expected, rtol=1e-6, atol=0)
    # a scalar prior against tensor weights: every element uses the same prior
    scalar = Prior(Normal(0.2, 0.8)).double()
    expected = sum(
        kl_divergence(Normal(m, s), Normal(torch.tensor(0.2), torch.tensor(0.8))).item()
        for m, s in zip(mu.flatten(), sigma.flatten(), strict=True)
    )
    assert scalar.kl_from(mu, sigma).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("loc", "scale"), [(0.0, 1.0), (0.5, 0.2), (-1.0, 2.5)])
def test_laplace_prior_matches_torch_distributions(loc, scale):
    mu, sigma = _posterior((6, 4), seed=1)
    prior = Prior(Laplace(loc, scale)).double()
    expected = kl_divergence(Normal(mu, sigma), Laplace(loc, scale)).sum()
    # closed form: the value is deterministic, whatever num_mc_samples says
    torch.testing.assert_close(prior.kl_from(mu, sigma, 1), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(prior.kl_from(mu, sigma, 1), prior.kl_from(mu, sigma, 1))
    torch.testing.assert_close(
        mean_field_kl(mu, sigma, Laplace(loc, scale)), expected, rtol=1e-10, atol=0
    )


def test_laplace_closed_form_agrees_with_quadrature():
    """An independent check of the Normal-Laplace closed form torch uses."""
    for mu, sigma, loc, scale in [(0.4, 0.3, 0.0, 1.0), (-1.2, 1.5, 0.5, 0.3)]:
        got = (
            Prior(Laplace(loc, scale))
            .double()
            .kl_from(
                torch.tensor([mu], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)
            )
        )
        ref = _quad_kl(mu, sigma, lambda w, a=loc, b=scale: stats.laplace.logpdf(w, a, b))
        assert got.item() == pytest.approx(ref, rel=1e-6)


def test_normal_closed_form_agrees_with_quadrature():
    got = (
        Prior(Normal(0.5, 2.0))
        .double()
        .kl_from(torch.tensor([1.5], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64))
    )
    ref = _quad_kl(1.5, 0.3, lambda w: stats.norm.logpdf(w, 0.5, 2.0))
    assert got.item() == pytest.approx(ref, rel=1e-8)


# ----------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize(
    ("prior", "logpdf"),
    [
        (StudentT(3.0, 0.0, 1.0), lambda w: stats.t.logpdf(w, 3.0, 0.0, 1.0)),
        (StudentT(1.5, 0.5, 0.4), lambda w: stats.t.logpdf(w, 1.5, 0.5, 0.4)),
        (Cauchy(0.0, 1.0), lambda w: stats.cauchy.logpdf(w, 0.0, 1.0)),
        (Cauchy(-0.3, 0.2), lambda w: stats.cauchy.logpdf(w, -0.3, 0.2)),
    ],
)
def test_monte_carlo_kl_converges_to_quadrature(prior, logpdf):
    torch.manual_seed(0)
    mu = torch.tensor([0.0, 1.5, -0.7], dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.5, 1.2], dtype=torch.float64)
    with pytest.raises(NotImplementedError):  # no closed form: the MC path is exercised
        kl_divergence(Normal(mu, sigma), prior)
    reference = sum(
        _quad_kl(m, s, logpdf) for m, s in zip(mu.tolist(), sigma.tolist(), strict=True)
    )
    estimate = Prior(prior).double().kl_from(mu, sigma, num_mc_samples=200_000)
    assert estimate.item() == pytest.approx(reference, rel=0.01)
    estimate = mean_field_kl(mu, sigma, prior, num_mc_samples=200_000)
    assert estimate.item() == pytest.approx(reference, rel=0.01)


def test_monte_carlo_kl_is_unbiased_average_of_single_sample_estimates():
    torch.manual_seed(1)
    mu = torch.tensor([0.2], dtype=torch.float64)
    sigma = torch.tensor([0.4], dtype=torch.float64)
    prior = Cauchy(0.0, 1.0)
    reference = _quad_kl(0.2, 0.4, lambda w: stats.cauchy.logpdf(w, 0.0, 1.0))
    singles = torch.stack([mean_field_kl(mu, sigma, prior, 1) for _ in range(4000)])
    se = singles.std() / math.sqrt(len(singles))
    assert abs(singles.mean().item() - reference) < 5 * se.item()
    assert singles.std() > 0  # really random


def test_monte_carlo_kl_is_differentiable():
    torch.manual_seed(2)
    mu = torch.tensor([0.5, -0.5], dtype=torch.float64, requires_grad=True)
    rho = torch.tensor([-1.0, 0.0], dtype=torch.float64, requires_grad=True)
    value = Prior(StudentT(4.0)).double().kl_from(mu, F.softplus(rho), num_mc_samples=50_000)
    value.backward()
    # d KL / d mu for a symmetric prior centred at 0 pushes mu towards 0: signs follow mu
    assert mu.grad[0] > 0 and mu.grad[1] < 0
    assert torch.isfinite(rho.grad).all() and (rho.grad != 0).all()


# ----------------------------------------------------------------------------- Prior module


def test_prior_buffers_follow_dtype_and_state_dict():
    prior = Prior(Normal(0.5, 2.0))
    assert set(prior.state_dict()) == {"loc", "scale"}
    assert dict(prior.named_buffers())["scale"].item() == 2.0
    prior = prior.to(torch.float64)
    assert prior.loc.dtype == torch.float64 and prior.scale.dtype == torch.float64
    assert prior.distribution().scale.dtype == torch.float64
    other = Prior(Normal(0.0, 1.0)).double()
    other.load_state_dict(prior.state_dict())
    assert other.loc.item() == 0.5 and other.scale.item() == 2.0

    student = Prior(StudentT(3.0, 0.1, 0.5))
    assert set(student.state_dict()) == {"df", "loc", "scale"}
    dist = student.distribution()
    assert isinstance(dist, StudentT)
    assert (dist.df.item(), dist.loc.item(), dist.scale.item()) == pytest.approx((3.0, 0.1, 0.5))


def test_prior_buffers_follow_the_layer():
    layer = BayesianLinear(3, 2, prior=Laplace(0.0, 0.5)).double()
    assert layer.prior.scale.dtype == torch.float64
    assert "prior.scale" in layer.state_dict() and "prior.loc" in layer.state_dict()


def test_prior_from_number_and_default():
    assert isinstance(Prior().distribution(), Normal)
    assert (Prior().loc.item(), Prior().scale.item()) == (0.0, 1.0)
    assert Prior(2.5).scale.item() == 2.5 and Prior(2.5).loc.item() == 0.0
    assert Prior(3).scale.item() == 3.0
    copy = Prior(Prior(Laplace(0.1, 0.2)))
    assert copy.family is Laplace
    assert copy.scale.item() == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (-1.0, ValueError),
        (0.0, ValueError),
        (0, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("normal", TypeError),
        (nn.Linear(2, 2), TypeError),
        (torch.tensor(1.0), TypeError),
        (Normal(0.0, -1.0, validate_args=False), ValueError),
        (Normal(0.0, 0.0, validate_args=False), ValueError),
        (Normal(float("nan"), 1.0, validate_args=False), ValueError),
        (Laplace(0.0, -2.0, validate_args=False), ValueError),
        (Cauchy(0.0, -1.0, validate_args=False), ValueError),
    ],
)
def test_as_distribution_errors_name_the_prior(bad, error):
    with pytest.raises(error, match="prior"):
        as_distribution(bad)
    with pytest.raises(error, match="prior"):
        BayesianLinear(2, 2, prior=bad)


def test_infinite_prior_scale_is_an_error():
    # BUG: a scale of inf passes the `prior > 0` check and gives Normal(0, inf), whose KL is
    # -inf / NaN. An infinite scale is not a valid prior; expected a ValueError naming `prior`.
    with pytest.raises(ValueError, match="prior"):
        as_distribution(float("inf"))


# ----------------------------------------------------------------------------- layer and model KL


def _randomize(layer, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("rho"):
                p.copy_(torch.empty_like(p).uniform_(-3.0, 0.5, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("prior", [Normal(0.0, 1.0), Normal(0.3, 0.2), Laplace(-0.1, 0.7)], ids=str)
def test_bayesian_layer_kl_is_the_sum_over_weight_and_bias(prior):
    layer = BayesianLinear(5, 3, prior=prior).double()
    _randomize(layer, 0)
    loc, scale = prior.loc.double(), prior.scale.double()
    family = type(prior)
    expected = (
        kl_divergence(
            Normal(layer.weight_mu, F.softplus(layer.weight_rho)), family(loc, scale)
        ).sum()
        + kl_divergence(Normal(layer.bias_mu, F.softplus(layer.bias_rho)), family(loc, scale)).sum()
    )
    torch.testing.assert_close(layer.kl, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(layer.layer_kl(), expected, rtol=1e-10, atol=0)
    # the gradients too (a scalar Normal prior takes one closed form over weights and biases)
    params = [layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho]
    for got, want in zip(
        torch.autograd.grad(layer.kl, params), torch.autograd.grad(expected, params), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(layer.kl, params))


def test_model_kl_counts_a_layer_used_twice_once():
    shared = BayesianLinear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Sequential(nn.ReLU(), BayesianLinear(3, 1)))
    torch.testing.assert_close(model_kl(model), shared.layer_kl() + model[3][1].layer_kl())


def test_bayesian_layer_without_bias_kl_covers_weights_only():
    layer = BayesianConv2d(2, 4, 3, bias=False, prior=Normal(0.0, 0.5)).double()
    _randomize(layer, 1)
    expected = kl_divergence(
        Normal(layer.weight_mu, F.softplus(layer.weight_rho)),
        Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)),
    ).sum()
    torch.testing.assert_close(layer.kl, expected, rtol=1e-10, atol=0)


def test_model_kl_sums_over_all_bayesian_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2)
    )
    to_bayesian(model, [0, -1], prior=Normal(0.0, 0.3), posterior_rho_init=-2.0)
    model.double()
    _randomize(model[0], 3)
    _randomize(model[3], 4)
    expected = model[0].kl + model[3].kl
    torch.testing.assert_close(model_kl(model), expected, rtol=1e-12, atol=0)
    # by hand from torch.distributions
    p = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))
    by_hand = sum(
        kl_divergence(Normal(getattr(m, f"{n}_mu"), F.softplus(getattr(m, f"{n}_rho"))), p).sum()
        for m in (model[0], model[3])
        for n in ("weight", "bias")
    )
    torch.testing.assert_close(model_kl(model), by_hand, rtol=1e-6, atol=0)
    # adding another Bayesian layer inside a nested container adds its KL
    model[2][0] = BayesianLinear(8, 8, prior=Normal(0.0, 0.3)).double()
    torch.testing.assert_close(model_kl(model), expected + model[2][0].kl, rtol=1e-12, atol=0)


def test_model_kl_is_zero_for_plain_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    value = model_kl(model)
    assert value.shape == () and value.item() == 0.0
    assert model_kl(nn.ReLU()).item() == 0.0


def test_layer_kl_without_closed_form_uses_num_kl_samples():
    torch.manual_seed(0)
    layer = BayesianLinear(2, 1, prior=StudentT(3.0, 0.0, 0.5), num_kl_samples=200_000).double()
    _randomize(layer, 5)
    mus = torch.cat([layer.weight_mu.flatten(), layer.bias_mu]).tolist()
    sigmas = torch.cat([layer.weight_sigma.flatten(), layer.bias_sigma]).tolist()
    reference = sum(
        _quad_kl(m, s, lambda w: stats.t.logpdf(w, 3.0, 0.0, 0.5))
        for m, s in zip(mus, sigmas, strict=True)
    )
    assert layer.kl.item() == pytest.approx(reference, rel=0.01)
    # one sample per KL: noisy, but unbiased and still finite
    layer.num_kl_samples = 1
    values = torch.stack([layer.kl.detach() for _ in range(5)])
    assert torch.isfinite(values).all() and values.std() > 0
