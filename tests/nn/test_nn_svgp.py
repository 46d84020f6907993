"""The sparse variational GP layer (``uq_box.nn.svgp``): exact GP regression at M = N, the KL,
the marginals, the ELBO's optimum and gradient, the kernels, k-means and the initialization."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from uq_box.nn.svgp import GaussianLikelihood, SparseVariationalGP, kmeans


def _layer(x, out_features=1, kernel="rbf", jitter=0.0, lengthscale=0.8, outputscale=1.3):
    gp = SparseVariationalGP(
        x.shape[1], out_features, num_inducing=len(x), kernel=kernel, jitter=jitter
    ).double()
    with torch.no_grad():
        gp.inducing_points.copy_(x)
    gp.set_lengthscale(lengthscale)
    gp.set_outputscale(outputscale)
    return gp


def _rbf(a, b, lengthscale, outputscale):
    return outputscale * torch.exp(-0.5 * torch.cdist(a, b).square() / lengthscale**2)


@pytest.mark.parametrize("kernel", ["rbf", "matern52"])
def test_m_equals_n_at_the_optimum_is_exact_gp_regression(kernel):
    """Inducing points at the N training inputs and the Gaussian likelihood's optimal q:
    the predictive marginals equal exact GP regression (float64, 1e-6)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(-3, 3, 12, dtype=torch.float64)[:, None]
    x = torch.cat([x, torch.rand(12, 1, generator=generator, dtype=torch.float64)], 1)
    y = torch.sin(2 * x[:, :1]) + 0.1 * torch.randn(12, 1, generator=generator, dtype=torch.float64)
    noise = 0.05
    gp = _layer(x, kernel=kernel)
    with torch.no_grad():
        gp.mean_constant.fill_(0.3)
    gp.set_optimal_variational(x, y, noise)
    x_new = torch.randn(20, 2, generator=generator, dtype=torch.float64) * 2
    mean, var = gp.marginals(x_new)
    # exact GP regression with the same kernel and constant mean
    k = gp.kernel(x, x)[0]
    k_star = gp.kernel(x_new, x)[0]
    if kernel == "rbf":  # the layer's kernel itself, checked against the formula
        torch.testing.assert_close(k, _rbf(x, x, 0.8, 1.3))
    system = k + noise * torch.eye(len(x), dtype=torch.float64)
    exact_mean = 0.3 + k_star @ torch.linalg.solve(system, y - 0.3)
    exact_var = 1.3 - (k_star * torch.linalg.solve(system, k_star.T).T).sum(-1)
    torch.testing.assert_close(mean, exact_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(var[:, 0], exact_var, rtol=0, atol=1e-6)


def _elbo(gp, likelihood, x, y):
    mean, var = gp.marginals(x)
    return likelihood.expected_log_prob(mean, var, y).sum() - gp.kl_divergence()


def test_the_elbo_gradient_vanishes_at_the_closed_form_optimum():
    """The closed-form expected log-likelihood and KL agree with the known optimum (M < N)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(40, 2, generator=generator, dtype=torch.float64)
    gp = _layer(x[:7], out_features=2, jitter=1e-8)
    likelihood = GaussianLikelihood(num_targets=2, noise=0.2).double()
    gp.set_optimal_variational(x, y, likelihood.noise.detach())
    elbo = _elbo(gp, likelihood, x, y)
    grad_m, grad_l = torch.autograd.grad(elbo, [gp.variational_mean, gp.variational_tril])
    assert float(grad_m.abs().max()) < 1e-8
    assert float(torch.tril(grad_l).abs().max()) < 1e-8
    with torch.no_grad():  # any other q is worse
        gp.variational_mean.add_(0.01)
    assert _elbo(gp, likelihood, x, y).item() < elbo.item()


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    gp = SparseVariationalGP(3, 4, num_inducing=5).double()
    with torch.no_grad():
        gp.variational_mean.normal_()
        tril = torch.randn(4, 5, 5, dtype=torch.float64)
        tril.diagonal(dim1=-2, dim2=-1).abs_().add_(0.1)
        gp.variational_tril.copy_(tril)
    prior = MultivariateNormal(torch.zeros(5, dtype=torch.float64), torch.eye(5).double())
    expected = sum(
        kl_divergence(
            MultivariateNormal(gp.variational_mean[o], scale_tril=gp.scale_tril[o]), prior
        )
        for o in range(4)
    )
    torch.testing.assert_close(gp.kl_divergence(), expected)
    # at initialization q is the prior
    assert SparseVariationalGP(3, 2, num_inducing=5).kl_divergence().item() == 0.0


def test_marginals_are_those_of_the_whitened_joint():
    """mean = c + a^T m, var = k - a^T a + a^T S a against the dense joint Gaussian."""
    torch.manual_seed(0)
    gp = SparseVariationalGP(2, 1, num_inducing=6, kernel="matern32").double()
    with torch.no_grad():
        gp.variational_mean.normal_()
        gp.variational_tril.copy_(torch.tril(torch.randn(1, 6, 6)).double())
    h = torch.randn(9, 2, dtype=torch.float64)
    mean, var = gp.marginals(h)
    z = gp.inducing_points
    kzz = gp.kernel(z, z)[0] + 1e-6 * gp.outputscale[0] * torch.eye(6, dtype=torch.float64)
    kxz = gp.kernel(h, z)[0]
    lz = torch.linalg.cholesky(kzz)
    u_mean = lz @ gp.variational_mean[0]
    u_cov = lz @ gp.scale_tril[0] @ gp.scale_tril[0].T @ lz.T
    proj = kxz @ torch.linalg.inv(kzz)
    torch.testing.assert_close(mean[:, 0], proj @ u_mean)
    dense = gp.kernel(h, h)[0] - proj @ kxz.T + proj @ u_cov @ proj.T
    torch.testing.assert_close(var[:, 0], dense.diagonal())
    # far from the inducing points the marginal is the prior's
    far_mean, far_var = gp.marginals(torch.full((1, 2), 100.0, dtype=torch.float64))
    torch.testing.assert_close(far_var, gp.outputscale[None])
    torch.testing.assert_close(far_mean, torch.zeros(1, 1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kernel", "formula"),
    [
        ("matern12", lambda r: torch.exp(-r)),
        ("matern32", lambda r: (1 + math.sqrt(3) * r) * torch.exp(-math.sqrt(3) * r)),
        (
            "matern52",
            lambda r: (1 + math.sqrt(5) * r + 5 * r**2 / 3) * torch.exp(-math.sqrt(5) * r),
        ),
    ],
)
def test_matern_kernels(kernel, formula):
    gp = SparseVariationalGP(2, 1, num_inducing=3, kernel=kernel).double()
    gp.set_lengthscale(0.7)
    a, b = torch.randn(4, 2).double(), torch.randn(5, 2).double()
    torch.testing.assert_close(gp.kernel(a, b)[0], formula(torch.cdist(a, b) / 0.7))


def test_elbo_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    gp = SparseVariationalGP(3, 2, num_inducing=4)
    likelihood = GaussianLikelihood(num_targets=2)
    h = torch.randn(10, 3, requires_grad=True)
    with torch.no_grad():
        gp.variational_mean.normal_()
    loss = -_elbo(gp, likelihood, h, torch.randn(10, 2))
    loss.backward()
    for name, p in [*gp.named_parameters(), *likelihood.named_parameters(), ("h", h)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().sum()) > 0, name


def test_kmeans_and_initialize():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centres[:, None] + 0.1 * torch.randn(3, 50, 2, generator=generator)).reshape(-1, 2)
    found = kmeans(points, 3, generator=torch.Generator().manual_seed(1))
    order = found[:, 0] * 2 + found[:, 1]  # (0,0), (0,10), (10,0)
    torch.testing.assert_close(found[order.argsort()], centres[[0, 2, 1]], atol=0.05, rtol=0)
    gp = SparseVariationalGP(2, 2, num_inducing=3)
    assert not gp.initialized
    gp.initialize(points, generator=torch.Generator().manual_seed(1))
    assert gp.initialized
    torch.testing.assert_close(gp.inducing_points, found)
    torch.testing.assert_close(gp.lengthscale, torch.pdist(points).mean().expand(2))
    with pytest.raises(ValueError, match="at least as many"):
        SparseVariationalGP(2, 1, num_inducing=20).initialize(points[:5])
    with pytest.raises(ValueError, match=r"features \[N, 2\]"):
        gp.marginals(torch.randn(4, 3))
    with pytest.raises(ValueError, match="`kernel`"):
        SparseVariationalGP(2, 1, kernel="periodic")


def test_cholesky_inside_vmap_takes_the_jitter_the_retries_take():
    """Inside ``torch.func.vmap`` (stacked runs) the factor of ``K(Z, Z)`` is the one the
    sequential retries find, per member: coincident inducing points need a larger jitter."""
    torch.manual_seed(0)
    gp = SparseVariationalGP(2, 1, num_inducing=3, jitter=1e-9)
    spread = torch.randn(3, 2)
    coincident = torch.ones(3, 2)
    expected = []
    for z in (spread, coincident):
        with torch.no_grad():
            gp.inducing_points.copy_(z)
        expected.append(gp.inducing_cholesky())

    kzz = gp.kernel(coincident, coincident)
    assert torch.linalg.cholesky_ex(kzz + 1e-9 * torch.eye(3)).info.item() > 0  # retries needed

    def cholesky(z):
        with torch.nn.utils.stateless._reparametrize_module(gp, {"inducing_points": z}):
            return gp.inducing_cholesky()

    got = torch.func.vmap(cholesky)(torch.stack([spread, coincident]))
    torch.testing.assert_close(got, torch.stack(expected))
