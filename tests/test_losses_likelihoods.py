"""The likelihood families of uq_box.losses: densities against torch.distributions, closed-form
moments, beta-NLL's weights, and the bad inputs (each a clear error naming the argument)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D  # noqa: N812

from uq_box.losses import (
    NLL,
    GaussianMixtureNLL,
    LaplaceNLL,
    LogNormalNLL,
    NormalInverseGammaNLL,
    StudentTNLL,
)


def _outputs(width: int, targets: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, width * targets, generator=generator, dtype=torch.float64)


TARGET = torch.linspace(-1.5, 2.0, 10, dtype=torch.float64).reshape(5, 2)


def test_gaussian_log_prob_is_the_normal_density_and_the_loss():
    criterion = NLL()
    outputs = _outputs(2)
    mean, std = criterion.mean_and_std(outputs)
    expected = D.Normal(mean, std).log_prob(TARGET)
    torch.testing.assert_close(criterion.log_prob(outputs, TARGET), expected)
    torch.testing.assert_close(criterion(outputs, TARGET), -expected.mean())


@pytest.mark.parametrize("df", [None, 3.0])
def test_student_t_density_and_moments(df):
    criterion = StudentTNLL(df=df)
    assert criterion.num_outputs == (3 if df is None else 2)
    outputs = _outputs(criterion.num_outputs)
    loc, scale, dof = criterion.parameters_of(outputs)
    dist = D.StudentT(dof, loc, scale)
    torch.testing.assert_close(criterion.log_prob(outputs, TARGET), dist.log_prob(TARGET))
    mean, std = criterion.mean_and_std(outputs)
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(std, dist.stddev)
    if df is None:
        assert (dof > criterion.min_df).all()


def test_laplace_density_and_moments():
    criterion = LaplaceNLL()
    outputs = _outputs(2)
    loc, scale = criterion.parameters_of(outputs)
    dist = D.Laplace(loc, scale)
    torch.testing.assert_close(criterion.log_prob(outputs, TARGET), dist.log_prob(TARGET))
    mean, std = criterion.mean_and_std(outputs)
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(std, dist.stddev)


def test_log_normal_density_and_moments():
    criterion = LogNormalNLL()
    outputs = _outputs(2)
    target = TARGET.abs() + 0.1
    mu, sigma = criterion.parameters_of(outputs)
    dist = D.LogNormal(mu, sigma)
    torch.testing.assert_close(criterion.log_prob(outputs, target), dist.log_prob(target))
    mean, std = criterion.mean_and_std(outputs)
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(std, dist.stddev)


def test_gaussian_mixture_density_and_moments():
    criterion = GaussianMixtureNLL(num_components=3)
    assert criterion.num_outputs == 9
    outputs = _outputs(9)
    log_weights, means, stds = criterion.components(outputs)
    dist = D.MixtureSameFamily(D.Categorical(logits=log_weights), D.Normal(means, stds))
    torch.testing.assert_close(criterion.log_prob(outputs, TARGET), dist.log_prob(TARGET))
    mean, std = criterion.mean_and_std(outputs)
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(std, dist.stddev)
    # one component is the Gaussian NLL
    single = GaussianMixtureNLL(num_components=1)
    out = _outputs(3)
    gaussian = NLL()
    as_gaussian = torch.stack([out[..., 1::3], out[..., 2::3]], -1).flatten(-2)
    torch.testing.assert_close(single.log_prob(out, TARGET), gaussian.log_prob(as_gaussian, TARGET))


def test_normal_inverse_gamma_matches_amini_and_splits_the_variance():
    criterion = NormalInverseGammaNLL(coeff=0.0)
    outputs = _outputs(4)
    gamma, nu, alpha, beta = criterion.parameters_of(outputs)
    omega = 2.0 * beta * (1.0 + nu)
    amini = (  # Amini et al. 2020, eq. 8
        0.5 * torch.log(math.pi / nu)
        - alpha * torch.log(omega)
        + (alpha + 0.5) * torch.log((TARGET - gamma) ** 2 * nu + omega)
        + torch.lgamma(alpha)
        - torch.lgamma(alpha + 0.5)
    )
    torch.testing.assert_close(-criterion.log_prob(outputs, TARGET), amini)
    student = D.StudentT(2 * alpha, gamma, torch.sqrt(beta * (1 + nu) / (nu * alpha)))
    torch.testing.assert_close(criterion.log_prob(outputs, TARGET), student.log_prob(TARGET))
    aleatoric, epistemic = criterion.variance_split(outputs)
    torch.testing.assert_close(aleatoric, beta / (alpha - 1))
    torch.testing.assert_close(epistemic, beta / (nu * (alpha - 1)))
    mean, std = criterion.mean_and_std(outputs)
    torch.testing.assert_close(mean, gamma)
    torch.testing.assert_close(std**2, aleatoric + epistemic)
    torch.testing.assert_close(std, student.stddev)
    # the evidence regularizer: lambda |y - gamma| (2 nu + alpha)
    regularized = NormalInverseGammaNLL(coeff=0.5)(outputs, TARGET)
    extra = 0.5 * ((TARGET - gamma).abs() * (2 * nu + alpha)).mean()
    torch.testing.assert_close(regularized, amini.mean() + extra)


def test_normal_inverse_gamma_grid_step_widens_the_student_t():
    """With a grid step the marginal's scale is ``sqrt(scale² + Δ² / 12)`` and the rounding
    variance joins the aleatoric part: the split still sums to the Student-t's variance."""
    outputs, step = _outputs(4), 0.7
    plain, rounded = NormalInverseGammaNLL(), NormalInverseGammaNLL(resolution=step)
    gamma, nu, alpha, beta = plain.parameters_of(outputs)
    scale = torch.sqrt(beta * (1 + nu) / (nu * alpha) + step**2 / 12)
    student = D.StudentT(2 * alpha, gamma, scale)
    torch.testing.assert_close(rounded.log_prob(outputs, TARGET), student.log_prob(TARGET))
    mean, std = rounded.mean_and_std(outputs)
    torch.testing.assert_close(std, student.stddev)
    aleatoric, epistemic = rounded.variance_split(outputs)
    torch.testing.assert_close(epistemic, plain.variance_split(outputs)[1])
    torch.testing.assert_close(aleatoric + epistemic, std**2)
    assert (std > plain.mean_and_std(outputs)[1]).all()
    # the rounding error bounds the density of a point prediction from above
    assert rounded.log_prob(outputs, gamma).max() < plain.log_prob(outputs, gamma).max()
    with pytest.raises(ValueError, match="`resolution`"):
        NormalInverseGammaNLL(resolution=-1.0)


