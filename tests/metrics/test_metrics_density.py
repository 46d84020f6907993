"""MixtureNLL: the real predictive density of an equal-weight mixture over samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D  # noqa: N812

from uq_box.metrics import GaussianNLL, MixtureNLL
from uq_box.metrics.density import mixture_log_prob, mixture_nll


def test_mixture_nll_is_the_log_of_the_mean_density():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(4, 30, 1, generator=generator, dtype=torch.float64)
    stds = torch.rand(4, 30, 1, generator=generator, dtype=torch.float64) + 0.1
    target = torch.randn(30, 1, generator=generator, dtype=torch.float64)
    log_probs = D.Normal(means, stds).log_prob(target)
    by_hand = -log_probs.exp().mean(0).log().mean()
    torch.testing.assert_close(mixture_nll(log_probs), by_hand)
    metric = MixtureNLL()
    for chunk in log_probs.split(7, dim=1):  # batches of any size give the mean over points
        metric.update(chunk)
    torch.testing.assert_close(metric.compute().double(), by_hand, rtol=1e-6, atol=1e-6)


def test_one_gaussian_sample_is_the_gaussian_nll():
    mean, std = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 2.0])
    target = torch.tensor([0.3, 0.2, 1.0])
    metric = MixtureNLL()
    metric.update(D.Normal(mean, std).log_prob(target).unsqueeze(0))
    gaussian = GaussianNLL()
    gaussian.update(mean, std, target)
    torch.testing.assert_close(metric.compute(), gaussian.compute())


def test_far_apart_log_densities_stay_finite():
    log_probs = torch.tensor([[-1000.0], [-1.0]])  # exp underflows: logsumexp does not
    assert mixture_log_prob(log_probs).item() == pytest.approx(-1.0 - math.log(2.0))


def test_empty_samples_are_an_error():
    with pytest.raises(ValueError, match="`log_probs`"):
        mixture_log_prob(torch.zeros(0, 3))
