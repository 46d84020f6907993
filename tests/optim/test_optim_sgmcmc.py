"""The SG-MCMC samplers by numbers.

- one step of SGLD and pSGLD is exactly the documented update;
- SGLD, pSGLD and SGHMC recover the closed-form posterior of Bayesian linear regression (known
  noise, Gaussian prior) when the loss is the negative log posterior summed over the data, and
  clearly miss it with the mean loss (so the test can fail);
- pSGLD with a preconditioner fixed after burn-in matches the mean and covariance of a correlated
  2-D Gaussian; adapting for ever (the paper) inflates the covariance by a bounded amount;
- argument errors, the closure, ``adapting``, state dict round trips.

Many independent chains run as one tensor ``[C, D]`` (``U`` summed over chains: the chains do not
interact), so Monte Carlo errors come from between-chain spread and the tests take a second each.
"""

import io
import math

import pytest
import torch

from uq_box.optim import SGHMC, SGLD, SGMCMCOptimizer


# -- 1. the update formulas ------------------------------------------------------------------
def test_sgld_step_is_the_langevin_update():
    theta0 = torch.tensor([0.5, -1.0, 2.0])
    grad = torch.tensor([3.0, -0.5, 0.25])
    p = torch.nn.Parameter(theta0.clone())
    opt = SGLD([p], lr=0.04)
    p.grad = grad.clone()
    torch.manual_seed(0)
    opt.step()
    torch.manual_seed(0)
    xi = torch.randn(3)
    torch.testing.assert_close(p.detach(), theta0 - 0.02 * grad + 0.2 * xi)
    assert not opt.adapting


def test_psgld_steps_are_the_preconditioned_update():
    theta0 = torch.tensor([0.5, -1.0])
    g1, g2 = torch.tensor([3.0, -0.5]), torch.tensor([1.0, 2.0])
    p = torch.nn.Parameter(theta0.clone())
    opt = SGLD([p], lr=0.01, preconditioned=True, alpha=0.9, eps=1e-3, num_burn_in_steps=2)
    torch.manual_seed(0)
    p.grad = g1.clone()
    opt.step()
    assert opt.adapting  # one of its two adaptation steps done
    p.grad = g2.clone()
    opt.step()
    assert not opt.adapting
    torch.manual_seed(0)
    xi1, xi2 = torch.randn(2), torch.randn(2)
    v1 = g1**2  # V starts at the first squared gradient
    precond1 = 1 / (1e-3 + v1.sqrt())
    theta1 = theta0 - 0.005 * precond1 * g1 + (0.01 * precond1).sqrt() * xi1
    v2 = 0.9 * v1 + 0.1 * g2**2
    precond2 = 1 / (1e-3 + v2.sqrt())
    theta2 = theta1 - 0.005 * precond2 * g2 + (0.01 * precond2).sqrt() * xi2
    torch.testing.assert_close(p.detach(), theta2)
    # after burn-in V stays fixed
    p.grad = torch.tensor([100.0, 100.0])
    opt.step()
    torch.testing.assert_close(opt.state[p]["square_avg"], v2)


def test_closure_and_missing_gradients():
    p = torch.nn.Parameter(torch.ones(2))
    q = torch.nn.Parameter(torch.ones(2))  # never gets a gradient: left alone
    for opt in (SGLD([p, q], lr=1e-3), SGHMC([p, q], lr=1e-2)):

        def closure(opt=opt):
            opt.zero_grad()
            loss = (p**2).sum()
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.item() > 0
        assert torch.equal(q.detach(), torch.ones(2))
        assert isinstance(opt, SGMCMCOptimizer)


# -- 2. Bayesian linear regression: the exact posterior ----------------------------------------
N, SIGMA, PRIOR_STD = 100, 0.5, 1.0


