"""Selective prediction metrics by numbers: the risk-coverage curve, AURC, E-AURC and AUGRC.

- a hand-computed curve with a tie;
- closed forms for the 0/1 error: a perfect ranking gives E-AURC 0, AURC
  ``r - (1 - r)(H_N - H_{N - m})`` and AUGRC ``r^2 / 2``; a constant score gives AURC ``r`` and
  AUGRC ``r / 2``;
- a direct numpy implementation without ties, and the exact expectation over every tie-breaking
  order with ties;
- the torchmetrics classes over uneven batches equal the functions; the errors name the argument.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from uq_box.metrics import functional_selective as fsel
from uq_box.metrics.selective import AUGRC, AURC, EAURC, RiskCoverageCurve


def numpy_areas(uncertainty, loss):
    """AURC (mean selective risk) and AUGRC (trapezoid from (0, 0)) of one strict ranking."""
    order = np.argsort(uncertainty, kind="stable")
    cumulative = np.cumsum(np.asarray(loss, dtype=np.float64)[order])
    n = len(cumulative)
    k = np.arange(1, n + 1)
    aurc = np.mean(cumulative / k)
    coverage = np.concatenate([[0.0], k / n])
    generalized = np.concatenate([[0.0], cumulative / n])
    augrc = np.sum(np.diff(coverage) * (generalized[1:] + generalized[:-1]) / 2)
    return aurc, augrc


def test_curve_by_hand_with_a_tie():
    uncertainty = torch.tensor([0.5, 0.2, 0.1, 0.2])
    loss = torch.tensor([True, False, False, True])
    coverage, selective, generalized, threshold = fsel.risk_coverage_curve(uncertainty, loss)
    torch.testing.assert_close(coverage, torch.tensor([0.25, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(selective, torch.tensor([0.0, 1 / 3, 0.5], dtype=torch.float64))
    torch.testing.assert_close(generalized, torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64))
    torch.testing.assert_close(threshold, torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64))
    # trapezoid (0,0) (.25,0) (.75,.25) (1,.5)
    assert fsel.augrc(uncertainty, loss).item() == pytest.approx(0.15625, abs=1e-15)
    # expected R(k) over the two orders of the tied pair: 0, (0 + 1/2)/2, 1/3, 1/2
    assert fsel.aurc(uncertainty, loss).item() == pytest.approx((0.25 + 1 / 3 + 0.5) / 4)


@pytest.mark.parametrize(("n", "m"), [(100, 7), (37, 1), (10, 10), (50, 0), (1000, 250)])
def test_closed_forms_for_the_01_error(n, m):
    r = m / n
    loss = torch.zeros(n, dtype=torch.bool)
    loss[torch.randperm(n, generator=torch.Generator().manual_seed(n))[:m]] = True
    perfect = loss.double() + 0.01 * torch.rand(n, dtype=torch.float64)  # errors last
    harmonic = sum(1 / k for k in range(n - m + 1, n + 1))
    assert fsel.aurc(perfect, loss).item() == pytest.approx(r - (1 - r) * harmonic, abs=1e-12)
    assert fsel.eaurc(perfect, loss).item() == pytest.approx(0.0, abs=1e-12)
    assert fsel.augrc(perfect, loss).item() == pytest.approx(r**2 / 2, abs=1e-12)
    constant = torch.zeros(n)
    assert fsel.aurc(constant, loss).item() == pytest.approx(r, abs=1e-12)
    assert fsel.augrc(constant, loss).item() == pytest.approx(r / 2, abs=1e-12)
    if 0 < m < n and n >= 1000:  # the finite-N oracle tends to the closed form of Geifman et al.
        assert fsel.aurc(perfect, loss).item() == pytest.approx(
            r + (1 - r) * math.log(1 - r), abs=1e-3
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_without_ties(seed):
    rng = np.random.default_rng(seed)
    n = 500
    uncertainty = rng.normal(size=n)
    loss = rng.uniform(size=n) < 1 / (1 + np.exp(-2 * uncertainty))  # errors where uncertain
    expected_aurc, expected_augrc = numpy_areas(uncertainty, loss)
    u, ell = torch.from_numpy(uncertainty), torch.from_numpy(loss)
    assert fsel.aurc(u, ell).item() == pytest.approx(expected_aurc, rel=1e-12)
    assert fsel.augrc(u, ell).item() == pytest.approx(expected_augrc, rel=1e-12)
    oracle, _ = numpy_areas(loss.astype(float), loss)
    assert fsel.eaurc(u, ell).item() == pytest.approx(expected_aurc - oracle, rel=1e-10)
    # a continuous loss in [0, 1] too
    soft = rng.uniform(size=n)
    expected_aurc, expected_augrc = numpy_areas(uncertainty, soft)
    assert fsel.aurc(u, torch.from_numpy(soft)).item() == pytest.approx(expected_aurc, rel=1e-12)
    assert fsel.augrc(u, torch.from_numpy(soft)).item() == pytest.approx(expected_augrc, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ties_are_the_expectation_over_every_tie_breaking_order(seed):
    rng = np.random.default_rng(seed)
    n = 7
    uncertainty = rng.integers(0, 3, size=n).astype(float)  # three levels: many ties
    loss = rng.uniform(size=n).round(1)
    areas = np.array(
        [
            numpy_areas(uncertainty[list(order)], loss[list(order)])
            for order in itertools.permutations(range(n))
        ]
    )  # the stable sort breaks ties by the permuted position: every order equally often
    expected_aurc, expected_augrc = areas.mean(0)
    u, ell = torch.from_numpy(uncertainty), torch.from_numpy(loss)
    assert fsel.aurc(u, ell).item() == pytest.approx(expected_aurc, rel=1e-12)
    assert fsel.augrc(u, ell).item() == pytest.approx(expected_augrc, rel=1e-12)
    assert fsel.eaurc(u, ell).item() >= 0.0
    # the order of the points does not matter
    flipped = torch.flip(u, [0]), torch.flip(ell, [0])
    assert fsel.aurc(*flipped).item() == pytest.approx(fsel.aurc(u, ell).item(), rel=1e-14)


def test_better_ranking_scores_lower():
    gen = torch.Generator().manual_seed(0)
    n = 2000
    difficulty = torch.rand(n, generator=gen, dtype=torch.float64)
    loss = torch.rand(n, generator=gen, dtype=torch.float64) < difficulty
    informative = difficulty + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, generator=gen, dtype=torch.float64)
    for area in (fsel.aurc, fsel.eaurc, fsel.augrc):
        assert area(informative, loss) < area(noise, loss)
    # random scores: AURC about the error rate, AUGRC about half of it
    rate = loss.double().mean().item()
    assert fsel.aurc(noise, loss).item() == pytest.approx(rate, abs=0.03)
    assert fsel.augrc(noise, loss).item() == pytest.approx(rate / 2, abs=0.02)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_metric_classes_over_uneven_batches_equal_the_functions():
    gen = torch.Generator().manual_seed(3)
    n = 301
    uncertainty = torch.randint(0, 40, (n,), generator=gen).float()  # ties across batches
    loss = torch.rand(n, generator=gen) < 0.3
    metrics = {"aurc": AURC(), "eaurc": EAURC(), "augrc": AUGRC(), "curve": RiskCoverageCurve()}
    for chunk_u, chunk_l in zip(
        uncertainty.split([1, 64, 7, 150, 79]), loss.split([1, 64, 7, 150, 79]), strict=True
    ):
        for metric in metrics.values():
            metric.update(chunk_u, chunk_l)
    assert metrics["aurc"].compute() == fsel.aurc(uncertainty, loss)
    assert metrics["eaurc"].compute() == fsel.eaurc(uncertainty, loss)
    assert metrics["augrc"].compute() == fsel.augrc(uncertainty, loss)
    curve = metrics["curve"].compute()
    expected = fsel.risk_coverage_curve(uncertainty, loss)
    for key, value in zip(
        ("coverage", "selective_risk", "generalized_risk", "threshold"), expected, strict=True
    ):
        torch.testing.assert_close(curve[key], value)
    metrics["aurc"].reset()
    with pytest.raises(ValueError, match="before any `update`"):
        metrics["aurc"].compute()


def test_errors_name_the_argument():
    u, ell = torch.rand(5), torch.rand(5)
    with pytest.raises(TypeError, match="`uncertainty` must be a torch.Tensor"):
        fsel.aurc([0.1, 0.2], ell)
    with pytest.raises(ValueError, match="`loss` must hold one value per point, 5"):
        fsel.augrc(u, ell[:3])
    with pytest.raises(ValueError, match="`uncertainty` contains 1 non-finite"):
        fsel.eaurc(torch.tensor([0.1, math.nan, 0.3, 0.4, 0.5]), ell)
    with pytest.raises(ValueError, match="`loss` contains 1 non-finite"):
        fsel.risk_coverage_curve(u, torch.tensor([0.0, 1.0, math.inf, 0.0, 0.0]))
    with pytest.raises(ValueError, match="`uncertainty` is empty"):
        fsel.aurc(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match=r"`uncertainty` must have shape \[N\]"):
        AURC().update(torch.rand(5, 2), torch.rand(5))