def test_beta_nll_weights_each_point_by_its_detached_variance():
    outputs = _outputs(2).requires_grad_(True)
    mean, std = NLL().mean_and_std(outputs)
    plain = 0.5 * math.log(2 * math.pi) + std.log() + 0.5 * ((TARGET - mean) / std) ** 2
    loss = NLL(beta=0.5)(outputs, TARGET)
    torch.testing.assert_close(loss, (plain * std.detach()).mean())
    # beta = 1: the mean's gradient is the MSE's (the variance weight carries no gradient)
    (grad,) = torch.autograd.grad(NLL(beta=1.0)(outputs, TARGET), outputs)
    (mse_grad,) = torch.autograd.grad(0.5 * ((mean - TARGET) ** 2).mean(), outputs)
    torch.testing.assert_close(grad[..., 0::2], mse_grad[..., 0::2])
    assert NLL(beta=0.5).log_prob(outputs, TARGET).allclose(NLL().log_prob(outputs, TARGET))


@pytest.mark.parametrize(
    ("build", "parts"),
    [
        (lambda: GaussianMixtureNLL(num_components=0), ("`num_components`", "got 0")),
        (lambda: StudentTNLL(df=2.0), ("`df`", "2")),
        (lambda: StudentTNLL(min_df=1.5), ("`min_df`",)),
        (lambda: NLL(beta=1.5), ("`beta`",)),
        (lambda: NormalInverseGammaNLL(coeff=-1.0), ("`coeff`",)),
    ],
)
def test_bad_arguments_name_the_argument(build, parts):
    with pytest.raises(ValueError) as info:
        build()
    for part in parts:
        assert part in str(info.value)


def test_log_normal_refuses_non_positive_targets():
    with pytest.raises(ValueError, match=r"positive targets.*got a target of -1.5.*`criterion`"):
        LogNormalNLL()(_outputs(2), TARGET)


@pytest.mark.parametrize(
    ("criterion", "width"),
    [
        (StudentTNLL(), 4),
        (LaplaceNLL(), 3),
        (GaussianMixtureNLL(num_components=2), 5),
        (NormalInverseGammaNLL(), 6),
    ],
)
def test_an_output_width_that_does_not_fit_the_family_is_an_error(criterion, width):
    outputs = torch.zeros(1, 4, width)
    with pytest.raises(ValueError, match=r"gives .* outputs per point.*`n_outputs`"):
        criterion(outputs, torch.zeros(4, 1))


def test_cdfs_for_quantiles_match_torch_distributions():
    value = TARGET.abs() + 0.1
    laplace, log_normal, mixture = LaplaceNLL(), LogNormalNLL(), GaussianMixtureNLL(3)
    out2, out9 = _outputs(2), _outputs(9)
    torch.testing.assert_close(
        laplace.cdf(out2, TARGET), D.Laplace(*laplace.parameters_of(out2)).cdf(TARGET)
    )
    torch.testing.assert_close(
        log_normal.cdf(out2, value), D.LogNormal(*log_normal.parameters_of(out2)).cdf(value)
    )
    assert (log_normal.cdf(out2, -value) == 0).all()
    log_weights, means, stds = mixture.components(out9)
    dist = D.MixtureSameFamily(D.Categorical(logits=log_weights), D.Normal(means, stds))
    torch.testing.assert_close(mixture.cdf(out9, TARGET), dist.cdf(TARGET))