@pytest.fixture(scope="module")
def linear_regression():
    """Data and the closed-form posterior ``N(mean, cov)`` of the weights (slope, intercept)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=generator, dtype=torch.float64)
    features = torch.stack([x, torch.ones_like(x)], dim=1)
    y = features @ torch.tensor([1.5, -0.5], dtype=torch.float64)
    y = y + SIGMA * torch.randn(N, generator=generator, dtype=torch.float64)
    precision = features.T @ features / SIGMA**2 + torch.eye(2, dtype=torch.float64) / PRIOR_STD**2
    cov = torch.linalg.inv(precision)
    mean = cov @ features.T @ y / SIGMA**2
    return features, y, mean, cov


def run_chains(make_sampler, features, y, *, scaling="sum", batch_size=None, seed=1):
    """500 chains from ``w = 0``; 1100 burn-in steps, then a sample every 10 of 600 steps.

    ``U = N * mean NLL - log prior`` (the documented convention) with ``scaling="sum"``; the common
    mistake ``mean NLL - log prior / N`` with ``scaling="mean"``. Returns samples ``[T, C, 2]``.
    """
    torch.manual_seed(seed)
    weights = torch.zeros(500, 2, dtype=torch.float64, requires_grad=True)
    sampler = make_sampler([weights])
    kept = []
    for step in range(1700):
        sampler.zero_grad()
        if batch_size is None:
            residuals = y - weights @ features.T  # [C, N]
        else:  # every chain its own minibatch (drawn with replacement), so chains stay independent
            index = torch.randint(N, (len(weights), batch_size))
            residuals = y[index] - (features[index] * weights.unsqueeze(1)).sum(-1)
        mean_nll = (0.5 * (residuals / SIGMA) ** 2).mean(1)  # per chain
        neg_log_prior = 0.5 * (weights**2).sum(1) / PRIOR_STD**2
        if scaling == "sum":
            potential = N * mean_nll + neg_log_prior
        else:
            potential = mean_nll + neg_log_prior / N
        potential.sum().backward()
        sampler.step()
        if step >= 1100 and step % 10 == 0:
            kept.append(weights.detach().clone())
    return torch.stack(kept)


def posterior_errors(samples, mean, cov):
    """(mean error in posterior stds, std ratio, correlation error, Monte Carlo std error)."""
    flat = samples.reshape(-1, 2)
    std = cov.diagonal().sqrt()
    # chains are independent: the spread of the chain means gives the Monte Carlo error
    mc_error = samples.mean(0).std(0) / math.sqrt(samples.shape[1]) / std
    corr = torch.corrcoef(flat.T)[0, 1]
    exact_corr = cov[0, 1] / (std[0] * std[1])
    return (flat.mean(0) - mean) / std, flat.std(0) / std, corr - exact_corr, mc_error


SAMPLERS = {
    "sgld": (lambda p: SGLD(p, lr=1e-4), None),
    "sgld_minibatch": (lambda p: SGLD(p, lr=1e-4), 20),
    "psgld": (lambda p: SGLD(p, lr=1e-2, preconditioned=True, num_burn_in_steps=700), None),
    "sghmc": (lambda p: SGHMC(p, lr=1e-2, num_burn_in_steps=700), None),
    "sghmc_minibatch": (lambda p: SGHMC(p, lr=1e-2, num_burn_in_steps=700), 20),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_recovers_the_bayesian_linear_regression_posterior(name, linear_regression):
    features, y, mean, cov = linear_regression
    make_sampler, batch_size = SAMPLERS[name]
    samples = run_chains(make_sampler, features, y, batch_size=batch_size)
    mean_error, std_ratio, corr_error, mc_error = posterior_errors(samples, mean, cov)
    # the posterior is narrow (std ~0.05) and the chains start 30 stds away: burn-in is real
    assert (mean.abs() / cov.diagonal().sqrt() > 10).any()
    assert (mc_error < 0.03).all(), mc_error  # enough effective samples for the checks below
    assert (mean_error.abs() < 0.15).all(), mean_error  # 5 Monte Carlo errors
    assert ((std_ratio - 1).abs() < 0.07).all(), std_ratio  # MC error ~2% + step-size bias
    assert corr_error.abs() < 0.05, corr_error


@pytest.mark.parametrize("name", ["sgld_minibatch", "sghmc_minibatch"])
def test_mean_loss_scaling_misses_the_posterior(name, linear_regression):
    """The check above fails when the loss is the mean NLL: the chains are ~sqrt(N) too wide."""
    features, y, mean, cov = linear_regression
    make_sampler, batch_size = SAMPLERS[name]
    samples = run_chains(make_sampler, features, y, scaling="mean", batch_size=batch_size)
    _, std_ratio, _, _ = posterior_errors(samples, mean, cov)
    assert (std_ratio > 3).all(), std_ratio


# -- 3. pSGLD on a correlated 2-D Gaussian -------------------------------------------------------
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SCALES = torch.tensor([1.0, 0.1], dtype=torch.float64)
SIGMA_2D = torch.outer(SCALES, SCALES) * torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)


def run_gaussian(sampler_kwargs, seed=0):
    """500 pSGLD chains on ``U = (theta - mu)^T Sigma^-1 (theta - mu) / 2``; samples ``[T, C, 2]``."""
    torch.manual_seed(seed)
    precision = torch.linalg.inv(SIGMA_2D)
    theta = torch.zeros(500, 2, dtype=torch.float64, requires_grad=True)
    sampler = SGLD([theta], lr=0.02, preconditioned=True, **sampler_kwargs)
    kept = []
    for step in range(3000):
        sampler.zero_grad()
        centered = theta - MU
        (0.5 * ((centered @ precision) * centered).sum()).backward()
        sampler.step()
        if step >= 1500 and step % 5 == 0:
            kept.append(theta.detach().clone())
    return torch.stack(kept)


def test_psgld_matches_a_correlated_gaussian():
    samples = run_gaussian({"num_burn_in_steps": 1000})
    flat = samples.reshape(-1, 2)
    mc_error = samples.mean(0).std(0) / math.sqrt(samples.shape[1]) / SCALES
    assert (mc_error < 0.03).all(), mc_error
    assert (((flat.mean(0) - MU) / SCALES).abs() < 0.12).all(), flat.mean(0)
    ratio = torch.cov(flat.T) / SIGMA_2D  # every entry, the covariance included
    assert ((ratio - 1).abs() < 0.1).all(), ratio


def test_psgld_adapting_for_ever_is_biased_but_bounded():
    """The paper's pSGLD (``V`` adapts at every step, ``Gamma`` dropped): documented bias."""
    samples = run_gaussian({})
    flat = samples.reshape(-1, 2)
    assert (((flat.mean(0) - MU) / SCALES).abs() < 0.12).all(), flat.mean(0)
    ratio = torch.cov(flat.T) / SIGMA_2D
    assert ((ratio > 1.03) & (ratio < 1.25)).all(), ratio


