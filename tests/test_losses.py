"""Numbers of the losses: Gaussian NLL (learned and fixed std), MSE and the ELBO."""

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning import seed_everything
from torch.distributions import Normal

from uq_box.losses import MSE, NLL, elbo_loss, gaussian_nll_loss, softplus_std


def test_nll_heteroscedastic_matches_torch_normal_log_prob():
    seed_everything(0)
    outputs = torch.randn(7, 13, 2, dtype=torch.float64) * 2.0  # [S, N, (mean, scale)]
    target = torch.randn(13, 1, dtype=torch.float64)
    criterion = NLL()
    assert criterion.num_outputs == 2

    std = F.softplus(outputs[..., 1:2]) + 1e-6
    expected = -Normal(outputs[..., :1], std).log_prob(target).mean()
    torch.testing.assert_close(criterion(outputs, target), expected, rtol=1e-12, atol=1e-12)

    mean, got_std = criterion.mean_and_std(outputs)
    assert mean.shape == got_std.shape == (7, 13, 1)
    torch.testing.assert_close(mean, outputs[..., :1])
    torch.testing.assert_close(got_std, std)


def test_nll_min_std_floor():
    outputs = torch.tensor([[0.0, -1e4]])  # softplus(-1e4) == 0: the std is the floor alone
    target = torch.tensor([[0.01]])
    criterion = NLL(min_std=0.1)
    _, std = criterion.mean_and_std(outputs)
    torch.testing.assert_close(std, torch.tensor([[0.1]]))
    expected = -Normal(0.0, 0.1).log_prob(torch.tensor(0.01))
    torch.testing.assert_close(criterion(outputs, target), expected)


def test_nll_fixed_std_one_output_and_value():
    seed_everything(1)
    criterion = NLL(std=0.3)
    assert criterion.num_outputs == 1
    outputs = torch.randn(5, 11, 1)
    target = torch.randn(11, 1)
    expected = -Normal(outputs, 0.3).log_prob(target).mean()
    torch.testing.assert_close(criterion(outputs, target), expected)
    # by hand: 0.5 log(2 pi) + log(sigma) + (y - m)^2 / (2 sigma^2)
    by_hand = (
        0.5 * math.log(2 * math.pi) + math.log(0.3) + (target - outputs) ** 2 / (2 * 0.09)
    ).mean()
    torch.testing.assert_close(criterion(outputs, target), by_hand)
    mean, std = criterion.mean_and_std(outputs)
    torch.testing.assert_close(mean, outputs)
    torch.testing.assert_close(std, torch.full_like(outputs, 0.3))


@pytest.mark.parametrize("kwargs", [{"std": 0.0}, {"std": -1.0}, {"min_std": -1e-3}])
def test_nll_rejects_bad_arguments(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}`"):
        NLL(**kwargs)


def test_gaussian_nll_loss_and_softplus_std():
    mean, std, y = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)
    expected = 0.5 * math.log(2 * math.pi) + math.log(2.0) + 0.5 * (3.0 / 2.0) ** 2
    torch.testing.assert_close(gaussian_nll_loss(mean, std, y), torch.tensor(expected))
    raw = torch.tensor([-3.0, 0.0, 5.0])
    torch.testing.assert_close(softplus_std(raw, 0.01), torch.log1p(torch.exp(raw)) + 0.01)


def test_mse_value_and_outputs():
    seed_everything(2)
    criterion = MSE()
    assert criterion.num_outputs == 1
    outputs = torch.randn(4, 9, 1)
    target = torch.randn(9, 1)
    torch.testing.assert_close(
        criterion(outputs, target), ((outputs - target[None]) ** 2).sum() / outputs.numel()
    )
    mean, std = criterion.mean_and_std(outputs)
    assert mean is outputs and std is None
    assert criterion(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]])).item() == 2.5


def test_elbo_loss_scaling():
    data_nll, kl = torch.tensor(1.25), torch.tensor(40.0)
    torch.testing.assert_close(elbo_loss(data_nll, kl, 200), torch.tensor(1.25 + 40.0 / 200))
    torch.testing.assert_close(
        elbo_loss(data_nll, kl, 200, beta=0.5), torch.tensor(1.25 + 0.5 * 40.0 / 200)
    )
    torch.testing.assert_close(elbo_loss(data_nll, kl, 10, beta=0.0), data_nll)
    # N * loss is the full-data negative ELBO: N * mean NLL + KL
    torch.testing.assert_close(200 * elbo_loss(data_nll, kl, 200), 200 * data_nll + kl)


def test_nll_resolution_adds_the_rounding_variance():
    """Targets on a grid of step d: std^2 + d^2 / 12, so the std never falls below d / sqrt(12)."""
    from uq_box.datamodules import target_resolution

    criterion = NLL(resolution=2.0)
    raw = torch.tensor([[0.3, -50.0], [0.0, 1.0]])
    _, std = criterion.mean_and_std(raw)
    learned = torch.nn.functional.softplus(raw[:, 1:]) + 1e-6
    torch.testing.assert_close(std, (learned**2 + 4.0 / 12).sqrt())
    assert std.min() >= 2.0 / 12**0.5 - 1e-6
    assert NLL().mean_and_std(raw)[1][0] < 1e-5  # collapses without it
    with pytest.raises(ValueError, match="`resolution`"):
        NLL(resolution=-1.0)
    # the grid step of integer scores; continuous or finely recorded targets give 0
    assert target_resolution([3, 5, 6, 5, 8]) == 1.0
    assert target_resolution([0.5, 1.0, 2.5, 1.5]) == 0.5
    assert target_resolution(torch.randn(200).numpy()) == 0.0
    assert target_resolution([10.001, 10.002, 12.0, 15.0]) == 0.0  # 0.001 << std
    assert target_resolution([1.0, 1.0]) == 0.0


def test_student_t_and_mixture_scales_carry_the_rounding_variance():
    from uq_box.losses import GaussianMixtureNLL, StudentTNLL

    step = 1.0
    # (loc, raw scale) pairs of 3 targets; softplus(-30) is ~1e-13, a collapsed scale
    outputs = torch.stack([torch.zeros(4, 3), torch.full((4, 3), -30.0)], -1).reshape(4, 6)
    _, scale, _ = StudentTNLL(df=4.0, min_scale=0.0, resolution=step).parameters_of(outputs)
    torch.testing.assert_close(scale, torch.full_like(scale, step / 12**0.5))
    assert (StudentTNLL(df=4.0, min_scale=0.0).parameters_of(outputs)[1] < 1e-5).all()
    mixture = GaussianMixtureNLL(num_components=2, min_std=0.0, resolution=step)
    _, _, stds = mixture.components(torch.full((4, 6), -30.0))
    torch.testing.assert_close(stds, torch.full_like(stds, step / 12**0.5))
    # with the floor the density of a grid value stays bounded: at most that of N(y, step^2/12)
    bound = -0.5 * math.log(2 * math.pi * step**2 / 12)
    assert (mixture.log_prob(torch.full((4, 6), -30.0), torch.zeros(4, 1)) <= bound + 1e-5).all()
