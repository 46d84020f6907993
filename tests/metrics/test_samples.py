"""Scores without a Gaussian (uq_box.metrics.functional_samples, samples.py) and quantiles
(functional_quantiles): closed forms, uncertainty-toolbox, unbiasedness, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import uncertainty_toolbox as uct

from uq_box.metrics import (
    EnergyScore,
    IntervalScore,
    IntervalWidth,
    QuantileCoverage,
    QuantilePinball,
    SampleCRPS,
)
from uq_box.metrics.functional import gaussian_crps
from uq_box.metrics.functional_quantiles import (
    gaussian_quantiles,
    mixture_cdf,
    mixture_quantiles,
    sample_quantiles,
)
from uq_box.metrics.functional_samples import (
    energy_score,
    interval_score,
    interval_width,
    quantile_calibration,
    quantile_coverage,
    quantile_pinball,
    sample_crps,
)


def gaussian_data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, dtype=torch.float64, generator=g)
    std = 0.3 + torch.rand(n, dtype=torch.float64, generator=g)
    target = mean + 1.3 * std * torch.randn(n, dtype=torch.float64, generator=g)
    return mean, std, target, g


def brute_crps(samples, target, unbiased):
    """The O(S^2) definition, for comparison."""
    s = samples.shape[0]
    spread = (samples - target).abs().mean(0)
    pairs = (samples.unsqueeze(0) - samples.unsqueeze(1)).abs().sum((0, 1))
    return spread - 0.5 * pairs / (s * (s - 1) if unbiased else s * s)


# -- sample CRPS ---------------------------------------------------------------------------------
def test_sample_crps_sorted_formula_equals_the_pairwise_definition():
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(7, 5, 3, dtype=torch.float64, generator=g)
    target = torch.randn(5, 3, dtype=torch.float64, generator=g)
    for unbiased in (True, False):
        torch.testing.assert_close(
            sample_crps(samples, target, unbiased, reduction="none"),
            brute_crps(samples, target, unbiased),
        )


def test_sample_crps_converges_to_the_gaussian_closed_form():
    mean, std, target, g = gaussian_data(n=100)
    exact = gaussian_crps(mean, std, target)
    assert float(exact) == pytest.approx(
        uct.metrics_scoring_rule.crps_gaussian(mean.numpy(), std.numpy(), target.numpy()), rel=1e-10
    )
    errors = []
    for num in (10, 100, 4000):
        samples = mean + std * torch.randn(num, 100, dtype=torch.float64, generator=g)
        errors.append(abs(float(sample_crps(samples, target)) - float(exact)))
    assert errors[-1] < 0.01 * float(exact)
    assert errors[-1] < errors[0]


def test_sample_crps_is_exactly_unbiased_on_a_small_case():
    """Expectation over every draw of S = 3 samples from a 3-point distribution (with
    repetition): the unbiased estimate equals the CRPS of that distribution, the biased one
    does not."""
    support = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    target = torch.tensor([0.3], dtype=torch.float64)
    exact = (probs * (support - target).abs()).sum() - 0.5 * (
        probs[:, None] * probs[None] * (support[:, None] - support[None]).abs()
    ).sum()
    expected = {True: 0.0, False: 0.0}
    for idx in itertools.product(range(3), repeat=3):
        weight = probs[list(idx)].prod()
        samples = support[list(idx)].reshape(3, 1)
        for unbiased in expected:
            expected[unbiased] += weight * sample_crps(samples, target, unbiased)
    torch.testing.assert_close(expected[True], exact)
    assert abs(float(expected[False] - exact)) > 1e-3


def test_energy_score_of_one_target_is_the_crps():
    g = torch.Generator().manual_seed(2)
    samples = torch.randn(9, 6, 1, dtype=torch.float64, generator=g)
    target = torch.randn(6, 1, dtype=torch.float64, generator=g)
    for unbiased in (True, False):
        torch.testing.assert_close(
            energy_score(samples, target, unbiased=unbiased, reduction="none"),
            sample_crps(samples, target, unbiased, reduction="none").squeeze(-1),
        )
    torch.testing.assert_close(
        energy_score(samples[..., 0], target[..., 0]), sample_crps(samples, target)
    )


def test_energy_score_is_lower_for_the_true_correlation():
    """Proper in the joint: samples with the targets' correlation score better than
    independent ones with the same marginals."""
    g = torch.Generator().manual_seed(3)
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    target = torch.randn(400, 2, dtype=torch.float64, generator=g) @ chol.T
    correlated = torch.randn(200, 400, 2, dtype=torch.float64, generator=g) @ chol.T
    independent = torch.randn(200, 400, 2, dtype=torch.float64, generator=g)
    assert energy_score(correlated, target) < energy_score(independent, target)


# -- quantiles and intervals against uncertainty-toolbox ------------------------------------------
def test_pinball_over_a_grid_equals_uct_check_score():
    mean, std, target, _ = gaussian_data()
    levels = np.linspace(0.01, 0.99, 99)
    quantiles = gaussian_quantiles(mean, std, levels.tolist())
    ours = quantile_pinball(quantiles, target, levels.tolist())
    theirs = uct.metrics_scoring_rule.check_score(mean.numpy(), std.numpy(), target.numpy())
    assert float(ours) == pytest.approx(theirs, rel=1e-9)


def test_interval_score_over_levels_equals_uct_interval_score():
    mean, std, target, _ = gaussian_data()
    scores = []
    for p in np.linspace(0.01, 0.99, 99):
        bounds = gaussian_quantiles(mean, std, [0.5 - p / 2, 0.5 + p / 2])
        scores.append(float(interval_score(bounds[:, 0], bounds[:, 1], target, alpha=1 - p)))
    theirs = uct.metrics_scoring_rule.interval_score(mean.numpy(), std.numpy(), target.numpy())
    assert np.mean(scores) == pytest.approx(theirs, rel=1e-9)


def test_coverage_width_and_calibration_of_gaussian_quantiles():
    mean, std, target, _ = gaussian_data(n=4000)
    target = mean + std * torch.randn(
        4000, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    q = gaussian_quantiles(mean, std, [0.05, 0.95])
    coverage = quantile_coverage(q[:, 0], q[:, 1], target)
    assert float(coverage) == pytest.approx(0.9, abs=0.015)
    torch.testing.assert_close(
        interval_width(q[:, 0], q[:, 1]), (2 * 1.6448536269514722 * std).mean()
    )
    observed = quantile_calibration(q, target, [0.05, 0.95])
    torch.testing.assert_close(
        observed, torch.tensor([0.05, 0.95], dtype=torch.float64), atol=0.015, rtol=0
    )


def test_metric_classes_accumulate_batches_as_the_functions():
    g = torch.Generator().manual_seed(6)
    samples = torch.randn(8, 30, 2, generator=g)
    target = torch.randn(30, 2, generator=g)
    lower, upper = samples.amin(0), samples.amax(0)
    quantiles = sample_quantiles(samples, [0.1, 0.5, 0.9])
    cases = [
        (SampleCRPS(), (samples, target), sample_crps(samples, target)),
        (EnergyScore(), (samples, target), energy_score(samples, target)),
        (IntervalWidth(), (lower, upper), interval_width(lower, upper)),
        (
            IntervalScore(alpha=0.2),
            (lower, upper, target),
            interval_score(lower, upper, target, 0.2),
        ),
        (QuantileCoverage(), (lower, upper, target), quantile_coverage(lower, upper, target)),
        (
            QuantilePinball([0.1, 0.5, 0.9]),
            (quantiles, target),
            quantile_pinball(quantiles, target, [0.1, 0.5, 0.9]),
        ),
    ]
    for metric, args, expected in cases:
        for part in (slice(0, 13), slice(13, 30)):
            metric.update(*(a[:, part] if a.ndim == 3 and a is samples else a[part] for a in args))
        torch.testing.assert_close(metric.compute().float(), expected, rtol=1e-5, atol=1e-6)


# -- quantiles of a mixture ----------------------------------------------------------------------
def test_mixture_quantiles_invert_the_mixture_cdf_and_are_exact_for_one_gaussian():
    g = torch.Generator().manual_seed(7)
    means = torch.randn(5, 20, 2, dtype=torch.float64, generator=g)
    stds = 0.2 + torch.rand(5, 20, 2, dtype=torch.float64, generator=g)
    levels = [0.01, 0.1, 0.5, 0.9, 0.99]
    q = mixture_quantiles(means, stds, levels)
    assert q.shape == (20, 2, 5)
    assert bool((q.diff(dim=-1) > 0).all())
    cdf = mixture_cdf(means.unsqueeze(-1), stds.unsqueeze(-1), q)
    torch.testing.assert_close(
        cdf, torch.tensor(levels, dtype=torch.float64).expand_as(cdf), atol=1e-12, rtol=0
    )
    one = mixture_quantiles(means[:1], stds[:1], levels)
    torch.testing.assert_close(one, gaussian_quantiles(means[0], stds[0], levels), rtol=0, atol=0)
    # no spread: the empirical quantiles of the samples
    torch.testing.assert_close(
        mixture_quantiles(means, None, levels),
        torch.quantile(means, torch.tensor(levels, dtype=torch.float64), dim=0).movedim(0, -1),
    )


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1, [0.1, 1.0], []])
def test_a_level_outside_the_open_unit_interval_is_an_error_naming_the_argument(bad):
    means = torch.zeros(1, 3, 1)
    with pytest.raises(ValueError, match="`quantile_levels`"):
        mixture_quantiles(means, torch.ones_like(means), bad)
    with pytest.raises(ValueError, match="`levels`"):
        QuantilePinball(bad if isinstance(bad, list) else [bad])


def test_bad_shapes_and_sample_counts():
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_crps(torch.zeros(1, 4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[S, \*target.shape\]"):
        sample_crps(torch.zeros(3, 4), torch.zeros(5))
    with pytest.raises(ValueError, match="`alpha`"):
        interval_score(torch.zeros(3), torch.ones(3), torch.zeros(3), alpha=1.0)
    with pytest.raises(ValueError, match="`quantiles` must have shape"):
        quantile_pinball(torch.zeros(3, 2), torch.zeros(3), [0.1, 0.5, 0.9])