# -- 4. state and errors ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda p: SGLD(p, lr=1e-3, preconditioned=True),
        lambda p: SGHMC(p, lr=1e-2, num_burn_in_steps=3),
    ],
    ids=["psgld", "sghmc"],
)
def test_state_dict_round_trip_continues_the_chain(make):
    def steps(opt, p, n):
        for _ in range(n):
            opt.zero_grad()
            (p**2).sum().backward()
            opt.step()

    p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    opt = make([p])
    steps(opt, p, 4)
    q = torch.nn.Parameter(p.detach().clone())
    copy = make([q])
    buffer = io.BytesIO()  # as through a checkpoint: torch shares in-memory state tensors
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copy.load_state_dict(torch.load(buffer))
    torch.manual_seed(3)
    steps(opt, p, 3)
    torch.manual_seed(3)
    steps(copy, q, 3)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_sghmc_adapts_only_during_burn_in():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SGHMC([p], lr=1e-2, num_burn_in_steps=2)
    for step in range(4):
        assert opt.adapting == (step < 2)
        opt.zero_grad()
        (3 * p.sum()).backward()
        opt.step()
        if step == 1:
            frozen = opt.state[p]["v_hat"].clone()
    torch.testing.assert_close(opt.state[p]["v_hat"], frozen, rtol=0, atol=0)
    assert opt.state[p]["step"] == 4


def test_argument_errors():
    p = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match="`lr`"):
        SGLD(p, lr=0.0)
    with pytest.raises(TypeError, match="`lr`"):
        SGLD(p, lr="big")
    with pytest.raises(ValueError, match="`alpha`"):
        SGLD(p, lr=1e-3, alpha=1.0)
    with pytest.raises(ValueError, match="`eps`"):
        SGLD(p, lr=1e-3, eps=-1.0)
    with pytest.raises(TypeError, match="`preconditioned`"):
        SGLD(p, lr=1e-3, preconditioned="yes")
    with pytest.raises(ValueError, match="`num_burn_in_steps`"):
        SGLD(p, lr=1e-3, num_burn_in_steps=-1)
    with pytest.raises(ValueError, match="`mdecay`"):
        SGHMC(p, mdecay=0.0)
    with pytest.raises(ValueError, match="`num_burn_in_steps`"):
        SGHMC(p, num_burn_in_steps=None)
    SGHMC(p, mdecay=1.0)  # the closed end
